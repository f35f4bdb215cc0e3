"""Parity: VAR (Kang et al., ICLR 2025) against an independent re-implementation of the reference code's documented
behaviour (``seilk/VisAttnSink``) on a plain ``transformers`` LLaVA (organism-vlm), through a registered attention
function. Reference behaviour, in its own conventions: in every forward pass, for each layer >= 2 **including the
last** and every head and text query row after the image, ``vis`` = attention on image tokens; skip if
``vis < summ = 0.2``; select if (visual-sink attention) / vis <= rho_code = 0.5 and the layer has visual sinks; in
selected rows every sink (text or visual: phi = max over sink dims of |x[d]| / RMS(x) >= tau on the hidden state
entering the layer, computed on the prompt) keeps ``p_keep`` of its weight and the freed mass goes to the visual
non-sinks in proportion. attnlab reaches it with ``p = 1 - p_keep``, ``rho = 1 - rho_code``,
``head_selection="per_forward"``, ``include_last_layer=True``.

Also: VAR edits every generated step under a KV cache; a generated token (EOS) never becomes a sink; with the
paper's tau = 20 on a small model the CLI says why nothing changes."""

from __future__ import annotations

import pytest
import torch
from parity_ref import edited_attention, load_hf

import attnlab
from attnlab.interventions.var import VAR
from attnlab.models.bundled import bundled_path

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(bundled_path("organism-vlm") is None, reason="organism-vlm not bundled"),
]
P_KEEP, RHO_CODE, SUMM, TAU = 0.6, 0.5, 0.2, 2.5


def shape_items(n_scenes: int, seed: int):
    from test_vhr_var import shape_prompts

    return shape_prompts(n_scenes, seed)


@pytest.fixture(scope="module")
def vlm():
    m = attnlab.load("organism-vlm")
    hf = load_hf(bundled_path("organism-vlm"), vlm=True)
    var = VAR(
        p=1 - P_KEEP, tau=TAU, dim_tau=4.0, rho=1 - RHO_CODE, head_selection="per_forward", include_last_layer=True
    )
    var.fit(m, shape_items(2, 1))
    assert var.sink_dims_
    return m, hf, var


def phi(x: torch.Tensor, dims) -> torch.Tensor:
    x = x.double()
    return (x[..., dims].abs() / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).amax(-1)


@torch.no_grad()
def reference_logits(hf, ids, pixel_values, image_id, dims, *, prompt_len=None, last_layer=True) -> torch.Tensor:
    """Logits of one sequence under the reference's VAR; sinks only among the first ``prompt_len`` tokens."""
    layers = hf.model.language_model.layers
    n_layers = len(layers)
    edit_layers = set(range(2, n_layers if last_layer else n_layers - 1))
    hidden: dict[int, torch.Tensor] = {}

    def grab(l):
        def hook(mod, args, kwargs):
            hidden[l] = (args[0] if args else kwargs["hidden_states"])[0]

        return hook

    handles = [layer.register_forward_pre_hook(grab(l), with_kwargs=True) for l, layer in enumerate(layers)]
    ids_t = torch.tensor(ids)
    image = ids_t == image_id
    n = len(ids)
    pl = n if prompt_len is None else prompt_len
    last_img = int(torch.nonzero(image).max())

    def edit(layer, p, module):
        if layer not in edit_layers:
            return p
        sinks = phi(hidden[layer], dims) >= TAU
        sinks[pl:] = False  # computed at prefill: generated tokens are never sinks
        vsinks = sinks & image
        if not vsinks.any():
            return p
        out = p.clone()
        vns = image & ~sinks
        for h in range(p.shape[1]):
            for i in range(last_img + 1, n):
                row = p[0, h, i].double()
                vis = float(row[image].sum())
                if vis < SUMM or float(row[vsinks].sum()) / vis > RHO_CODE or float(row[vns].sum()) <= 0:
                    continue
                new = row.clone()
                freed = (1 - P_KEEP) * row[sinks].sum()
                new[sinks] = P_KEEP * row[sinks]
                new[vns] = row[vns] + freed * row[vns] / row[vns].sum()
                out[0, h, i] = new.to(p.dtype)
        return out

    try:
        with edited_attention(hf, edit):
            return hf(input_ids=ids_t[None], pixel_values=pixel_values, use_cache=False).logits[0].float()
    finally:
        for h in handles:
            h.remove()


def encode_one(m, item):
    b = m.encode([item.text], images=[item.image])
    return b, b.input_ids[0, b.real_slice(0)].tolist()


def test_var_per_forward_with_last_layer_equals_the_reference(vlm):
    m, hf, var = vlm
    moved = 0.0
    for item in shape_items(1, 7)[:3]:
        b, ids = encode_one(m, item)
        ref = reference_logits(hf, ids, b.pixel_values[:1], m.image_token_id, var.sink_dims_)
        with var.apply(m), torch.no_grad():
            got = m.forward(b)[0, b.real_slice(0)].float()
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-4)
        with torch.no_grad():
            plain = m.forward(b)[0, b.real_slice(0)].float()
        moved = max(moved, float((ref - plain).abs().max()))
    assert moved > 1e-3


def test_fitted_heads_without_last_layer_differ_and_min_head_score_minus_one_is_per_forward(vlm):
    m, hf, var = vlm
    item = shape_items(1, 7)[0]
    b, ids = encode_one(m, item)
    ref_paper_layers = reference_logits(hf, ids, b.pixel_values[:1], m.image_token_id, var.sink_dims_, last_layer=False)
    kw = dict(p=1 - P_KEEP, tau=TAU, sink_dims=var.sink_dims_, rho=1 - RHO_CODE)
    per_forward = VAR(head_selection="per_forward", **kw).fit(m, shape_items(2, 1))
    all_heads = VAR(min_head_score=-1.0, **kw).fit(m, shape_items(2, 1))
    assert set(per_forward.heads_) == set(all_heads.heads_)
    with per_forward.apply(m), torch.no_grad():
        got = m.forward(b)[0, b.real_slice(0)].float()
    torch.testing.assert_close(got, ref_paper_layers, rtol=0, atol=2e-4)
    ref_last = reference_logits(hf, ids, b.pixel_values[:1], m.image_token_id, var.sink_dims_)
    assert (ref_last - ref_paper_layers).abs().max() > 1e-4  # the last layer carries part of the effect


def test_var_edits_every_generated_step_with_a_kv_cache(vlm):
    m, _, var = vlm
    b, _ = encode_one(m, shape_items(1, 3)[0])
    per_forward = []

    def count(mod, args, out):
        per_forward.append(sum(int(s.sum()) for s in var.last_selected.values()))

    n_new = 4
    handle = m.hf_model.register_forward_hook(count)
    try:
        with var.apply(m), torch.no_grad():
            m.hf_model.generate(
                input_ids=b.input_ids,
                attention_mask=b.attention_mask,
                pixel_values=b.pixel_values,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                use_cache=True,
                pad_token_id=m.pad_token_id,
            )
    finally:
        handle.remove()
    assert len(per_forward) == n_new  # prefill + n_new - 1 cached steps
    assert all(c > 0 for c in per_forward), per_forward  # rows edited in the prefill and in every cached step


def test_a_generated_token_never_becomes_a_sink(vlm):
    m, hf, var = vlm
    b, ids = encode_one(m, shape_items(1, 5)[0])
    eos = m.tokenizer.eos_token_id
    seq = ids + [eos]
    # make sure the appended EOS would be a sink if sinks were recomputed on every token
    hidden = {}
    layers = hf.model.language_model.layers
    hs = [
        layer.register_forward_pre_hook(
            lambda mod, a, kw, l=l: hidden.__setitem__(l, (a[0] if a else kw["hidden_states"])[0]), with_kwargs=True
        )
        for l, layer in enumerate(layers)
    ]
    with torch.no_grad():
        hf(input_ids=torch.tensor([seq]), pixel_values=b.pixel_values[:1], use_cache=False)
    for h in hs:
        h.remove()
    eos_phi = max(float(phi(hidden[l][-1], var.sink_dims_)) for l in range(2, len(layers)))
    if eos_phi < TAU:
        pytest.skip(f"EOS reaches phi {eos_phi:.2f} < tau here; nothing to test")
    prefill_only = reference_logits(hf, seq, b.pixel_values[:1], m.image_token_id, var.sink_dims_, prompt_len=len(ids))
    every_token = reference_logits(hf, seq, b.pixel_values[:1], m.image_token_id, var.sink_dims_)
    from attnlab.models.loading import Batch

    x = torch.tensor([seq])
    cont = Batch(x, torch.ones_like(x), [0], pixel_values=b.pixel_values, image_mask=x == m.image_token_id)
    with var.apply(m), torch.no_grad():
        m.forward(b)  # the prompt's prefill
        got = m.forward(cont)[0].float()  # greedy decoding without a cache: prompt + the generated EOS
    torch.testing.assert_close(got, prefill_only, rtol=0, atol=2e-4)
    assert (every_token - prefill_only).abs().max() > 1e-5


def test_cli_says_why_var_changes_nothing_at_the_papers_tau(capsys, tmp_path):
    from attnlab.cli import main

    args = ["intervene", "--model", "organism-vlm", "--method", "var", "--fit", "pope:random:20001"]
    args += ["--eval", "pope:adversarial:10000", "--n", "4", "--n-fit", "2", "--n-boot", "50", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "note: no sink dimension reaches dim_tau=20" in out.out
    assert "sqrt(d_model)=16.0" in out.out and "--param tau=" in out.out
    assert "+0.000" in out.out  # the difference it explains
    report = (tmp_path / "report.json").read_text()
    assert "no sink dimension reaches" in report
    more = ["--param", "tau=2.5", "--param", "head_selection=per_forward", "--out", str(tmp_path / "b")]
    assert main([*args[:-2], *more]) == 0
    assert "note:" not in capsys.readouterr().out  # tau and the reference's selection from the command line
