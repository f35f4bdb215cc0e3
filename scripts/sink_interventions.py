"""Sink interventions where they must act: ZeroTuning and ACT on organism-sink's backcopy head (issue #15).

organism-sink's backcopy heads are *dormant* at ordinary positions (its attention parked on BOS, whose value is a
drain) and *active* at trigger positions (previous token, copied). So, per the active-dormant mechanism
(Guo et al. 2024, arXiv 2410.13835):

- ZeroTuning with gamma > 1 on that head **at trigger positions only** pushes attention onto BOS -> the head stops
  copying -> copy accuracy must fall;
- ZeroTuning with gamma < 1 **at ordinary positions only** pulls attention off BOS onto real tokens -> the head
  writes other tokens' values into a bigram prediction -> the bigram loss must rise;
- the same scaling on a head that is not a sink changes much less (control: every non-sink head, one at a time);
- ACT (hidden-sink calibration, every head): measured, whatever it does.

ZeroTuning multiplies the first-token weight by gamma, i.e. adds ``ln(gamma)`` to its logit (the ``bias`` form,
used here because it stays exact at any gamma). A head that has saturated its attention (a BOS logit tens of nats
above or below the rest) moves only once ``|ln gamma|`` approaches that gap, so gammas are given as ``ln(gamma)``
and the script reports the target heads' logit gaps: ``s_0 - logsumexp_{j>0} s_j`` per query row.

For every condition: copy accuracy at trigger positions and loss at bigram positions on held-out sequences
(per-sequence values, paired bootstrap 95% intervals of the change), and the ``domain_sink`` probe's first-token
mass of the target heads at trigger / ordinary positions with the intervention applied (that the intervention
moved the attention it claims to move).

    python scripts/sink_interventions.py --model organism-sink --out /tmp/sink_interventions.json
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def per_sequence(model, task, ids: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Copy accuracy at trigger positions and mean NLL at bigram positions, one value per sequence."""
    copy, loss = [], []
    trig_all = task.trigger_mask(ids)[:, :-1]
    big_all = task.bigram_mask(ids)[:, :-1]
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            chunk = ids[s : s + batch_size]
            batch = model.batch_from_ids(chunk.tolist(), list(range(s, s + len(chunk))))
            logits = model.forward(batch).float().cpu()
            lp = logits[:, :-1].log_softmax(-1)
            tgt = torch.from_numpy(chunk[:, 1:])
            nll = -lp.gather(-1, tgt[..., None])[..., 0].numpy()
            hit = (lp.argmax(-1) == tgt).numpy()
            trig, big = trig_all[s : s + batch_size], big_all[s : s + batch_size]
            for b in range(len(chunk)):
                copy.append(hit[b][trig[b]].mean() if trig[b].any() else np.nan)
                loss.append(nll[b][big[b]].mean())
    return np.asarray(copy), np.asarray(loss)


def logit_gaps(model, ids: np.ndarray, task, head) -> dict[str, list[float]]:
    """5/50/95% quantiles of ``s_0 - logsumexp_{j>0} s_j`` (pre-softmax, causal keys) of one head, by row kind."""
    from attnlab.hooks import attn_hook

    layer, h = head
    seen = {}

    def keep(scores, hook=None):
        seen["s"] = scores[:, h].detach().float().cpu()

    batch = model.batch_from_ids(ids.tolist(), list(range(len(ids))))
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(attn_hook(layer, "hook_attn_scores"), keep)]):
        model.forward(batch)
    s = seen["s"]  # [b, q, k], masked keys at a huge negative value
    gap = (s[..., 0] - torch.logsumexp(s[..., 1:], dim=-1)).numpy()  # row 0 has no other key: -inf there
    trig = task.trigger_mask(ids)
    ordinary = ~trig & (ids != task.bos_id)
    q = lambda x: [round(float(v), 1) for v in np.percentile(x, [5, 50, 95])]  # noqa: E731
    return {"trigger": q(gap[trig]), "ordinary": q(gap[ordinary])}


def resid_norms(model, ids: np.ndarray, task, layer: int) -> dict[str, float]:
    """Mean residual-stream norm entering ``layer`` at BOS, trigger and ordinary positions."""
    from attnlab.hooks import block_hook

    seen = {}
    batch = model.batch_from_ids(ids.tolist(), list(range(len(ids))))
    hook = (block_hook(layer, "hook_resid_pre"), lambda x, hook=None: seen.__setitem__("x", x.detach().float().cpu()))
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[hook]):
        model.forward(batch)
    norms = seen["x"].norm(dim=-1).numpy()
    trig = task.trigger_mask(ids)
    ordinary = ~trig & (ids != task.bos_id)
    return {
        "bos": float(norms[:, 0].mean()),
        "trigger": float(norms[trig].mean()),
        "ordinary": float(norms[ordinary].mean()),
    }


def head_share(model, ids: np.ndarray, task, layer: int) -> dict[str, float]:
    """Mean ``||attn_out|| / ||resid_pre||`` of ``layer`` (one head per layer: the head's own write) at trigger and
    ordinary positions: how much the head's output can move the residual stream where it is written."""
    from attnlab.hooks import block_hook

    seen = {}
    batch = model.batch_from_ids(ids.tolist(), list(range(len(ids))))
    keep = lambda key: lambda x, hook=None: seen.__setitem__(key, x.detach().float().cpu())  # noqa: E731
    hooks = [(block_hook(layer, "hook_resid_pre"), keep("pre")), (block_hook(layer, "hook_attn_out"), keep("out"))]
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=hooks):
        model.forward(batch)
    ratio = (seen["out"].norm(dim=-1) / seen["pre"].norm(dim=-1).clamp_min(1e-30)).numpy()
    trig = task.trigger_mask(ids)
    ordinary = ~trig & (ids != task.bos_id)
    return {"trigger": float(ratio[trig].mean()), "ordinary": float(ratio[ordinary].mean())}


def copy_by_position(model, task, ids: np.ndarray, tail: int) -> dict[str, float]:
    """Copy accuracy at trigger positions among the last ``tail`` positions of a sequence vs the earlier ones."""
    batch = model.batch_from_ids(ids.tolist(), list(range(len(ids))))
    with torch.no_grad():
        pred = model.forward(batch).float().argmax(-1).cpu().numpy()[:, :-1]
    hit = pred == ids[:, 1:]
    trig = task.trigger_mask(ids)[:, :-1]
    late = np.zeros_like(trig)
    late[:, -tail:] = True
    return {"late": float(hit[trig & late].mean()), "early": float(hit[trig & ~late].mean())}


def sink_masses(model, prompts, trigger_ids) -> dict[str, np.ndarray]:
    """First-token mass per head at trigger / other positions (the ``domain_sink`` probe), with whatever is applied."""
    import attnlab
    from attnlab.probes.domain_sink import DomainSink

    res = attnlab.scan(model, [DomainSink(tokens=trigger_ids, label="trigger")], prompts, progress=False)
    return {"trigger": res["domain_sink_trigger"].scores, "ordinary": res["domain_sink_not_trigger"].scores}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism-sink")
    ap.add_argument("--n", type=int, default=256, help="held-out sequences")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1234, help="sequence seed (the training stream never uses it)")
    ap.add_argument("--log-gammas-up", default="3,10,30,60,100,200", help="ln(gamma) > 0 at trigger positions")
    ap.add_argument("--log-gammas-down", default="-3,-10,-30,-60,-100", help="ln(gamma) < 0 at ordinary positions")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write every number as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import attnlab
    from attnlab.datasets.base import PromptSet
    from attnlab.datasets.bigram_backcopy import task_of
    from attnlab.interventions.act import ACT
    from attnlab.interventions.evaluate import paired_bootstrap
    from attnlab.interventions.zerotuning import ZeroTuning

    t0 = time.perf_counter()
    model = attnlab.load(args.model)
    task = task_of(model)
    trig = task.trigger_ids
    ids = task.sample(args.n, args.seq_len, np.random.default_rng(args.seed))
    probe_prompts = PromptSet(name="bb-probe", token_ids=ids[:64].tolist())

    # which head is the backcopy head, which heads are not sinks: read off the probe on the clean model
    clean_mass = sink_masses(model, probe_prompts, trig)
    gap = clean_mass["ordinary"] - clean_mass["trigger"]
    targets = [(int(l), int(h)) for l, h in np.argwhere(gap > 0.5)]  # every active-dormant (backcopy) head
    non_sinks = [
        (l, h)
        for l in range(model.n_layers)
        for h in range(model.n_heads)
        if (l, h) not in targets and clean_mass["ordinary"][l, h] < 0.5 and clean_mass["trigger"][l, h] < 0.5
    ]
    label = lambda heads: "+".join(f"L{l}H{h}" for l, h in heads)  # noqa: E731
    base_copy, base_loss = per_sequence(model, task, ids)
    print(
        f"{args.model}: backcopy heads {label(targets)} (first-token mass ordinary "
        f"{[round(float(clean_mass['ordinary'][t]), 3) for t in targets]}, trigger "
        f"{[round(float(clean_mass['trigger'][t]), 3) for t in targets]}); non-sink heads "
        f"{', '.join(f'L{l}H{h}' for l, h in non_sinks) or 'none'}; baseline copy {np.nanmean(base_copy):.3f}, "
        f"bigram loss {base_loss.mean():.3f}",
        flush=True,
    )

    def measure(name: str, iv, heads) -> dict:
        iv.fit(model)
        with iv.apply(model):
            copy, loss = per_sequence(model, task, ids)
            mass = sink_masses(model, probe_prompts, trig)
        ok = ~np.isnan(base_copy) & ~np.isnan(copy)
        row = {
            "condition": name,
            "head": None if heads is None else label(heads),
            "copy": paired_bootstrap(base_copy[ok], copy[ok], n_boot=args.n_boot, seed=args.seed),
            "bigram_loss": paired_bootstrap(base_loss, loss, n_boot=args.n_boot, seed=args.seed),
        }
        if heads is not None:  # mean over the scaled heads
            pick = lambda grid: float(np.mean([grid[hd] for hd in heads]))  # noqa: E731
            row["first_token_mass"] = {
                "trigger_before": pick(clean_mass["trigger"]),
                "trigger_after": pick(mass["trigger"]),
                "ordinary_before": pick(clean_mass["ordinary"]),
                "ordinary_after": pick(mass["ordinary"]),
            }
        else:
            row["first_token_mass"] = {
                "trigger_before_mean": float(np.nanmean(clean_mass["trigger"])),
                "trigger_after_mean": float(np.nanmean(mass["trigger"])),
                "ordinary_before_mean": float(np.nanmean(clean_mass["ordinary"])),
                "ordinary_after_mean": float(np.nanmean(mass["ordinary"])),
                "max_abs_change": float(
                    max(
                        np.nanmax(np.abs(mass["trigger"] - clean_mass["trigger"])),
                        np.nanmax(np.abs(mass["ordinary"] - clean_mass["ordinary"])),
                    )
                ),
            }
        c, b = row["copy"], row["bigram_loss"]
        print(
            f"  {name:<44} {row['head'] or 'all':<9} copy {c['intervened']:.3f} ({c['diff']:+.3f} "
            f"[{c['diff_lo']:+.3f}, {c['diff_hi']:+.3f}])  bigram loss {b['intervened']:.3f} ({b['diff']:+.3f} "
            f"[{b['diff_lo']:+.3f}, {b['diff_hi']:+.3f}])  first-token mass {row['first_token_mass']}",
            flush=True,
        )
        return row

    gaps = {label([hd]): logit_gaps(model, ids[:64], task, hd) for hd in [*targets, *non_sinks]}
    for name, g in gaps.items():
        print(f"  BOS logit gap of {name} (s_0 - logsumexp of the other keys), quantiles 5/50/95%: {g}", flush=True)
    norms = {f"layer {l}": resid_norms(model, ids[:64], task, l) for l in sorted({l for l, _ in targets})}
    print(f"  residual norm entering the backcopy heads' layers: {norms}", flush=True)
    # why moving the dormant heads off BOS at ordinary rows may not matter: how large their write is next to the
    # residual stream there, clean and with the attention moved off BOS (the largest ln(gamma) < 0 asked for)
    lg_min = min(float(x) for x in args.log_gammas_down.split(","))
    share = {"clean": {f"L{l}": head_share(model, ids[:64], task, l) for l, _ in targets}}
    iv = ZeroTuning(math.exp(lg_min), targets, form="bias", query_tokens=trig, query_mode="not_in").fit(model)
    with iv.apply(model):
        moved = {f"L{l}": head_share(model, ids[:64], task, l) for l, _ in targets}
    share[f"ln(gamma)={lg_min:+g} at ordinary"] = moved
    print(f"  ||attn_out|| / ||resid_pre|| of the backcopy heads' layers: {share}", flush=True)
    rows = []
    for direction, arg, mode in (("triggers", args.log_gammas_up, "in"), ("ordinary", args.log_gammas_down, "not_in")):
        for lg in [float(x) for x in arg.split(",")]:
            for heads in [targets, *([hd] for hd in non_sinks)]:
                kind = "backcopy" if heads == targets else "control"
                iv = ZeroTuning(math.exp(lg), heads, form="bias", query_tokens=trig, query_mode=mode)
                row = measure(f"ZeroTuning ln(gamma)={lg:+g} at {direction} ({kind})", iv, heads)
                row["log_gamma"], row["positions"] = lg, direction
                rows.append(row)
    all_heads = [(l, h) for l in range(model.n_layers) for h in range(model.n_heads)]
    for name, iv, heads in (
        ("ACT beta=0.4 threshold=0.1, every head", ACT(all_heads), None),
        ("ACT beta=0.4 threshold=0.1, backcopy heads", ACT(targets), targets),
    ):
        row = measure(name, iv, heads)
        with iv.apply(model):  # where ACT's copy errors sit: triggers in the last 8 positions vs the rest
            row["copy_by_position"] = copy_by_position(model, task, ids, tail=8)
        row["copy_by_position_baseline"] = copy_by_position(model, task, ids, tail=8)
        print(f"    copy by trigger position: {row['copy_by_position']} (clean {row['copy_by_position_baseline']})")
        rows.append(row)

    out = {
        "model": args.model,
        "n_sequences": args.n,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "backcopy_heads": label(targets),
        "non_sink_heads": [f"L{l}H{h}" for l, h in non_sinks],
        "baseline": {"copy": float(np.nanmean(base_copy)), "bigram_loss": float(base_loss.mean())},
        "head_write_share": share,
        "clean_first_token_mass": {k: v.tolist() for k, v in clean_mass.items()},
        "bos_logit_gaps": gaps,
        "resid_norms_entering_backcopy_layer": norms,
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.out:
        from attnlab.heads.io import write_json

        write_json(args.out, out)
    print(f"done in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
