"""The "attention" capture site: every AttentionView statistic on the fused path equals the same statistic on the
eager path (the bridge's materialised pattern) to 1e-5, on every tiny architecture, with padding -- both ways the
fused view can answer: from q, k and the row log-sum-exp with no seq x seq matrix ("rows", forced by a zero dense
budget), and from the one weights block it keeps for a short batch ("dense", the default at these lengths)."""

from __future__ import annotations

import pytest
import torch

from attnlab import lse
from attnlab.capture import Capture, supports_fused

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The cat sat on the mat and the cat sat.", "Paris is the capital of France.", "One two three."]


def collect(model, batch, attention: str, dense: bool | None = None) -> dict:
    out: dict = {}

    def fn(layer, view, b):
        if dense is not None:
            assert view._dense == dense
        real = b.attention_mask.bool().to(view.q.device)
        first = b.first_real.to(view.q.device)
        keys = torch.stack([first, first + 1], 1)
        g = torch.Generator().manual_seed(layer)
        n = 40
        bi = torch.randint(0, b.size, (n,), generator=g)
        qi = torch.randint(0, b.seq_len, (n,), generator=g)
        ki = torch.randint(0, b.seq_len, (n,), generator=g)
        keep = real[bi, qi].cpu()
        d1, d2 = view.distance_moments()
        rows = real[:, None, :]
        stats = {
            "entropy": view.entropy(),
            "d1": d1,
            "d2": d2,
            "diag": view.diagonal(0),
            "prev": view.diagonal(1),
            "band": view.band_mass(range(0, 3)),
            "window": view.band_mass(range(1, 9)),  # wide: the block's indicator product, else the key block
            "mass_on": view.mass_on(keys),
            "colsum": view.column_sums(real),
        }
        out[layer] = {k: torch.where(rows, v, torch.zeros_like(v)).cpu() for k, v in stats.items()}
        out[layer]["pairs"] = view.pairs(bi, qi, ki).cpu()[keep]
        out[layer]["max_logit"] = view.max_logit().cpu()

    cap = Capture(model, attention=attention, progress=False)
    cap.on("attention", fn)
    with torch.inference_mode():
        cap.run_batch(batch, logit_positions=None)
    assert cap.last_path == attention
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa", "qwen2", "bert", "llava"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("block", ["rows", "dense", "no-room"])
def test_fused_view_equals_eager_view(loaded, arch, padding_side, block, monkeypatch):
    """``no-room``: the block would fit the budget but its allocation fails (a full GPU): the view streams rows."""
    model = loaded(arch)
    if not supports_fused(model):
        pytest.skip(f"{arch} does not route attention through transformers' attention interface")
    if model.modality == "vision-language":
        from PIL import Image

        ims = [Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (40, 30), (0, 0, 250))]
        batch = model.encode(["<image>\nWhat is it?", "<image> blue"], images=ims, padding_side=padding_side)
    else:
        batch = model.encode(TEXTS, padding_side=padding_side)
    if block == "rows":
        monkeypatch.setattr(lse, "DENSE_BUDGET", 0)
    if block == "no-room":

        def no_room(self):
            raise torch.OutOfMemoryError("planted: no room for the block")

        monkeypatch.setattr(lse.AttentionView, "_dense_pass", no_room)
    eager = collect(model, batch, "eager")
    fused = collect(model, batch, "fused", dense={"rows": False, "dense": True}.get(block))
    assert sorted(eager) == list(range(model.n_layers))
    for layer in eager:
        for name, want in eager[layer].items():
            got = fused[layer][name]
            tol = 1e-3 * max(1.0, float(want.abs().max())) if name in ("d2", "colsum", "max_logit") else 1e-5
            torch.testing.assert_close(got, want, atol=tol, rtol=1e-5, msg=f"{arch} layer {layer} {name}")
