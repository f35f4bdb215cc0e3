"""organism-sink: smoke training + reload, and the extreme-token ground truth on the shipped checkpoints.

Ground truth (issue #15, Guo et al. 2024, arXiv 2410.13835): trained with Adam on Bigram-Backcopy, the model's
backcopy head is *dormant* at ordinary positions (> 0.9 of its attention on BOS) and *active* at trigger positions
(mostly on the previous token, which it copies); BOS's value state is drained and its residual state peaks. The
SGD control (organism-sink-sgd) learns the task without the sink, the drain or the peak.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
from attnlab.capture import Capture
from attnlab.datasets.bigram_backcopy import BigramBackcopy, bigram_backcopy_prompts
from attnlab.models import sink as sink_runtime
from attnlab.models.training import sink

BUNDLED = Path(sink.__file__).resolve().parents[1] / "bundled"
ADAM, SGD = BUNDLED / "organism-sink", BUNDLED / "organism-sink-sgd"
shipped = pytest.mark.skipif(not (ADAM / "config.json").is_file(), reason="organism-sink not shipped")
shipped_sgd = pytest.mark.skipif(not (SGD / "config.json").is_file(), reason="organism-sink-sgd not shipped")
# thresholds measured on the shipped checkpoints (MODEL_CARD.md): the dormant heads' BOS mass is 0.92 / 0.91 (0.928 /
# 0.908 on the card's 256 sequences), their BOS value 0.27 / 0.20 of the mean, BOS's residual norm 2.0x the median
DORMANT_MIN, DRAIN_MAX, PEAK_MIN = 0.88, 0.35, 1.5


def probes():
    """The probes of the ground truth. Massive activations with thresholds for a 64-wide model (the paper's 100 and
    1000x the vector's median entry are a 4096-wide model's): BOS's largest entry is ~13x its median, others' ~5x."""
    from attnlab.probes.massive_activations import MassiveActivations

    return ["first_token_sink", "domain_sink", "value_drain", "residual_norms", MassiveActivations(ratio_threshold=10)]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_smoke_training_writes_outputs_and_reloads(tmp_path):
    assert sink.main(["--preset", "smoke", "--out", str(tmp_path), "--max-steps", "4"]) == 0
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "bigram_backcopy.json",
        "bigram_backcopy.safetensors",
        "train_log.jsonl",
        "metrics.json",
        "MODEL_CARD.md",
    ):
        assert (tmp_path / name).is_file(), name
    task = BigramBackcopy.load(tmp_path)
    model = attnlab.load(str(tmp_path))
    assert model.tokens_as_text(task.trigger_ids) == [f"T{i}" for i in range(len(task.triggers))]
    prompts = bigram_backcopy_prompts(model, 2, seed=0, seq_len=16)
    assert prompts.token_ids[0][0] == task.bos_id and prompts.meta[0]["domain_label"] == "trigger"
    m = sink_runtime.evaluate(str(tmp_path), "backcopy", n=4)
    assert set(m) >= {"copy_acc", "n_trigger_positions"}
    assert "python -m attnlab.models.train sink" in (tmp_path / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="unknown task"):
        sink_runtime.evaluate(str(tmp_path), "niah")


def previous_token_at_triggers(model, prompts) -> np.ndarray:
    """``[layers, heads]``: mean attention from trigger rows to the previous token (query i -> key i - 1)."""
    task = BigramBackcopy.load(model.path)
    num = np.zeros((model.n_layers, model.n_heads))
    den = 0
    cap = Capture(model, attention="eager", progress=False)

    def on_rows(layer, rows, q_pos, batch):
        nonlocal den
        trig = torch.from_numpy(task.trigger_mask(batch.input_ids.numpy()))[:, q_pos] & (q_pos > 0)
        b, c = torch.nonzero(trig, as_tuple=True)
        prev = rows[b, :, c, q_pos[c] - 1]  # [n, heads]
        num[layer] += prev.sum(0).numpy()
        den += len(b) if layer == 0 else 0

    cap.on("rows", on_rows)
    ids = prompts.token_ids
    cap.run([model.batch_from_ids(ids, list(range(len(ids))))])
    return num / den


@pytest.fixture(scope="module")
def adam():
    model = attnlab.load("organism-sink")
    prompts = bigram_backcopy_prompts(model, 32, seed=7)
    res = attnlab.scan(model, probes(), prompts, progress=False)
    return model, res, previous_token_at_triggers(model, prompts)


@shipped
def test_shipped_model_learns_the_task():
    big, copy = sink_runtime.evaluate(str(ADAM), "bigram", n=64), sink_runtime.evaluate(str(ADAM), "backcopy", n=64)
    assert copy["copy_acc"] > 0.98
    assert big["bigram_excess_loss"] < 0.1  # within 0.1 nats of the chain's own entropy
    assert big["bigram_loss"] < 0.8 * big["uniform_loss"]


@shipped
def test_cli_eval_re_measures_both_tasks(capsys):
    from attnlab.cli import main

    assert main(["eval", "organism-sink", "--task", "backcopy", "--n", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["copy_acc"] > 0.9
    assert main(["eval", "organism-sink", "--task", "bigram", "--n", "16"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["bigram_loss"] > m["bigram_oracle_loss"] - 0.05 and m["n_bigram_positions"] > 0


def _copy_heads(prev: np.ndarray) -> list[tuple[int, int]]:
    """Heads that attend to the previous token at trigger rows (> 0.9): the backcopy heads."""
    return [tuple(int(x) for x in hd) for hd in np.argwhere(prev > 0.9)]


@shipped
def test_backcopy_heads_are_dormant_on_bos_and_active_on_the_previous_token(adam):
    model, res, prev = adam
    off, on = res["domain_sink_not_trigger"].scores, res["domain_sink_trigger"].scores
    print(f"\nBOS mass, ordinary / trigger rows:\n{off.round(3)}\n{on.round(3)}\nprev@trigger:\n{prev.round(3)}")
    heads = _copy_heads(prev)
    assert heads, "no head copies the previous token at triggers"
    for hd in heads:
        assert off[hd] > DORMANT_MIN  # dormant: parked on BOS at ordinary positions
        assert on[hd] < 0.05  # active: off BOS at triggers, on the previous token (prev > 0.9)
    # the probe's active-dormant ranking finds them: the largest gaps are exactly the backcopy heads
    gap = res["domain_sink_gap_trigger"].scores
    top = [tuple(int(x) for x in hd) for hd in np.argwhere(gap > 0.5)]
    assert sorted(top) == sorted(heads)


@shipped
def test_bos_value_drain_and_residual_peak(adam):
    model, res, prev = adam
    heads = _copy_heads(prev)
    drain = res["value_drain"].scores
    print(f"\nvalue drain:\n{drain.round(3)}")
    for hd in heads:
        assert drain[hd] < DRAIN_MAX  # BOS's value norm a small fraction of the mean
    others = res["domain_sink_not_trigger"].scores < 0.2  # heads that are a sink nowhere
    assert others.any() and np.all(drain[others] > 2 * max(drain[hd] for hd in heads))
    layers = res["residual_norms_0"].summary["layers"]
    print("BOS residual norm / median:", [round(x["first_token_ratio"], 2) for x in layers])
    assert layers[0]["first_token_ratio"] > PEAK_MIN
    massive = res["massive_activations_0"].summary
    print("massive activations:", massive["massive_tokens"], [x["max_abs"] for x in massive["layers"]])
    n = 32 * model.n_layers  # every prompt, every layer
    assert massive["massive_tokens"] == {"<|bos|>": n}  # BOS and nothing else


@shipped_sgd
def test_sgd_control_learns_the_task_without_sink_or_peak():
    model = attnlab.load("organism-sink-sgd")
    prompts = bigram_backcopy_prompts(model, 32, seed=7)
    res = attnlab.scan(model, probes(), prompts, progress=False)
    copy = sink_runtime.evaluate(str(SGD), "backcopy", n=64)
    assert copy["copy_acc"] > 0.9  # it learns the task ...
    off = res["domain_sink_not_trigger"].scores
    print(f"\nSGD BOS mass, ordinary rows:\n{off.round(3)}\nvalue drain:\n{res['value_drain'].scores.round(3)}")
    assert np.nanmax(off) < 0.2  # ... with no head parked on BOS
    layers = res["residual_norms_0"].summary["layers"]
    assert max(x["first_token_ratio"] for x in layers) < PEAK_MIN
    assert res["massive_activations_0"].summary["massive_tokens"] == {}
    # BOS's value is below the mean under SGD too (0.20-0.38, MODEL_CARD): the drain alone does not separate the
    # two optimisers on this task, so it is reported, not asserted
