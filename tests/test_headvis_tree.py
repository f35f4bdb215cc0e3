"""The HeadVis export: a census writes Neuronpedia's HeadVis tree (the layout of ``compute-head-metrics.py``, written
down below from its README and script), its scatter equals the census's six grids, its sparse rows are the top-k of
the eager attention, and the streaming sampler keeps what its design says (top-K, Algorithm R, seeded)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import attnlab
from attnlab.census import census, census_json
from attnlab.datasets.base import PromptSet
from attnlab.heads.headvis_tree import METRICS, read_headvis_tree, write_headvis_tree
from attnlab.models.loading import Batch
from attnlab.probes.base import ProbeContext
from attnlab.probes.headvis import METRICS as PROBE_METRICS
from attnlab.probes.headvis_examples import HeadVisExamples, IntervalSampler, auto_warmup

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the reference layout, in our words ---------------------------------------------------------------------------
# A type is a Python type, a tuple of them (None allowed where written), or a callable check.
NUM = (int, float)
OPT_STR = (str, type(None))
OPT_NUM = (int, float, type(None))


def list_of(t):
    return lambda v: isinstance(v, list) and all(_is(x, t) for x in v)


def keyed(schema):
    return lambda v: isinstance(v, dict) and set(v) == set(schema) and all(_is(v[k], t) for k, t in schema.items())


def _is(value, t) -> bool:
    if callable(t) and not isinstance(t, type) and not isinstance(t, tuple):
        return bool(t(value))
    types = t if isinstance(t, tuple) else (t,)
    if isinstance(value, bool) and bool not in types:
        return False  # a JSON true is not a number
    return isinstance(value, types)


LABELLED = keyed({"key": str, "label": str})
CONFIG = {  # config.json: what the HeadVis frontend reads, plus the run's provenance
    "model_name": str,
    "np_model_id": OPT_STR,  # Neuronpedia's id; null lets its loaders take it from the directory
    "dataset_name": str,
    "heads": list_of(lambda x: isinstance(x, list) and len(x) == 2 and all(type(i) is int for i in x)),
    "n_layers": int,
    "n_heads": int,
    "n_intervals": int,
    "metrics": list_of(str),
    "metric_descriptions": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
    "head_data_pattern": str,
    "has_umap": bool,
    "umap_heads": list,
    "custom_plots": list_of(LABELLED),
    "custom_tables": list_of(LABELLED),
    "statistics_display": keyed(
        {"n_samples": keyed({"label": str, "format": str}), "mean_max_activation": keyed({"label": str, "format": str})}
    ),
    "pipeline_config": dict,
}
PIPELINE = {  # the reference's pipeline_config keys; the loaders need the first six non-null
    "model_name": str,
    "dataset_name": str,
    "n_sequences": int,
    "seq_len": int,
    "dtype": str,
    "attn_implementation": str,
    "np_model_id": OPT_STR,
    "dataset_config_name": OPT_STR,
    "dataset_split": OPT_STR,
    "dataset_text_field": OPT_STR,
    "batch_size": int,
    "exports_dir": OPT_STR,
    "output_run_dir": OPT_STR,
    "device": OPT_STR,
    "induction_attention_threshold": NUM,
    "trust_remote_code": bool,
    "min_free_vram_gb": OPT_NUM,
    "streaming": bool,
    "model_cache_dir": OPT_STR,
    "delete_model_cache": bool,
    "revision": OPT_STR,
    "dataset_revision": OPT_STR,
    "n_intervals": int,
    "samples_per_interval": int,
    "samples_per_top_interval": int,
    "sparse_topk_per_row": int,
    "sparse_threshold": NUM,
    "sample_seed": int,
    "warmup_size": int,
    "created_at": str,
    "actual_sequences_processed": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
}
SEQUENCE = {
    "sequence_id": int,
    "interval": int,
    "tokens": list_of(str),
    "attention_indices": list_of(int),
    "attention_values": list_of(NUM),
    "seq_len": int,
    "max_activation": OPT_NUM,
}
TOKEN_WEIGHT = keyed({"token": str, "weight": NUM})
HEAD = {
    "sequences": list_of(keyed(SEQUENCE)),
    "qk_distance_histogram": keyed({"bin_edges": list_of(int), "bin_values": list_of(NUM)}),
    "top_query_tokens": list_of(TOKEN_WEIGHT),
    "top_key_tokens": list_of(TOKEN_WEIGHT),
    "histogram": keyed({"bin_edges": list_of(NUM), "bin_values": list_of(int)}),
    "statistics": keyed({"n_samples": int, "mean_max_activation": OPT_NUM}),
}
SCATTER_ROW = {"layer": int, "head": int, **{m: OPT_NUM for m in METRICS}}
QK_EDGES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def assert_schema(obj: dict, schema: dict, where: str, *, extra_ok: bool = False) -> None:
    missing = set(schema) - set(obj)
    assert not missing, f"{where}: missing {sorted(missing)}"
    if not extra_ok:
        assert set(obj) == set(schema), f"{where}: unexpected {sorted(set(obj) - set(schema))}"
    for k, t in schema.items():
        assert _is(obj[k], t), f"{where}.{k} = {obj[k]!r:.80}"


def assert_aggregates_follow_the_sequences(hd: dict) -> None:
    """The per-head aggregates, recomputed entry by entry from the head's sequences as the reference defines them:
    mass by |q - k| in log-spaced bins, and the 50 token strings with the most mass on each side (ties in order of
    first appearance)."""
    bins = [0.0] * (len(QK_EDGES) - 1)
    acc = {"query": {}, "key": {}}
    for s in hd["sequences"]:
        for idx, v in zip(s["attention_indices"], s["attention_values"]):
            q, k = divmod(idx, s["seq_len"])
            b = max(i for i, e in enumerate(QK_EDGES) if e <= abs(q - k))
            if b < len(bins):
                bins[b] += v
            for side, pos in (("query", q), ("key", k)):
                tok = s["tokens"][pos]
                acc[side][tok] = acc[side].get(tok, 0.0) + v
    assert hd["qk_distance_histogram"]["bin_values"] == [round(x, 4) for x in bins]
    for side in ("query", "key"):
        want = sorted(acc[side].items(), key=lambda kv: -kv[1])[:50]
        assert [(t["token"], t["weight"]) for t in hd[f"top_{side}_tokens"]] == [(t, round(w, 4)) for t, w in want]


def random_sequences(vocab: int, n: int, seed: int = 0, lo: int = 4, hi: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, min(vocab, 250), size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


# ---- the tree of a census -----------------------------------------------------------------------------------------


def test_a_census_writes_the_reference_layout_and_its_scatter_is_the_census(loaded, tmp_path):
    model = loaded("gpt2")
    seqs = random_sequences(model.tokenizer.vocab_size, 14)
    c = census(
        model, PromptSet(name="rand", token_ids=seqs), statistics="headvis", progress=False, headvis_dir=tmp_path / "hv"
    )
    d = tmp_path / "hv"
    L, H = model.n_layers, model.n_heads
    files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
    heads = {f"heads/L{l}H{h}.json" for l in range(L) for h in range(H)}
    assert files == {"config.json", "scatter_data.json", "server_config.json", "attributions/manifest.json"} | heads
    assert json.loads((d / "server_config.json").read_text()) == {}
    assert json.loads((d / "attributions/manifest.json").read_text()) == {}

    config = json.loads((d / "config.json").read_text())
    assert_schema(config, CONFIG, "config")
    assert config["heads"] == [[l, h] for l in range(L) for h in range(H)]
    assert (config["n_layers"], config["n_heads"], config["n_intervals"]) == (L, H, 5)
    assert config["metrics"] == list(METRICS) == list(PROBE_METRICS)
    assert set(config["metric_descriptions"]) == set(METRICS)
    assert config["head_data_pattern"] == "L{layer}H{head}.json"
    assert [p["key"] for p in config["custom_plots"]] == ["qk_distance_histogram", "histogram"]
    assert [t["key"] for t in config["custom_tables"]] == ["top_query_tokens", "top_key_tokens"]
    pc = config["pipeline_config"]
    assert_schema(pc, PIPELINE, "pipeline_config", extra_ok=True)  # attnlab adds its own provenance keys
    assert (pc["n_sequences"], pc["actual_sequences_processed"]) == (14, 14)
    assert pc["seq_len"] == max(len(s) for s in seqs)
    impl = {"eager": "eager", "fused": "sdpa"}[c.info["attention_path"]]  # the model's forward in the census
    assert (pc["dtype"], pc["attn_implementation"], pc["dataset_name"]) == ("float32", impl, "rand")
    assert pc["attention_path"] == c.info["attention_path"]
    assert (pc["num_hidden_layers"], pc["num_attention_heads"]) == (L, H)
    assert pc["warmup_size"] == auto_warmup(14) == 7 and "n // 2" in pc["warmup_rule"]
    assert c.info["headvis_dir"] == str(d.resolve())

    scatter = json.loads((d / "scatter_data.json").read_text())
    assert [(r["layer"], r["head"]) for r in scatter] == [(l, h) for l in range(L) for h in range(H)]
    for r in scatter:
        assert_schema(r, SCATTER_ROW, "scatter row")
        for m in METRICS:
            assert r[m] == round(float(c[m].scores[r["layer"], r["head"]]), 4), m

    for l in range(L):
        for h in range(H):
            hd = json.loads((d / f"heads/L{l}H{h}.json").read_text())
            assert_schema(hd, HEAD, f"L{l}H{h}")
            assert hd["qk_distance_histogram"]["bin_edges"] == QK_EDGES
            assert len(hd["qk_distance_histogram"]["bin_values"]) == len(QK_EDGES) - 1
            assert hd["histogram"]["bin_edges"] == [round(x, 4) for x in np.linspace(0, 1, 51)]
            assert sum(hd["histogram"]["bin_values"]) == 14  # every sequence, warmup included
            assert hd["statistics"]["n_samples"] == len(hd["sequences"]) > 0
            per = {i: [s for s in hd["sequences"] if s["interval"] == i] for i in range(1, 6)}
            assert all(1 <= s["interval"] <= 5 for s in hd["sequences"])
            assert all(len(per[i]) <= 3 for i in range(1, 5)) and len(per[5]) <= 10
            top = [s["max_activation"] for s in per[5]]
            assert top == sorted(top, reverse=True)
            assert {s["sequence_id"] for s in hd["sequences"]} <= set(range(7, 14))  # the warmup is not sampled
            for s in hd["sequences"]:
                assert s["seq_len"] == len(s["tokens"]) == len(seqs[s["sequence_id"]])
                assert s["tokens"] == [model.tokenizer.decode([i]) for i in seqs[s["sequence_id"]]]
                assert len(s["attention_indices"]) == len(s["attention_values"])
                assert s["attention_indices"] == sorted(s["attention_indices"])  # (q, k) order
            assert_aggregates_follow_the_sequences(hd)
    # the probe alone (attnlab.scan) gives the mean max activation the head files report
    alone = attnlab.scan(model, HeadVisExamples(), PromptSet(name="rand", token_ids=seqs), progress=False)
    mean = alone["headvis_mean_max_activation"].scores
    for l in range(L):
        for h in range(H):
            stats = json.loads((d / f"heads/L{l}H{h}.json").read_text())["statistics"]
            assert stats["mean_max_activation"] == round(float(mean[l, h]), 4)
    back = read_headvis_tree(d)
    assert back.heads() == [(l, h) for l in range(L) for h in range(H)]
    np.testing.assert_allclose(back.grids()["qk_distance"], np.round(c["qk_distance"].scores, 4))


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_sparse_rows_are_the_topk_of_the_eager_attention(loaded, checkpoint_dir, tmp_path, arch):
    """Every sampled sequence of every head: each kept row holds the row's largest weights (at most 8, each at least
    0.005) of HF's eager attention on that sequence alone, and max_activation is the largest weight off position 0."""
    from transformers import AutoModelForCausalLM

    model = loaded(arch)
    seqs = random_sequences(model.tokenizer.vocab_size, 10, seed=1)
    seqs.insert(3, seqs[0][:1])  # a one-token prompt is skipped: sequence ids count the others
    census(model, PromptSet(name="r", token_ids=seqs), statistics="headvis", progress=False, headvis_dir=tmp_path)
    valid = [s for s in seqs if len(s) >= 2]
    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir / arch, attn_implementation="eager").eval()
    eager = {}
    tree = read_headvis_tree(tmp_path)
    checked = 0
    for l, h in tree.heads():
        for s in tree.head(l, h)["sequences"]:
            sid, n = s["sequence_id"], s["seq_len"]
            if sid not in eager:
                with torch.no_grad():
                    out = hf(torch.tensor([valid[sid]]), output_attentions=True, use_cache=False)
                eager[sid] = [a[0].double().numpy() for a in out.attentions]
            a = eager[sid][l][h]  # [n, n]
            q, k = np.divmod(np.asarray(s["attention_indices"]), n)
            v = np.asarray(s["attention_values"])
            np.testing.assert_allclose(v, a[q, k], atol=1e-4)  # each kept entry is the eager weight, rounded
            for row in range(n):
                want = np.sort(a[row])[::-1][:8]
                want = np.round(want[want >= 0.005 + 1e-4], 4)  # clear of the threshold: always kept
                got = np.sort(v[q == row])[::-1]
                assert len(got) >= len(want) and len(got) <= 8
                np.testing.assert_allclose(got[: len(want)], want, atol=1e-4, err_msg=f"L{l}H{h} seq {sid} row {row}")
            assert s["max_activation"] == pytest.approx(a[1:, 1:].max(), abs=1e-4)
            checked += 1
    assert checked >= model.n_layers * model.n_heads


def test_max_activation_excludes_position_zero_with_left_padding():
    """A planted (bidirectional) head puts 0.9 on the first token from every row and 0.1 on the diagonal, and row 0
    puts 0.7 on token 3: its max activation is 0.1 (row and column 0 excluded), while row 0 stays in the record."""
    t, pad = 5, 2
    a = torch.zeros(t, t)
    a[:, 0] = 0.9
    a[torch.arange(1, t), torch.arange(1, t)] = 0.1
    a[0, 0], a[0, 3] = 0.3, 0.7
    rows = torch.zeros(1, 1, t + pad, t + pad)
    rows[0, 0, pad:, pad:] = a  # left padding: the prompt starts at column 2
    batch = Batch(torch.tensor([[0, 0, 5, 6, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), [0])
    tok = SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")
    model = SimpleNamespace(n_layers=1, n_heads=1, n_kv_heads=1, name="planted", tokenizer=tok)
    ctx = ProbeContext(model=model, n_prompts=2)
    probe = HeadVisExamples(warmup=1)
    capture = SimpleNamespace(on=lambda site, fn, **kw: setattr(capture, "fn", fn))
    probe.attach(capture, ctx)
    for sl in (slice(0, 3), slice(3, t + pad)):  # two chunks, as the engine sends them
        q = torch.arange(t + pad)[sl]
        capture.fn(0, rows[:, :, q], q, batch)
    second = Batch(batch.input_ids.clone(), batch.attention_mask.clone(), [1])
    for sl in (slice(0, 4), slice(4, t + pad)):
        q = torch.arange(t + pad)[sl]
        capture.fn(0, rows[:, :, q], q, second)
    ex = probe.examples(ctx)
    assert ex.max_activation_sum[0, 0] / ex.max_activation_count[0, 0] == pytest.approx(0.1)
    assert ex.histogram[0, 0, 5] == 2  # 0.1 * 50 -> bin 5, not bin 45 (0.9) or 49 (1.0)
    (s,) = ex.sequences[(0, 0)]  # warmup of 1: the second sequence is sampled
    assert s.sequence_id == 1 and s.max_activation == pytest.approx(0.1)
    entries = dict(zip(s.attention_indices.tolist(), s.attention_values.tolist()))
    assert entries[0] == pytest.approx(0.3) and entries[3] == pytest.approx(0.7)  # row 0: (0, 0) and (0, 3)
    assert all(entries[q * t] == pytest.approx(0.9) and entries[q * t + q] == pytest.approx(0.1) for q in range(1, t))
    assert len(entries) == 2 + 2 * (t - 1)  # zeros are below the threshold; padding never appears
    assert ex.tokens[1] == ["<5>", "<6>", "<7>", "<8>", "<9>"]


# ---- the sampler --------------------------------------------------------------------------------------------------


def feed(sampler: IntervalSampler, maxima: np.ndarray, splits: list[int], layer: int = 0) -> None:
    """Feed ``maxima`` ([n, heads]) in batches of the given sizes; each record is (sequence id, max)."""
    start = 0
    for size in splits:
        ids = np.arange(start, min(start + size, len(maxima)))
        if ids.size == 0:
            break
        pairs = sampler.observe(layer, ids, maxima[ids])
        sampler.put(layer, {(p, h): (int(ids[p]), float(maxima[ids[p], h])) for p, h in pairs})
        start += size


def make(seed=0, warmup=20, heads=3, **kw):
    args = dict(n_intervals=5, samples_per_interval=3, samples_per_top_interval=10, warmup=warmup, seed=seed)
    args.update(kw)
    return IntervalSampler(1, heads, **args)


def test_boundaries_are_the_reference_quantile_ranks():
    s = make(warmup=10, heads=1, n_intervals=4)
    feed(s, (np.arange(10)[::-1] / 10).astype(np.float32)[:, None], [10])
    # ranks round(i * 10 / 4) with Python's round (half to even): 2.5 -> 2, 5 -> 5, 7.5 -> 8
    np.testing.assert_allclose(s.boundaries(0)[0], np.float32([0.2, 0.5, 0.8]))


def test_top_interval_keeps_exactly_the_k_largest_ties_to_the_lower_id_and_reservoirs_count_right():
    rng = np.random.default_rng(0)
    n, w = 400, 20
    mx = np.round(rng.random((n, 3)), 2).astype(np.float32)  # 2 decimals: many ties
    s = make(warmup=w)
    feed(s, mx, [7] * 100)
    bounds = s.boundaries(0)
    for h in range(3):
        interval = np.minimum((bounds[h][None, :] <= mx[w:, h, None]).sum(-1), 4)  # [n - w]
        got = s.samples(0, h)
        for rec in got:
            assert rec[2] == (rec[1], float(mx[rec[1], h]))  # each record is the one built for that sequence
        top = [seq for i, seq, _ in got if i == 5]
        cand = np.flatnonzero(interval == 4) + w
        want = sorted(cand, key=lambda q: (-mx[q, h], q))[:10]
        assert top == [int(q) for q in want]
        for i in range(4):
            members = set((np.flatnonzero(interval == i) + w).tolist())
            kept = [seq for j, seq, _ in got if j == i + 1]
            assert len(kept) == min(3, len(members)) and set(kept) <= members and len(set(kept)) == len(kept)
            assert s.seen[0, h, i] == len(members)


def test_sampling_is_seeded_and_independent_of_batching():
    mx = np.random.default_rng(1).random((300, 2)).astype(np.float32)
    runs = {}
    for seed, splits in ((0, [300]), (0, [1] * 300), (0, [13] * 30), (1, [300])):
        s = make(seed=seed, heads=2)
        feed(s, mx, splits)
        runs[(seed, len(splits))] = [[(i, q) for i, q, _ in s.samples(0, h)] for h in range(2)]
    assert runs[(0, 1)] == runs[(0, 300)] == runs[(0, 30)]
    assert runs[(1, 1)] != runs[(0, 1)]  # another seed, other reservoirs (the top interval is the same)
    top = lambda r: [[x for x in head if x[0] == 5] for head in r]  # noqa: E731
    assert top(runs[(1, 1)]) == top(runs[(0, 1)])


def test_reservoir_is_uniform_over_arrivals():
    """Algorithm R: each of n arrivals in an interval ends up in a reservoir of 3 with probability 3 / n."""
    n, trials = 40, 400
    hits = np.zeros(n)
    warm = np.linspace(0.5, 0.95, 10, dtype=np.float32)[:, None]  # boundary of 2 intervals: 0.75
    for seed in range(trials):
        s = make(seed=seed, warmup=10, heads=1, n_intervals=2)
        feed(s, np.concatenate([warm, np.full((n, 1), 0.1, np.float32)]), [10, 17, 23])
        for i, seq, _ in s.samples(0, 0):
            assert i == 1
            hits[seq - 10] += 1
    assert hits.sum() == 3 * trials
    expected = 3 * trials / n  # 30
    chi2 = ((hits - expected) ** 2 / expected).sum()
    assert chi2 < 80, chi2  # 39 degrees of freedom: p < 1e-4 above 80
    assert abs(hits[:20].sum() - hits[20:].sum()) < 0.2 * hits.sum()  # late arrivals as likely as early ones


# ---- padding, short sequences, CLI --------------------------------------------------------------------------------


def _tree_of(model, seqs, padding_side, batch_size, directory, attention="eager"):
    from attnlab.capture import Capture

    valid = [s for s in seqs if len(s) >= 2]
    ctx = ProbeContext(model=model, n_prompts=len(seqs))
    probe = HeadVisExamples(n_sequences=len(valid))
    cap = Capture(model, attention=attention, progress=False)
    probe.attach(cap, ctx)
    batches = [
        model.batch_from_ids(
            seqs[i : i + batch_size], list(range(i, i + len(seqs[i : i + batch_size]))), padding_side=padding_side
        )
        for i in range(0, len(seqs), batch_size)
    ]
    cap.run(batches)
    prov = {"dataset_name": "r", "attn_implementation": attention}
    write_headvis_tree(directory, model.summary(), {}, probe.examples(ctx), prov)
    return read_headvis_tree(directory)


def test_left_and_right_padding_give_the_same_tree(loaded, tmp_path):
    model = loaded("llama-gqa")
    seqs = random_sequences(model.tokenizer.vocab_size, 16, seed=2, lo=2, hi=20)
    seqs.insert(5, [7])
    right = _tree_of(model, seqs, "right", 3, tmp_path / "right")
    left = _tree_of(model, seqs, "left", 4, tmp_path / "left")
    fused = _tree_of(model, seqs, "left", 5, tmp_path / "fused", attention="fused")
    assert right.config["pipeline_config"]["n_sequences"] == 16
    for other in (left, fused):
        for l, h in right.heads():
            a, b = right.head(l, h), other.head(l, h)
            assert a["histogram"] == b["histogram"]
            assert [(s["sequence_id"], s["interval"]) for s in a["sequences"]] == [
                (s["sequence_id"], s["interval"]) for s in b["sequences"]
            ]
            for x, y in zip(a["sequences"], b["sequences"]):
                assert x["tokens"] == y["tokens"] and x["attention_indices"] == y["attention_indices"]
                np.testing.assert_allclose(x["attention_values"], y["attention_values"], atol=1e-4)
                assert x["max_activation"] == pytest.approx(y["max_activation"], abs=1e-4)


def test_a_run_of_one_token_sequences_only_writes_an_empty_tree(loaded, tmp_path):
    model = loaded("llama-gqa")
    short = PromptSet(name="short", token_ids=[[5], [9], [11]])
    c = census(model, short, statistics="headvis", progress=False, headvis_dir=tmp_path)
    assert "induction_score" in c.not_scored
    tree = read_headvis_tree(tmp_path)
    assert tree.provenance["n_sequences"] == 0
    assert all(r[m] is None for r in tree.scatter for m in METRICS)
    for l, h in tree.heads():
        hd = tree.head(l, h)
        assert hd["sequences"] == [] and sum(hd["histogram"]["bin_values"]) == 0
        assert hd["statistics"] == {"n_samples": 0, "mean_max_activation": None}
        assert hd["top_query_tokens"] == [] and set(hd["qk_distance_histogram"]["bin_values"]) == {0.0}


def test_cli_census_writes_the_tree_and_refuses_a_bad_target(checkpoint_dir, tmp_path, capsys):
    from attnlab.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("The cat sat on the mat.\nParis is the capital of France.\nOne two three four five.\n")
    argv = ["census", "--model", str(checkpoint_dir / "gpt2"), "--prompts", str(prompts), "--statistics", "headvis"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--headvis", str(tmp_path / "hv"), "--quiet"]) == 0
    assert "HeadVis tree:" in capsys.readouterr().out
    tree = read_headvis_tree(tmp_path / "hv")
    assert tree.provenance["n_sequences"] == 3 and len(tree.scatter) == tree.config["n_layers"] * tree.config["n_heads"]
    assert census_json(tmp_path / "run")["info"]["headvis_dir"] == str((tmp_path / "hv").resolve())
    (tmp_path / "file").write_text("x")
    assert main([*argv, "--out", str(tmp_path / "run2"), "--headvis", str(tmp_path / "file"), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(attnlab.AttnlabError, match="no HeadVis tree"):
        read_headvis_tree(tmp_path / "run")


def test_head_paths_from_a_tree_stay_inside_it(tmp_path, loaded):
    model = loaded("gpt2")
    ps = PromptSet(name="r", token_ids=random_sequences(500, 4))
    census(model, ps, statistics="headvis", progress=False, headvis_dir=tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["head_data_pattern"] = "../../L{layer}H{head}.json"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(attnlab.AttnlabError, match="outside"):
        read_headvis_tree(tmp_path).head(0, 0)
    assert Path(tmp_path / "heads" / "L0H0.json").is_file()
