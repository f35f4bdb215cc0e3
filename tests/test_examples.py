"""The example notebooks (``examples/``): committed without outputs, and run by ``make test`` with nbmake
(``pytest --nbmake examples``). A notebook's figures survive ``jupyter nbconvert --to html``: a kernel executes a
small notebook, the export holds each figure as HTML that draws it, with plotly.js embedded (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def test_three_example_notebooks_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_retrieval_heads.ipynb", "03_interventions.ipynb"]
    for path in NOTEBOOKS:
        book = json.loads(path.read_text())
        code = [c for c in book["cells"] if c["cell_type"] == "code"]
        assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code), path.name
        assert book["metadata"]["kernelspec"]["name"] == "python3"


def test_figures_survive_an_html_export(tmp_path, checkpoint_dir):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbconvert")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    book = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
    book.cells = [
        nbformat.v4.new_code_cell(
            f"import torch, attnlab\ntorch.set_num_threads(1)\nmodel = attnlab.load({str(checkpoint_dir / 'gpt2')!r})"
        ),
        nbformat.v4.new_code_cell("attnlab.pattern(model, 'The cat sat on the mat.', 'L1H2')"),
        nbformat.v4.new_code_cell(
            "run = attnlab.scan(model, 'first_token_sink', ['The cat sat.'], progress=False)\n"
            "run['first_token_sink'].plot()"
        ),
    ]
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in book.cells[1:] for o in c.outputs]
    assert all("text/html" in o.get("data", {}) for o in outputs), [list(o.get("data", {})) for o in outputs]
    html, _ = HTMLExporter().from_notebook_node(book)
    assert html.count("Plotly.newPlot") >= 2  # both figures are drawn by the exported page itself
    assert "plotly.js v" in html and len(html) > 1_000_000  # the library itself is embedded, once
    assert 'src="https://cdn.plot.ly' not in html  # nothing is fetched when the page is viewed
