"""Parity: ZeroTuning (Han et al. 2025) in both forms against an independent computation on plain
``transformers`` (a registered attention function): the softmax form rescales each selected head's post-softmax row
``a0' = gamma a0 / D, aj' = aj / D, D = (gamma - 1) a0 + 1``; the bias form adds ``ln(gamma)`` to the initial key's
pre-softmax score. Both give the same logits. gamma <= 0 is refused (NaN logits in the softmax form, broken
causality in the bias form)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHORT_SENTENCES
from parity_ref import edited_attention, load_hf, logits

from attnlab.cli import main
from attnlab.interventions.zerotuning import ZeroTuning, zerotune_pattern, zerotune_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def heads_of(m):
    return [(l, h) for l in range(m.n_layers) for h in range(m.n_heads) if h % 2 == l % 2]


def reference_logits(hf, ids, heads, gamma, form):
    def edit(layer, p, module):
        if form != "softmax":
            return p
        out = p.clone()
        for l, h in heads:
            if l == layer:
                a0 = p[0, h, :, 0]
                d = (gamma - 1.0) * a0 + 1.0
                out[0, h] = p[0, h] / d[:, None]
                out[0, h, :, 0] = gamma * a0 / d
        return out

    def bias(layer, s, module):
        if form != "bias":
            return s
        s = s.clone()
        for l, h in heads:
            if l == layer:
                s[0, h, :, 0] += math.log(gamma)
        return s

    with edited_attention(hf, edit, before_softmax=bias):
        return logits(hf, ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2"])
@pytest.mark.parametrize("form", ["softmax", "bias"])
@pytest.mark.parametrize("gamma", [0.3, 2.5])
def test_zerotuning_logits_equal_the_reference(loaded, checkpoint_dir, arch, form, gamma):
    m = loaded(arch)
    hf = load_hf(checkpoint_dir / arch)
    heads = heads_of(m)
    zt = ZeroTuning(gamma=gamma, heads=heads, form=form).fit(m)
    ids = m.token_ids(SHORT_SENTENCES[1])
    ref = reference_logits(hf, ids, heads, gamma, form)
    with zt.apply(m), torch.no_grad():
        got = m.forward(m.batch_from_ids([ids], [0]))[0].float()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)
    assert (ref - logits(hf, ids)).abs().max() > 1e-3
    other = reference_logits(hf, ids, heads, gamma, "bias" if form == "softmax" else "softmax")
    torch.testing.assert_close(ref, other, rtol=0, atol=2e-4)  # the two forms agree


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan")])
def test_gamma_not_above_zero_is_refused(loaded, gamma):
    m = loaded("llama-gqa")
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        ZeroTuning(gamma=gamma, heads=[(0, 0)]).fit(m)
    p = torch.softmax(torch.randn(1, 1, 3, 3), -1)
    with pytest.raises(ValueError):
        zerotune_pattern(p, torch.zeros(1, dtype=torch.long), gamma)
    with pytest.raises(ValueError):
        zerotune_scores(torch.randn(1, 1, 3, 3), torch.zeros(1, dtype=torch.long), gamma)


def test_gamma_zero_from_the_cli_is_one_line_and_exit_2(checkpoint_dir, capsys, tmp_path):
    code = main(
        [
            "intervene",
            "--model",
            str(checkpoint_dir / "llama-gqa"),
            "--method",
            "zerotuning",
            "--param",
            "gamma=0",
            "--param",
            "heads=[[0,0]]",
            "--eval",
            "classify:sentiment:test",
            "--n",
            "2",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("attnlab:")]
    assert code == 2 and "Traceback" not in err
    assert len(ours) == 1 and "gamma must be a finite number > 0" in ours[0]
