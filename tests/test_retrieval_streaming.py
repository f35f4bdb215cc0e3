"""Retrieval heads, streaming heads and RazorAttention echo/induction: planted patterns (the formulas of
docs/methods/retrieval_streaming_heads.md), reference file formats, the real organism-lm, tiny checkpoints."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fakes import FakeCapture

import attnlab
from attnlab.datasets.niah import needle_token_span
from attnlab.errors import AttnlabError
from attnlab.heads.formats import read_duo_tsv, read_retrieval_head_json, write_duo_tsv, write_retrieval_head_json
from attnlab.models.loading import Batch
from attnlab.probes.base import ProbeContext
from attnlab.probes.razor_echo import RazorEchoInduction, echo_induction_masks, find_period, razor_selection
from attnlab.probes.retrieval_heads import RetrievalHeads, rouge1_recall, trial_retrieval_scores
from attnlab.probes.streaming_heads import StreamingHeads, classify_streaming, distant_mass_rows


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def fake_model(n_layers=1, n_heads=4, n_kv_heads=2):
    return SimpleNamespace(
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        causal=True,
        name="planted",
        tokenizer=FakeTokenizer(),
    )


def feed(probe, patterns, ids, meta=None, logits=None, n_kv_heads=None):
    """Run a probe on planted patterns ``[b, h, s, s]`` (one layer) for token ids ``[b, s]``; returns results."""
    b, h, s, _ = patterns.shape
    model = fake_model(n_heads=h, n_kv_heads=n_kv_heads or h)
    ctx = ProbeContext(model=model, meta=meta or [])
    cap = FakeCapture()
    probe.attach(cap, ctx)
    batch = Batch(torch.as_tensor(ids), torch.ones(b, s, dtype=torch.long), list(range(b)))
    for fn, queries in [(h.fn, h.queries) for h in cap.of("rows")]:
        pos = queries(batch) if queries is not None else torch.arange(s)
        for start in range(0, len(pos), 2):  # in chunks, as the engine delivers them
            q = pos[start : start + 2]
            fn(0, patterns[:, :, q, :], q, batch)
    for fn in [h.fn for h in cap.of("attention")]:  # the eager path's view of the planted patterns
        from attnlab.lse import AttentionView, ScoreSpec

        qk = torch.zeros(b, h, s, 4)
        fn(0, AttentionView(qk, qk, ScoreSpec(1.0, key_mask=batch.attention_mask), pattern=patterns), batch)
    for fn in [h.fn for h in cap.of("batch_end")]:
        fn(batch, logits)
    return {r.name: r for r in probe.results(ctx)}


# ---- retrieval score -------------------------------------------------------------------------------------------

PROMPT = [1, 9, 9, 50, 51, 52, 9, 9, 9, 7]  # BOS, haystack, needle tokens 50 51 52 at [3, 6), question token 7
ANSWER = [50, 51, 52]


def niah_case(n_heads=4, predictions_correct=(True, True)):
    """Two trials of PROMPT + ANSWER; head 0 copies (argmax walks the needle), head 1 looks only at BOS,
    head 2 looks at the needle but one position off, head 3 uniform. Trial k's predictions are the reference
    tokens if ``predictions_correct[k]`` else a wrong token."""
    ids = PROMPT + ANSWER
    s = len(ids)
    n_prompt = len(PROMPT)
    pat = torch.zeros(n_heads, s, s)
    for i in range(s):
        pat[3, i, : i + 1] = 1.0 / (i + 1)
        pat[1, i, 0] = 1.0
        pat[0, i, 0] = pat[2, i, 0] = 1.0
    for t in range(len(ANSWER)):
        q = n_prompt - 1 + t
        pat[0, q] = 0
        pat[0, q, 3 + t] = 1.0
        pat[2, q] = 0
        pat[2, q, min(3 + t + 1, q)] = 1.0
    b = len(predictions_correct)
    vocab = 64
    logits = torch.zeros(b, s, vocab)
    for k, ok in enumerate(predictions_correct):
        for t, y in enumerate(ANSWER):
            logits[k, n_prompt - 1 + t, y if ok else 9] = 5.0
    meta = [
        {"prompt_len": n_prompt, "answer_ids": ANSWER, "answer": " ".join(map(str, ANSWER)), "needle_span": [3, 6]}
        for _ in range(b)
    ]
    return pat[None].repeat(b, 1, 1, 1), torch.tensor([ids] * b), meta, logits


def test_copying_head_scores_exactly_one_and_bos_head_zero():
    pat, ids, meta, logits = niah_case()
    res = feed(RetrievalHeads(), pat, ids, meta, logits, n_kv_heads=2)["retrieval_heads"]
    assert res.scores.shape == (1, 4)  # one score per query head under GQA
    assert res.per_kv_head().shape == (1, 2)
    assert res.scores[0, 0] == 1.0
    assert res.scores[0, 1] == 0.0
    assert res.scores[0, 2] == 0.0  # off by one: attends to a token that is not y_t
    assert res.scores[0, 3] == 0.0  # uniform rows: argmax is the first key (BOS)
    assert res.summary["n_passed"] == 2 and res.summary["n_failed"] == 0
    assert res.extra["trial_scores"].shape == (2, 1, 4)


def test_failed_trials_contribute_nothing_and_are_counted():
    pat, ids, meta, logits = niah_case(predictions_correct=(True, False))
    res = feed(RetrievalHeads(), pat, ids, meta, logits, n_kv_heads=2)["retrieval_heads"]
    assert res.summary["n_trials"] == 2 and res.summary["n_failed"] == 1
    assert [t["passed"] for t in res.summary["trials"]] == [True, False]
    assert res.summary["trials"][1]["rouge1_recall"] == 0.0
    assert res.scores[0, 0] == 1.0  # the failed trial would have scored 0 and pulled the mean to 0.5
    assert res.extra["trial_scores"].shape[0] == 1


def test_zero_successful_trials_warns_and_flags():
    pat, ids, meta, logits = niah_case(predictions_correct=(False,))
    with pytest.warns(RuntimeWarning, match="none of 1 trials"):
        res = feed(RetrievalHeads(), pat, ids, meta, logits)["retrieval_heads"]
    assert res.summary["none_passed"] is True
    assert np.isnan(res.scores).all()


def test_probe_without_niah_meta_fails_clearly():
    with pytest.raises(AttnlabError, match="needs NIAH prompts"):
        RetrievalHeads().attach(FakeCapture(), ProbeContext(model=fake_model(), meta=[]))


def test_step_with_wrong_prediction_does_not_count_and_dedup():
    jstar = np.array([[3, 4, 5], [3, 3, 3]])
    targets = [50, 51, 52]
    assert trial_retrieval_scores(jstar, PROMPT, targets, (3, 6)).tolist() == [1.0, pytest.approx(1 / 3)]
    # a step whose model argmax differs from y_t counts for nothing
    assert trial_retrieval_scores(jstar, PROMPT, targets, (3, 6), predictions=[50, 0, 52])[0] == pytest.approx(2 / 3)
    # no dedup (reference) lets a head re-visiting one position exceed one position's worth; dedup caps it
    rep = np.array([[3, 3, 3]])
    assert trial_retrieval_scores(rep, [1, 9, 9, 50, 50, 50], [50, 50, 50], (3, 6))[0] == pytest.approx(1.0)
    assert trial_retrieval_scores(rep, [1, 9, 9, 50, 50, 50], [50, 50, 50], (3, 6), dedup=True)[0] == pytest.approx(
        1 / 3
    )


def test_needle_span_and_rouge():
    assert needle_token_span(PROMPT, ANSWER) == (3, 6)
    assert needle_token_span(PROMPT, [70, 71]) is None
    assert rouge1_recall("417", " 417\n") == 1.0
    assert rouge1_recall("the code 417", "code 999") == pytest.approx(1 / 3)
    assert rouge1_recall("417", "") == 0.0


# ---- streaming heads -------------------------------------------------------------------------------------------


def causal_uniform(s):
    return torch.tril(torch.ones(s, s)) / torch.arange(1, s + 1)[:, None]


def sink_recent_only(s, sink, recent):
    a = torch.zeros(s, s)
    for i in range(s):
        keep = [j for j in range(i + 1) if j < sink or j > i - recent]
        a[i, keep] = 1.0 / len(keep)
    return a


def test_distant_mass_planted():
    s, sink, recent = 16, 2, 3
    g = torch.Generator().manual_seed(0)
    rand = torch.softmax(
        torch.randn(s, s, generator=g).masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), -1e9), -1
    )
    pat = torch.stack([causal_uniform(s), sink_recent_only(s, sink, recent), rand])[None]
    res = feed(StreamingHeads(sink=sink, recent=recent), pat, torch.arange(s)[None], n_kv_heads=3)["streaming_heads"]
    uniform = np.mean([(i + 1 - sink - recent) / (i + 1) for i in range(sink + recent, s)])
    assert res.scores[0, 0] == pytest.approx(uniform)
    assert res.scores[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert 0.0 < res.scores[0, 2] < 1.0
    rows = distant_mass_rows(rand[None], torch.arange(s), torch.arange(s), sink, recent)
    assert bool(((rows >= 0) & (rows <= 1 + 1e-6)).all())


def test_classify_streaming_rule_and_gqa_max():
    scores = np.array([[0.9, 0.1, 0.5, 0.2], [0.3, 0.05, 0.36, 0.0]])
    full = classify_streaming(scores)  # top 2 of 8 heads: 0.9 and 0.5, both >= 0.35
    assert full.sum() == 2 and full[0, 0] and full[0, 2] and not full[1, 2]
    assert classify_streaming(scores, min_distant_ratio=0.6).sum() == 1
    kv = classify_streaming(scores, n_kv_heads=2)  # groups by max: [[0.9, 0.5], [0.3, 0.36]] -> top 1 of 4
    assert kv.shape == (2, 2) and kv.tolist() == [[True, False], [False, False]]


# ---- RazorAttention echo / induction ---------------------------------------------------------------------------


def test_echo_induction_masks_disjoint_and_period():
    period = 5
    pos = torch.arange(3 * period)
    echo, ind = echo_induction_masks(pos, pos, period)
    assert not (echo & ind).any()
    assert echo[period, 0] and ind[period, 1] and not echo[period - 1].any()
    ids = [1] + [11, 12, 13, 14, 15] * 3
    assert find_period(ids) == (1, 5)
    assert find_period([11, 12, 11, 12]) == (0, 2)
    assert find_period([1, 2, 3, 4]) is None


def test_row_normalised_induction_mask_ranks_first():
    period, n_rep = 4, 3
    ids = [1] + [20, 21, 22, 23] * n_rep
    s = len(ids)
    rel = torch.arange(s) - 1  # BOS excluded
    echo, ind = echo_induction_masks(rel, rel, period)

    def row_norm(mask):
        a = mask.float().clone()
        empty = a.sum(-1) == 0
        a[empty, 0] = 1.0  # rows with no mask entry go to BOS
        return a / a.sum(-1, keepdim=True)

    prev = torch.zeros(s, s)
    prev[0, 0] = 1
    prev[torch.arange(1, s), torch.arange(s - 1)] = 1
    pat = torch.stack([causal_uniform(s), row_norm(echo), row_norm(ind), prev])[None]
    res = feed(RazorEchoInduction(), pat, torch.tensor([ids]))
    ind_scores, echo_scores = res["razor_induction"].scores[0], res["razor_echo"].scores[0]
    assert int(np.argmax(ind_scores)) == 2 and int(np.argmax(echo_scores)) == 1
    assert echo_scores[2] == 0 and ind_scores[1] == 0  # disjoint masks
    sel = razor_selection(
        res["razor_echo"].scores, res["razor_induction"].scores, echo_fraction=0.25, induction_fraction=0.25
    )
    assert sel == {"0": [1, 2]}


# ---- reference formats -----------------------------------------------------------------------------------------


def test_retrieval_json_round_trip(tmp_path):
    trials = np.random.default_rng(0).random((3, 2, 4))
    write_retrieval_head_json(tmp_path / "h.json", trials)
    mean, lists = read_retrieval_head_json(tmp_path / "h.json")
    assert np.allclose(mean, trials.mean(0)) and lists[(1, 3)] == pytest.approx(trials[:, 1, 3].tolist())
    (tmp_path / "ref.json").write_text('{"0-1": [0.5, 1.0], "1-0": []}')
    mean, _ = read_retrieval_head_json(tmp_path / "ref.json", n_layers=2, n_heads=2)
    assert mean[0, 1] == 0.75 and np.isnan(mean[1, 0]) and np.isnan(mean[0, 0])
    with pytest.raises(ValueError):
        read_retrieval_head_json(tmp_path / "ref.json", n_layers=1, n_heads=2)


def test_duo_tsv_round_trip_and_validation(tmp_path):
    alpha = np.array([[0.0, 1.0], [0.25, 0.7], [1e-6, 0.5]])
    write_duo_tsv(tmp_path / "full_attention_heads.tsv", alpha)
    back = read_duo_tsv(tmp_path / "full_attention_heads.tsv", n_layers=3, n_kv_heads=2)
    assert np.array_equal(back, alpha)
    with pytest.raises(ValueError, match="KV heads"):
        read_duo_tsv(tmp_path / "full_attention_heads.tsv", n_kv_heads=4)


# ---- real models -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism():
    return attnlab.load("organism-lm")


def test_organism_lm_has_retrieval_heads(organism, tmp_path):
    from attnlab.datasets.niah_set import niah_prompt_set
    from attnlab.heads.results import HeadScores

    ps = niah_prompt_set(organism, lengths=[128, 256], depths=[0, 50, 100], seed=1)
    r = attnlab.scan(organism, ["retrieval", "streaming_heads"], ps, batch_size=3, out=tmp_path / "run", progress=False)
    h = r["retrieval_heads"]
    assert h.summary["n_trials"] == 6 and h.summary["n_passed"] >= 5
    assert np.nanmax(h.scores) > 0.1 and h.summary["n_retrieval_heads"] >= 1
    assert h.per_kv_head().shape == (organism.n_layers, organism.n_kv_heads)
    # the fused long-context path (rows recomputed only for the answer queries) gives the same scores
    fused = attnlab.scan(organism, [RetrievalHeads()], ps, batch_size=3, attention="fused", progress=False)
    assert np.array_equal(fused["retrieval_heads"].scores, h.scores)
    # the correctness gate reads the logits of the answer steps only, and only those are unembedded: the trials
    # are the same as with the full logits (forced here by a handler that may read every position)
    from attnlab.capture import Capture
    from attnlab.probes.base import ProbeContext
    from attnlab.probes.scan import prompt_batches

    probe, cap = RetrievalHeads(), Capture(organism, progress=False)
    ctx = ProbeContext(model=organism, dataset="niah", n_prompts=len(ps), meta=list(ps.meta))
    probe.attach(cap, ctx)
    cap.on("batch_end", lambda b, logits: None)
    cap.run(prompt_batches(organism, ps, 3, False))
    (full,) = probe.results(ctx)
    assert full.summary["trials"] == h.summary["trials"] and np.array_equal(full.scores, h.scores)
    # saved with its trial scores, exportable to the reference JSON
    loaded = HeadScores.load(tmp_path / "run", "retrieval_heads")
    write_retrieval_head_json(tmp_path / "ref.json", loaded)
    mean, _ = read_retrieval_head_json(tmp_path / "ref.json")
    assert np.allclose(mean, h.scores)
    # generation mode (greedy decoding, the paper's procedure) agrees where the model answers every trial right
    from attnlab.datasets.base import PromptSet
    from attnlab.probes.retrieval_heads import retrieval_scores_generate

    sub = PromptSet(name="niah[:3]", token_ids=ps.token_ids[:3], meta=ps.meta[:3])
    g = retrieval_scores_generate(organism, sub, max_new_tokens=5)
    assert g.summary["n_passed"] == sum(t["passed"] for t in h.summary["trials"][:3])
    passed_idx = [i for i, t in enumerate(h.summary["trials"]) if t["passed"]]
    tf = h.extra["trial_scores"][[k for k, i in enumerate(passed_idx) if i < 3]].mean(0)
    assert np.allclose(g.scores, tf)
    s = r["streaming_heads"].scores
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_probes_run_on_tiny_checkpoints(loaded, arch):
    from attnlab.datasets import DATASETS

    m = loaded(arch)
    niah = DATASETS["niah"](m, 2, 0)
    assert all(meta["needle_span"] is not None for meta in niah.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random weights: the gate may reject every trial
        r = attnlab.scan(m, ["retrieval", "streaming_heads"], niah, batch_size=2, progress=False)
    h = r["retrieval_heads"]
    assert h.scores.shape == (m.n_layers, m.n_heads)
    assert h.summary["n_passed"] + h.summary["n_failed"] == 2
    assert r["streaming_heads"].scores.shape == (m.n_layers, m.n_heads)
    rep = DATASETS["repeated-random"](m, 2, 0)
    r = attnlab.scan(m, "razor_echo_induction", rep, batch_size=2, progress=False)
    assert np.isfinite(r["razor_induction"].scores).all()
    assert r["razor_induction"].summary["n_prompts_scored"] == 2
