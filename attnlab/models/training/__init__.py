"""Training and evaluation scripts of the bundled model organisms (one module per organism)."""
