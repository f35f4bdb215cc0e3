"""The import rules of docs/architecture.md, checked on the code: every import of every module (inside functions
too) is read with ``ast``; an import that goes up the layering, a library module that imports a training script,
an experiment script or the test suite, and an import of another module's private name all fail."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top to bottom (docs/architecture.md). A module may import modules of its own layer and of the layers below.
LAYERS: list[tuple[str, set[str]]] = [
    ("cli", {"cli", "cli_args", "__main__"}),
    ("apps", {"apps"}),
    ("census", {"census", "sweep"}),
    ("ablation", {"ablation"}),
    ("interventions", {"interventions"}),
    ("probes", {"probes", "attention", "dla"}),
    ("capture", {"capture", "fused", "lse"}),
    ("models", {"models"}),
    ("datasets", {"datasets"}),
    ("heads", {"heads"}),
    (
        "base",
        {
            "figures",
            "pattern_figures",
            "notebook",
            "progress",
            "errors",
            "hooks",
            "params",
            "stats",
            "lazy",
            "__init__",
        },
    ),
]
LAYER_OF = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _top(module: str) -> str:
    """The layer key of ``attnlab.x.y``: ``x`` (``__init__`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every import statement in the file, at any depth."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name, [alias.name for alias in node.names]))
    return out


def _library_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "attnlab").rglob("*.py") if "bundled" not in p.parts)


def _edges(root: Path = ROOT) -> list[tuple[str, int, str, list[str]]]:
    """(importing module, line, imported attnlab module, names) for every attnlab import of the package.

    ``from attnlab import figures`` names a submodule and counts as an import of ``attnlab.figures``."""
    edges = []
    for path in _library_files(root):
        here = _module_name(path, root)
        for line, target, names in _imports(path, root):
            if not (target == "attnlab" or target.startswith("attnlab.")):
                continue
            if target == "attnlab" and names:
                for name in names:
                    sub = root / "attnlab" / name
                    is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                    edges.append((here, line, f"attnlab.{name}" if is_module else "attnlab", [name]))
            else:
                edges.append((here, line, target, names))
    return edges


def test_every_module_belongs_to_a_layer():
    tops = {_top(_module_name(p)) for p in _library_files()}
    assert tops <= set(LAYER_OF), (
        f"modules outside the layering (add them to docs/architecture.md): {tops - set(LAYER_OF)}"
    )


def _layer_name(module: str) -> str:
    return LAYERS[LAYER_OF[_top(module)]][0]


def _upward_imports(root: Path = ROOT) -> list[str]:
    return [
        f"{here}:{line} imports {target} ({_layer_name(target)} is above {_layer_name(here)})"
        for here, line, target, _ in _edges(root)
        if LAYER_OF[_top(target)] < LAYER_OF[_top(here)]
    ]


def test_no_import_goes_up_the_layering():
    """Strictly downward: cli -> apps -> ablation -> interventions -> probes -> capture -> models -> datasets ->
    heads -> figures / errors / hooks / params / stats. Layers are ordered, so no two layers form a cycle."""
    assert _upward_imports() == []


def test_library_never_imports_training_scripts_experiments_or_tests():
    """Trainers keep only training (organisms' run time lives in attnlab/models/); experiment scripts live in
    scripts/ and are not imported by the library."""
    bad = []
    for path in _library_files():
        here = _module_name(path)
        for line, target, _ in _imports(path):
            if target.split(".")[0] in ("scripts", "benchmarks", "tests", "conftest"):
                bad.append(f"{here}:{line} imports {target}")
            trainer = target.startswith("attnlab.models.training")
            if trainer and not (here.startswith("attnlab.models.training") or here == "attnlab.models.train"):
                bad.append(f"{here}:{line} imports the training script {target}")
    assert bad == []


def test_no_private_names_cross_modules_and_no_hidden_edges():
    """No ``from attnlab.x import _private`` (a private helper another module needs is made public), and no
    ``import attnlab`` inside the library (``attnlab.load`` / ``attnlab.scan`` hide the module they come from)."""
    bad = []
    for here, line, target, names in _edges():
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        if private and target != here:
            bad.append(f"{here}:{line} imports {', '.join(private)} from {target}")
        if target == "attnlab" and names != ["__version__"]:
            bad.append(f"{here}:{line} imports the package attnlab itself ({names or 'import attnlab'})")
    assert bad == []


def test_the_rule_checker_catches_an_upward_import(tmp_path):
    """The checker is not vacuous: an import from heads up to probes (inside a function) is reported, a downward
    one is not."""
    for rel, text in {
        "attnlab/__init__.py": "",
        "attnlab/heads/__init__.py": "",
        "attnlab/heads/example.py": (
            "from attnlab.errors import AttnlabError\n\ndef f():\n    from attnlab.probes.scan import scan\n"
        ),
        "attnlab/probes/__init__.py": "",
        "attnlab/probes/scan.py": "from attnlab.heads import example\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    assert _upward_imports(tmp_path) == ["attnlab.heads.example:4 imports attnlab.probes.scan (probes is above heads)"]


@pytest.mark.parametrize("module", ["attnlab", "attnlab.cli", "attnlab.errors", "attnlab.heads.io"])
def test_cheap_imports_stay_cheap(module):
    """``import attnlab`` and the CLI entry do not load torch, transformers or TransformerLens; the atomic writer
    (used by the training scripts) does not load pandas."""
    code = (
        f"import sys, {module}; heavy = ['torch', 'transformers', 'transformer_lens', 'pandas']; "
        "print(' '.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
