"""organism-lm: generator invariants, a smoke training run, and (once shipped) the model's behaviour targets."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from attnlab.datasets import arithmetic, classification, icl, niah, prose, recall
from attnlab.models import lm as lm_runtime
from attnlab.models.training import lm

BUNDLED = Path(lm.__file__).resolve().parents[1] / "bundled" / "organism-lm"
shipped = (BUNDLED / "config.json").is_file()


@pytest.fixture(scope="module")
def lm_tok():
    return lm_runtime.load_tokenizer()


@pytest.fixture(scope="module")
def gpt2_style_tok():
    """A tiny GPT-2-style byte-level BPE (no BOS, digits merged) trained here on corpus paragraphs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        list(prose.prose_paragraphs()[:1500]) + ["The secret code is 123. Question: Answer:"], trainer=trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


# ------------------------------------------------------------------ prose
def test_prose_corpus_is_deterministic_and_sentences_rejoin():
    docs = prose.load_prose()
    assert len(docs) > 1000 and len(set(docs)) == len(docs)
    assert prose.load_prose() is docs  # cached
    para = next(p for p in prose.prose_paragraphs() if len(prose.split_sentences(p)) >= 3)
    sents = prose.split_sentences(para)
    assert " ".join(sents) == para
    assert [para[i:].startswith(s) for i, s in zip(prose.sentence_starts(para), sents)] == [True] * len(sents)


# ------------------------------------------------------------------ ICL
def test_icl_has_enough_tasks_and_splits_share_no_inputs():
    assert len(icl.TASK_NAMES) >= 12
    for task in icl.TASK_NAMES:
        inputs = {s: {x for x, _ in icl.sample_pairs(task, s, 120, random.Random(task))} for s in icl.SPLITS}
        assert not inputs["train"] & inputs["test"], task
        assert not inputs["train"] & inputs["valid"], task
        assert not inputs["valid"] & inputs["test"], task


def test_icl_prompt_format_and_eval_prompts():
    rng = random.Random(0)
    for task in icl.TASK_NAMES:
        for k in (0, 5, 10):
            p = icl.make_prompt(task, "test", k, rng)
            assert p.prompt.count("Q: ") == k + 1 and p.prompt.endswith("A:")
            demos = re.findall(r"Q: (.*)\nA: (.*)\n\n", p.prompt)
            assert all(icl.TASKS[task].fn(x) == y for x, y in demos)
    zero = icl.build_eval_prompts("add_3", 0, 5)
    five = icl.build_eval_prompts("add_3", 5, 5)
    assert [p.prompt.split("Q: ")[-1] for p in zero] == [p.prompt.split("Q: ")[-1] for p in five]
    assert all(int(p.answer) == int(p.prompt.split("Q: ")[-1].split("\n")[0]) + 3 for p in five)


def test_function_vector_export(tmp_path):
    rows = icl.export_function_vectors("uppercase", "test", 20, path=str(tmp_path / "uc.json"))
    assert json.loads((tmp_path / "uc.json").read_text()) == rows
    assert all(r["output"] == r["input"].upper() and icl.split_of(r["input"]) == "test" for r in rows)


# ------------------------------------------------------------------ NIAH
@pytest.mark.parametrize("which", ["lm_tok", "gpt2_style_tok"])
def test_niah_boundary_length_and_answer(which, request):
    tok = request.getfixturevalue(which)
    trials = niah.build_niah_trials(tok, [120, 400], [0, 37, 100], n_needles=2, seed=3)
    assert len(trials) == 6
    for t in trials:
        s, e = t.needle_span
        assert t.prompt[s:e] == t.needle and t.answer in t.needle
        before = t.prompt[:s].rstrip(" ")
        assert s == 0 or before[-1] in ".!?", before[-40:]  # needle starts a sentence
        assert t.prompt[e] in " \n"
        assert abs(t.n_tokens - t.target_length) <= max(6, 0.03 * t.target_length), (t.n_tokens, t.target_length)
        assert t.prompt.endswith("Answer:") and t.key in t.question
        ids = tok(t.prompt)["input_ids"]
        span = niah.needle_token_span(ids, tok(" " + t.answer, add_special_tokens=False)["input_ids"])
        # token-set overlap (Wu et al.) may start the window a token early; it must still sit in the needle
        assert span is not None and tok.decode(ids[span[0] : span[1]]).strip() in t.needle
        if t.depth == 0:
            assert s == 0
        if t.depth == 100:
            assert t.prompt[e:].startswith("\nQuestion") or any(d in t.prompt[e:] for d in t.distractors)


def test_needle_token_span_exact_and_missing():
    assert niah.needle_token_span([5, 9, 1, 2, 3, 7], [1, 2, 3]) == (2, 5)
    assert niah.needle_token_span([5, 9, 1, 2, 4], [1, 2, 3]) is None


# ------------------------------------------------------------------ other generators
def test_recall_arithmetic_classification():
    rng = random.Random(1)
    for _ in range(50):
        r = recall.make_recall(rng, rng.randint(1, 10))
        assert f"{r.query_key}: {r.answer}\n" in r.prompt and r.prompt.endswith("Value:")
        p = arithmetic.make_problem(rng, "test")
        steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", p.solution)
        assert steps and all(int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) for a, op, b, c in steps)
        assert arithmetic.parse_answer(p.solution) == p.answer == int(steps[-1][3])
    for task in classification.LABELS:
        texts = {
            s: {classification.make_example(task, s, random.Random(i)).text for i in range(150)}
            for s in ("train", "test")
        }
        assert not texts["train"] & texts["test"]
        cp = classification.make_prompt(task, "test", 3, rng)
        assert cp.prompt.count("Label:") == 4 and cp.label in cp.labels


# ------------------------------------------------------------------ training data stream
@pytest.mark.parametrize("bos", ["window", "doc"])
def test_window_stream_packs_exact_windows(lm_tok, bos):
    stream = lm.WindowStream(lm_tok, 256, lm.DEFAULT_MIX, bos=bos, seed=0)
    batch = stream.batch(6)
    assert batch.shape == (6, 256) and (batch[:, 0] == lm_tok.bos_token_id).all()
    n_bos = (batch == lm_tok.bos_token_id).sum(axis=1)
    assert (n_bos == 1).all() if bos == "window" else (n_bos > 1).any()
    shares = {k: v / sum(stream.counts.values()) for k, v in stream.counts.items()}
    assert abs(shares["niah"] - lm.DEFAULT_MIX["niah"]) < 0.15


# ------------------------------------------------------------------ smoke training run
def test_smoke_training_writes_reloadable_checkpoint(tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "lm"
    assert lm.main(["--preset", "smoke", "--out", str(out), "--threads", "1"]) == 0
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_log.jsonl",
        "metrics.json",
        "MODEL_CARD.md",
    ):
        assert (out / name).is_file(), name
    model = LlamaForCausalLM.from_pretrained(str(out))
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("hello")["input_ids"][0] == tok.bos_token_id == cfg.bos_token_id
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log) and any("eval" in r for r in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6
    for key in (
        "niah_exact_match",
        "icl_0shot",
        "icl_5shot",
        "arith_accuracy",
        "classify_accuracy",
        "sink_frac_gt_0.3",
        "sink_frac_gt_0.5",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (
        len(metrics["sink_mass"]) == cfg.num_hidden_layers and len(metrics["sink_mass"][0]) == cfg.num_attention_heads
    )
    assert "--preset smoke" in (out / "MODEL_CARD.md").read_text()


def test_first_token_mass_matches_attention_weights():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (3, 20))
    mass = lm_runtime.first_token_mass(model, ids)
    assert mass.shape == (2, 4)
    lm_runtime.set_attn_implementation(model, "eager")
    att = model(input_ids=ids, output_attentions=True).attentions
    assert abs(float(att[1][:, 2, 1:, 0].mean().detach()) - mass[1, 2]) < 1e-5
    # uniform causal attention would give mean_{i=1..T-1} 1/(i+1); a trained-free model is near that
    uniform = sum(1 / (i + 1) for i in range(1, 20)) / 19
    assert abs(mass.mean() - uniform) < 0.1


def test_select_runs_prefers_runs_meeting_targets(tmp_path):
    base = dict(icl_0shot=0.3, arith_accuracy=0.1, classify_accuracy=0.5, steps=10, sink_frac_gt_0_5=0.0)
    runs = {
        "a": dict(niah_exact_match=1.0, icl_5shot=0.9, sink=0.2),
        "b": dict(niah_exact_match=0.5, icl_5shot=0.9, sink=0.9),
        "c": dict(niah_exact_match=0.95, icl_5shot=0.8, sink=0.6),
    }
    for name, r in runs.items():
        d = tmp_path / name
        d.mkdir()
        m = dict(
            base,
            niah_exact_match=r["niah_exact_match"],
            icl_5shot=r["icl_5shot"],
            score=1.0,
            **{"sink_frac_gt_0.3": r["sink"], "sink_frac_gt_0.5": 0.0, "sink_max": 0.9},
        )
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "model.safetensors").write_text("x")
    best = lm.select_runs([str(tmp_path / n) for n in runs], prune=True)
    assert best == str(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").exists() and not (tmp_path / "a" / "model.safetensors").exists()


# ------------------------------------------------------------------ the shipped organism
@pytest.mark.skipif(not shipped, reason="organism-lm not shipped yet")
def test_shipped_niah():
    m = lm_runtime.evaluate(str(BUNDLED), "niah", n=1)
    assert m["niah_exact_match"] >= 0.85 and m["niah_n"] >= 25


@pytest.mark.skipif(not shipped, reason="organism-lm not shipped yet")
def test_shipped_icl_few_shot_beats_zero_shot():
    m = lm_runtime.evaluate(str(BUNDLED), "icl", n=12)
    assert m["icl_5shot"] >= 0.6 and m["icl_5shot"] > m["icl_0shot"] + 0.1
