"""The notebook API past TransformerLens + CircuitsVis (issue #17): ``attnlab.pattern`` / ``patterns`` /
``compare_patterns`` against the bridge's own ``hook_pattern``; head direct logit attribution that sums exactly to
the model's logit and agrees with each head's output read at ``hook_z``; short reprs and script-free HTML views; the
app's explore views drawing the notebook's figures; a plotly renderer that survives a static export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHORT_SENTENCES

import attnlab
from attnlab.errors import AttnlabError

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The cat sat on the mat. The cat sat on the mat."


def _hook_patterns(model, prompt):
    """Every layer's full pattern from the bridge's eager ``hook_pattern`` (the reference)."""
    from attnlab.capture import Capture

    want = {}
    cap = Capture(model, attention="eager", progress=False)
    cap.on("pattern", lambda layer, p, b: want.__setitem__(layer, p[0].clone().numpy()))
    with torch.inference_mode():
        cap.run_batch(model.batch_from_ids([model.token_ids(prompt)], [0]))
    return want


# ---- patterns -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "bert"])
def test_pattern_and_grid_equal_the_bridge_hook_pattern(loaded, arch):
    model = loaded(arch)
    want = _hook_patterns(model, PROMPT)
    grid = attnlab.patterns(model, PROMPT, layer=1)
    assert grid.heads == [(1, h) for h in range(model.n_heads)]
    for h in range(model.n_heads):
        np.testing.assert_allclose(grid.weights[h], want[1][h], atol=2e-5)
    one = attnlab.pattern(model, PROMPT, "L0H2")
    np.testing.assert_allclose(one["L0H2"], want[0][2], atol=2e-5)
    assert one.plot().layout.meta["head_label"] == "L0H2"
    fig = grid.plot()
    assert fig.layout.meta["kind"] == "pattern_grid" and fig.layout.meta["heads"] == grid.labels
    assert len(fig.data) == model.n_heads


def test_windowed_rows_of_a_long_prompt_on_the_fused_path(loaded):
    """A window of queries is those rows of the full pattern, also when the rows are recomputed chunk by chunk on
    the fused path (what a long prompt takes)."""
    from attnlab.attention import attention_rows

    model = loaded("llama-gqa")
    prompt = " ".join(SHORT_SENTENCES * 6)
    n = len(model.token_ids(prompt))
    full = _hook_patterns(model, prompt)
    rows, tokens, start, stop = attention_rows(model, prompt, [(1, 3), (0, 1)], window=(n - 20, n), attention="fused")
    assert (start, stop) == (n - 20, n) and len(tokens) == n and rows.shape == (2, 20, n)
    np.testing.assert_allclose(rows[0], full[1][3][n - 20 :], atol=2e-5)
    np.testing.assert_allclose(rows[1], full[0][1][n - 20 :], atol=2e-5)
    win = attnlab.pattern(model, prompt, (1, 3), window=(-20, n))
    assert (win.query_start, win.query_stop) == (n - 20, n)
    assert "queries" in win.plot().layout.title.text


def test_compare_patterns_differ_only_from_the_first_changed_token(loaded):
    """Causal attention: rows before the first token where two prompts differ are identical, so B - A is exactly 0
    there; identical prompts give a zero difference everywhere."""
    model = loaded("llama-gqa")
    a, b = "The cat sat on the mat today.", "The dog sat on the mat today."
    cmp = attnlab.compare_patterns(model, a, b, layer=1, labels=("cat", "dog"))
    first = cmp.first_difference()
    assert first is not None and first > 0
    for head in cmp.heads:
        d = cmp.difference(head)
        assert np.abs(d[:first]).max() == 0.0 and np.abs(d[first:]).max() > 0
    same = attnlab.compare_patterns(model, a, a, heads=["L1H0"])
    assert np.abs(same.difference("L1H0")).max() == 0.0
    fig = cmp.plot()
    assert fig.layout.meta["first_difference"] == first and len(fig.data) == 3 * len(cmp.heads)


@pytest.mark.parametrize("bad", [{"layer": 9}, {"heads": ["L0H9"]}, {"heads": ["nonsense"]}, {}])
def test_bad_head_choices_are_one_line_errors(loaded, bad):
    with pytest.raises(AttnlabError):
        attnlab.patterns(loaded("gpt2"), PROMPT, **bad)


# ---- head direct logit attribution ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
def test_head_dla_sums_to_the_logit_and_matches_each_head_output(loaded, arch):
    """The parts (heads by source position, embeddings, MLPs, biases) sum to the model's logit; each head's total
    equals its output ``z_h W_O^h`` read at ``hook_z`` and projected through the final norm's scale (an
    independent path: no pattern, no values)."""
    model = loaded(arch)
    prompt = "The cat sat on the mat. The dog sat on the"
    dla = attnlab.head_dla(model, prompt, "mat")
    assert dla.reconstruction_error < 1e-4 * (1 + abs(dla.logit))
    ids = model.token_ids(prompt)
    z, scale = {}, {}

    def keep(t, hook):
        (z if "hook_z" in hook.name or "o.hook_in" in hook.name else scale)[hook.name] = t.detach().float()

    names = lambda n: n.endswith(("attn.o.hook_in", "attn.hook_z")) or n == "ln_final.hook_scale"
    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(names, keep)])
    tid = model.tokenizer(" mat", add_special_tokens=False)["input_ids"][0]
    assert dla.logit == pytest.approx(float(logits[0, -1, tid]), abs=1e-5)
    from attnlab.dla import _final_norm, _output_projection

    w, _, centers = _final_norm(model)
    s = float(next(iter(scale.values()))[0, -1, 0])
    direction = model.hf_model.get_output_embeddings().weight[tid].detach().float()
    for layer in range(model.n_layers):
        W_O, _ = _output_projection(model.bridge.blocks[layer].attn.original_component, model.n_heads, model.d_head)
        zl = next(v for k, v in z.items() if k.startswith(f"blocks.{layer}."))[0, -1]  # [heads, d_head]
        for h in range(model.n_heads):
            out = zl[h] @ W_O[h]
            out = out - out.mean() if centers else out
            want = float((out / s * w) @ direction)
            assert dla.values[layer, h].sum() == pytest.approx(want, abs=1e-5)
    per_head = dla.per_head()
    assert per_head.scores.shape == (model.n_layers, model.n_heads)
    fig = dla.plot(k=3)
    assert fig.layout.meta["kind"] == "head_dla" and len(fig.layout.meta["top"]) == 3


def test_head_dla_of_a_logit_difference_is_the_difference(loaded):
    model = loaded("llama-gqa")
    prompt = "Paris is the capital of"
    a = attnlab.head_dla(model, prompt, "France")
    b = attnlab.head_dla(model, prompt, "Germany")
    both = attnlab.head_dla(model, prompt, "France", contrast="Germany")
    np.testing.assert_allclose(both.values, a.values - b.values, atol=1e-6)
    assert both.logit == pytest.approx(a.logit - b.logit, abs=1e-5) and "Germany" in both.target


def test_head_dla_refuses_what_it_cannot_decompose(loaded):
    with pytest.raises(AttnlabError, match="bidirectional"):
        attnlab.head_dla(loaded("bert"), "The cat sat on the mat.", "mat")
    with pytest.raises(AttnlabError, match="outside"):
        attnlab.head_dla(loaded("gpt2"), "The cat sat.", "mat", position=40)


# ---- reprs and HTML -----------------------------------------------------------------------------------------------


def test_reprs_are_short_and_html_views_have_no_script(loaded):
    from attnlab.datasets.specs import load_data
    from attnlab.interventions.evaluate import evaluate_intervention
    from attnlab.interventions.zerotuning import ZeroTuning

    model = loaded("llama-gqa")
    run = attnlab.scan(model, "sinks", SHORT_SENTENCES[:2], progress=False)
    zt = ZeroTuning(gamma=2.0, heads=[(1, 0)]).fit(model)
    report = evaluate_intervention(model, zt, load_data("classify:sentiment:test", n=3), n_boot=20)
    objects = [model, run, run["first_token_sink"], run["act_sink_tokens_0"], zt, report]
    for obj in objects:
        text = repr(obj)
        assert len(text) < 400 and "\n" not in text, text  # never a module tree or an array dump
        page = obj._repr_html_()
        assert "<script" not in page.lower() and len(page) < 60_000
    assert repr(model).startswith("LoadedModel(") and "2 layers x 4 heads (2 KV)" in repr(model)
    assert "first_token_sink" in run._repr_html_() and "L" in repr(run["first_token_sink"])
    assert "edits: L1H0" in zt._repr_html_()
    assert len(repr(model.bridge)) > 2_000  # what a plain print of the bridge would have shown instead


def test_figures_carry_self_contained_html_in_a_notebook(loaded, monkeypatch):
    """With the embedding renderer a figure's display bundle holds HTML that draws it (plotly.js embedded once per
    notebook), beside plotly's mimetype for JupyterLab; a renderer the user chose is left alone."""
    import plotly.io as pio

    from attnlab import notebook

    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    monkeypatch.setattr(notebook, "in_jupyter_kernel", lambda: True)
    monkeypatch.setattr(notebook, "_DONE", [False])
    assert notebook.use_embedding_renderer() == notebook.EMBEDDING_RENDERER
    bundle = attnlab.pattern(loaded("gpt2"), PROMPT, "L1H1")._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in bundle and "text/html" in bundle
    assert "Plotly.newPlot" in bundle["text/html"] and bundle["text/plain"].startswith("AttentionPatterns(")
    monkeypatch.setattr(pio.renderers, "default", "browser")
    assert notebook.use_embedding_renderer() == "browser"  # the user's choice stays


# ---- the app's explore views draw the notebook's figures ------------------------------------------------------------


@pytest.fixture(scope="module")
def explore_state(tmp_path_factory, loaded):
    from attnlab.apps.app import create_app
    from attnlab.apps.live import LiveModels

    model = loaded("llama-gqa")
    root = tmp_path_factory.mktemp("explore-runs")
    attnlab.scan(model, "first_token_sink", SHORT_SENTENCES[:2], out=root / "tiny", progress=False)
    live = LiveModels(wait_s=1.0)
    live.preload(model.name, model)
    return create_app(root, live_model=live).attnlab_state


def test_app_grid_comparison_and_dla_views(explore_state, loaded):
    from attnlab.apps.callbacks import explore

    model = loaded("llama-gqa")
    sel = {"layer": 1, "head": 2}
    fig, msg = explore.grid_figure("tiny", sel, "0", None, "selected", explore_state)
    assert msg == "" and fig.layout.meta["heads"] == [f"L1H{h}" for h in range(model.n_heads)]
    want = attnlab.patterns(model, SHORT_SENTENCES[0], layer=1)
    np.testing.assert_allclose(np.asarray(fig.data[2].z, dtype=float), want.weights[2], atol=2e-5)
    fig, msg = explore.grid_figure("tiny", sel, "0", None, "0", explore_state)
    assert fig.layout.meta["heads"][0] == "L0H0"
    fig, msg = explore.comparison_figure(1, "tiny", sel, "0", None, SHORT_SENTENCES[1], "head", explore_state)
    ref = attnlab.compare_patterns(model, SHORT_SENTENCES[0], SHORT_SENTENCES[1], heads=["L1H2"])
    assert msg == "" and fig.layout.meta["max_abs_difference"] == pytest.approx(
        ref.plot().layout.meta["max_abs_difference"], abs=1e-5
    )
    fig, msg = explore.dla_result(1, "tiny", "typed", "The cat sat on the", "mat", "", explore_state)
    ref = attnlab.head_dla(model, "The cat sat on the", "mat")
    assert msg == "" and fig.layout.meta["logit"] == pytest.approx(ref.logit, abs=1e-6)
    for args, expect in [
        ((1, "tiny", "0", None, "", "", explore_state), "type the answer"),
        ((1, "nope", "0", None, "mat", "", explore_state), "no run named"),
    ]:
        fig, msg = explore.dla_result(*args)
        assert expect in msg and len(fig.data) == 0
    fig, msg = explore.comparison_figure(1, "tiny", sel, "0", None, "", "head", explore_state)
    assert "prompt B" in msg
