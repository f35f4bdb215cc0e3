"""Training scripts of the bundled organisms: one module per kind, each exposing main(argv) and evaluate()."""
