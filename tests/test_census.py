"""The head census: one sweep gives the same numbers as the separate probes and the separate ablation, on every
tiny architecture; the organisms' known heads come out of one census; missing inputs are reported as not scored."""

from __future__ import annotations

import numpy as np
import pytest

import attnlab
from attnlab.ablation.metrics import NextTokenLogprob
from attnlab.ablation.scores import ablation_scores
from attnlab.census import Census, census
from attnlab.datasets.base import PromptSet
from attnlab.models.bundled import bundled_path

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "The cat sat on the mat and the cat sat on the mat.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "One two three four five six seven.",
]


def prompts_for(model):
    if model.modality == "vision-language":
        from PIL import Image

        rng = np.random.default_rng(0)
        ims = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
        return PromptSet(name="vlm", texts=["<image>\nWhat is this? It is a cat.", "<image> blue sky"], images=ims)
    return PromptSet(name="texts", texts=TEXTS)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2", "bert", "llava"])
def test_census_equals_the_separate_probes_and_ablation(loaded, arch):
    model = loaded(arch)
    ps = prompts_for(model)
    c = census(model, ps, causal_prompts=2, progress=False, batch_size=2)
    probes = [p["name"] for p in c.info["probes"]]
    assert "headvis" in probes and "first_token_sink" in probes
    for probe in probes:
        alone = attnlab.scan(model, probe, ps, progress=False, batch_size=2)
        for name, r in alone.head_scores().items():
            if name in c.scores:
                np.testing.assert_allclose(
                    c.scores[name].scores, r.scores, atol=1e-5, rtol=1e-5, err_msg=f"{arch} {name}"
                )
            else:
                assert name in c.not_scored, name
    if model.causal and model.modality == "text":
        abl = c.scores["ablation_zero_next_token_logprob"]
        ids = [model.token_ids(t) for t in TEXTS][:2]
        alone = ablation_scores(model, ids, NextTokenLogprob())
        np.testing.assert_allclose(abl.scores, alone.scores, atol=1e-5)
        assert -1 <= c.info["causal"]["atp_spearman"] <= 1
    else:
        assert "ablation_zero_next_token_logprob" in c.not_scored
    # nothing is reported as zeros: every scored statistic has a finite value, every missing one a reason
    for name, s in c.scores.items():
        assert np.isfinite(s.scores).any(), name
    assert all(reason for reason in c.not_scored.values())


def test_census_saves_loads_and_tabulates(loaded, tmp_path):
    model = loaded("llama-gqa")
    c = census(model, TEXTS, causal_prompts=2, progress=False, out=tmp_path / "c")
    back = Census.load(tmp_path / "c")
    assert back.statistics == c.statistics and back.not_scored == c.not_scored
    for name in c.statistics:
        np.testing.assert_array_equal(back[name].scores, c[name].scores)
    df = c.to_frame()
    assert len(df) == model.n_layers * model.n_heads
    assert set(c.statistics) <= set(df.columns)
    kv = c.to_frame(per_kv_head="max")
    assert len(kv) == model.n_layers * model.n_kv_heads
    np.testing.assert_allclose(
        kv["first_token_sink"].to_numpy(), c["first_token_sink"].per_kv_head("max").ravel(), equal_nan=True
    )
    summary = c.summary()
    assert set(summary["statistic"]) == set(c.statistics) | set(c.not_scored)
    fig = c.plot("first_token_sink", "induction_score")
    assert len(fig.data[0].x) == model.n_layers * model.n_heads
    assert "L0H0" in fig.data[0].text[0]
    with pytest.raises(attnlab.AttnlabError, match="not scored|not in this census"):
        c.plot("retrieval_heads", "induction_score")
    with pytest.raises(KeyError, match="not scored"):
        c["retrieval_heads"]


def test_missing_inputs_are_not_scored_with_the_reason_in_table_and_cli(loaded, checkpoint_dir, tmp_path, capsys):
    from attnlab.cli import main

    model = loaded("gpt2")
    c = census(model, TEXTS, statistics="retrieval,vision,headvis", progress=False)
    assert "retrieval_heads" not in c.scores and "NIAH" in c.not_scored["retrieval_heads"]
    assert "text model" in c.not_scored["vision_aware_heads"]
    row = c.summary().set_index("statistic").loc["retrieval_heads"]
    assert row["status"] == "not scored" and "NIAH" in row["reason"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS))
    rc = main(
        [
            "census",
            "--model",
            str(checkpoint_dir / "gpt2"),
            "--prompts",
            str(prompts),
            "--statistics",
            "retrieval,headvis",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "retrieval_heads" in out and "not scored: needs NIAH prompts" in out
    assert "prev_token_score" in out
    assert main(["census", "--model", "x", "--dataset", "prose", "--statistics", "bogus", "--out", "y"]) == 2


@pytest.mark.skipif(
    any(bundled_path(n) is None for n in ("organism-induction", "organism-lm")) or bundled_path("minilm") is None,
    reason="organisms not bundled",
)
def test_known_heads_come_out_of_one_census():
    """organism-induction's induction heads, organism-lm's retrieval heads and MiniLM's strongest [CLS] sink
    heads come out of a census exactly as from the separate probes."""
    from attnlab.datasets import DATASETS

    ind = attnlab.load("organism-induction")
    ps = DATASETS["repeated-random"](ind, 4, 0)
    c = census(ind, ps, statistics="headvis,patterns", progress=False)
    alone = attnlab.scan(ind, "induction", ps, progress=False)
    top = set(c["induction_score"].top_heads(3))
    assert top == {(1, 0), (1, 3), (1, 4)}
    np.testing.assert_allclose(
        c["razor_induction"].scores,
        attnlab.scan(ind, "razor_echo_induction", ps, progress=False)["razor_induction"].scores,
        atol=1e-6,
    )
    assert set(alone["induction"].top_heads(3)) == top

    lm = attnlab.load("organism-lm")
    niah = DATASETS["niah"](lm, 4, 0)
    c = census(lm, niah, statistics="retrieval", progress=False)
    alone = attnlab.scan(lm, "retrieval_heads", niah, progress=False)
    np.testing.assert_allclose(c["retrieval_heads"].scores, alone["retrieval_heads"].scores, atol=1e-6)
    assert set(c["retrieval_heads"].top_heads(2)) <= {(3, 10), (3, 11), (4, 3)}

    mini = attnlab.load("minilm")
    prose = DATASETS["prose"](mini, 4, 0)
    c = census(mini, prose, statistics="sinks", progress=False)
    alone = attnlab.scan(mini, "first_token_sink", prose, progress=False)
    np.testing.assert_allclose(c["first_token_sink"].scores, alone["first_token_sink"].scores, atol=1e-6)
    assert np.nanmax(c["first_token_sink"].scores) > 0.5  # a real [CLS] sink


@pytest.mark.skipif(bundled_path("organism-sink") is None, reason="organism-sink not bundled")
def test_census_extremes_equal_the_probes_and_find_organism_sinks_backcopy_heads():
    """organism-sink on its own task: the census's value drain, active-dormant sink split and residual norms are
    the separate probes' numbers, and they single out the backcopy heads (dormant on BOS, drained BOS value)."""
    from attnlab.datasets import DATASETS

    model = attnlab.load("organism-sink")
    ps = DATASETS["bigram-backcopy"](model, 16, 0)
    c = census(model, ps, statistics="sinks,extremes", progress=False)
    assert c.info["attention_path"] == "fused"  # the census's default path, the probes' eager one below
    for probe in ("value_drain", "domain_sink", "first_token_sink"):
        alone = attnlab.scan(model, probe, ps, progress=False)
        for name, r in alone.head_scores().items():
            np.testing.assert_allclose(c[name].scores, r.scores, atol=1e-5, err_msg=name)
    alone = attnlab.scan(model, "residual_norms", ps, progress=False)
    np.testing.assert_allclose(c.tokens["residual_norms_0"].values, alone["residual_norms_0"].values, rtol=1e-5)
    for got, want in zip(c.tokens["residual_norms_0"].summary["layers"], alone["residual_norms_0"].summary["layers"]):
        assert got["first_token_ratio"] == pytest.approx(want["first_token_ratio"], rel=1e-5)
        assert got["peak_tokens"] == want["peak_tokens"]
    gap, drain = c["domain_sink_gap_trigger"].scores, c["value_drain"].scores
    backcopy = {tuple(int(x) for x in hd) for hd in np.argwhere(gap > 0.5)}
    assert backcopy == {(1, 0), (2, 0)}  # the two active-dormant heads of the shipped checkpoint (MODEL_CARD)
    assert all(drain[hd] < 0.35 for hd in backcopy) and drain[0, 0] > 0.6  # drained BOS value only where it sinks


def test_census_without_a_domain_does_not_score_domain_sink(loaded):
    c = census(loaded("llama-gqa"), TEXTS, statistics="extremes", progress=False)
    assert "domain_sink" in c.not_scored and "bigram-backcopy" in c.not_scored["domain_sink"]
    assert "value_drain" in c.scores and "residual_norms_0" in c.tokens
