"""Example sequences per head in HeadVis's layout: a streaming, stratified sample of the sequences that drive each
head, with their sparse attention rows (HeadVis: Luger, Kamath et al., Anthropic 2026; the sampling design and the
file layout of Neuronpedia's ``compute-head-metrics.py``). ``attnlab.heads.headvis_tree`` writes the result.

For a sequence of ``L >= 2`` tokens (positions from its first real token) and head ``(l, h)`` with attention ``A``:

    max_activation = max_{q >= 1, k >= 1} A[q, k]          (position 0, the usual sink, excluded in row and column)

Sampling, per head:

1. Warmup: the max activations of the first ``W`` sequences fix ``n_intervals - 1`` equal-frequency boundaries
   (value at rank ``round(i * W / n_intervals)`` of the sorted warmup values, i = 1 .. n_intervals - 1).
2. Every later sequence goes to the interval ``#{boundaries <= max_activation}``. The top interval keeps the
   ``samples_per_top_interval`` largest (ties: the lower sequence id), the others a reservoir of
   ``samples_per_interval`` (Algorithm R: the n-th arrival replaces slot ``j`` when ``j = floor(u * n) < capacity``).
3. Each kept sequence stores, per query row, its ``sparse_topk_per_row`` largest weights that are at least
   ``sparse_threshold``, rounded to 4 decimals, as flat indices ``q * L + k``.

The 50-bin histogram and the mean of max activation cover every sequence, warmup included.

How it runs: on the capture engine's ``"rows"`` site, per batch and layer, it keeps a running max per (sequence,
head) and, for the chunks before the layer's last, each row's top-k on the rows' device (none at all for a batch of
warmup sequences); at the layer's last chunk every head's sampler says which sequences it keeps *before* any sparse
record is built, and that chunk's top-k is taken for the kept (sequence, head) pairs only. Memory stays at one
layer of one batch plus what the samplers hold. The decisions are vectorised over (sequence, head) and the records
over the heads of a sequence; Python loops run over the top interval's candidates and the kept sequences only.

Where attnlab differs from the reference code (each a parameter or a note in the tree's ``pipeline_config``):

- ``warmup="auto"``: ``W = min(2000, max(50, n // 10))`` as the reference, **capped at ``n // 2``** (at least 1)
  so that runs of fewer than 100 sequences still sample (the reference keeps no samples when ``n <= W``).
  ``pipeline_config.warmup_rule`` records the rule; an int sets ``W`` directly.
- The reservoir's random numbers: ``u`` is a hash of (seed, layer, head, sequence id) rather than the reference's
  per-bucket ``random.Random`` stream, so the sample depends on the seed and the data only, not on batch size or
  padding. The batch that completes the warmup is sampled from its first post-warmup sequence on (the reference
  skips the rest of that batch).
- Attention in float32 (the reference: bfloat16 eager attention), from the engine's rows (eager or fused path).
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch

from attnlab.heads.headvis_tree import ACTIVATION_BINS, HeadVisSamples, SampledSequence
from attnlab.params import Interval, Options
from attnlab.probes.base import Probe, ProbeContext

WARMUP_RULE_AUTO = "min(2000, max(50, n // 10)) capped at n // 2 (at least 1)"
WARMUP_RULE_FIXED = "fixed by the caller"


def auto_warmup(n: int) -> int:
    """HeadVis's warmup size for ``n`` sequences, capped at ``n // 2`` (see the module docstring)."""
    return max(1, min(2000, max(50, n // 10), n // 2))


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, layer: int, heads: np.ndarray, sequence_ids: np.ndarray) -> np.ndarray:
    """``[len(sequence_ids), len(heads)]`` uniforms in [0, 1), a pure function of (seed, layer, head, sequence)."""
    with np.errstate(over="ignore"):
        z = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        z = _mix(z ^ np.uint64(layer))
        z = _mix(z[None, :] ^ np.asarray(heads, dtype=np.uint64)[None, :])
        z = _mix(z ^ np.asarray(sequence_ids, dtype=np.uint64)[:, None])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class IntervalSampler:
    """The streaming, stratified sampler of every head (see the module docstring), vectorised over heads.

    Feed each layer's max activations with ``observe(layer, sequence_ids, maxima)`` (sequence ids ascending,
    consecutive from 0 across calls); it returns the ``(row, head)`` pairs whose record the caller must build and
    hand to ``put``. ``samples(layer, head)`` gives ``(interval, sequence_id, record)``, intervals 1-based.
    """

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        *,
        n_intervals: int,
        samples_per_interval: int,
        samples_per_top_interval: int,
        warmup: int,
        seed: int,
    ):
        self.n_layers, self.n_heads, self.n_intervals = n_layers, n_heads, n_intervals
        self.top = n_intervals - 1
        self.cap_top = (
            samples_per_top_interval if n_intervals > 1 else max(samples_per_interval, samples_per_top_interval)
        )
        self.cap = samples_per_interval
        self.warmup, self.seed = warmup, seed
        self._warm = np.zeros((warmup, n_layers, n_heads), dtype=np.float32)
        self._warm_seen = np.zeros(n_layers, dtype=np.int64)
        self._bounds: list[np.ndarray | None] = [None] * n_layers
        self.seen = np.zeros((n_layers, n_heads, n_intervals), dtype=np.int64)  # arrivals per interval
        self._heaps: list[list[list[tuple[float, int]]]] = [[[] for _ in range(n_heads)] for _ in range(n_layers)]
        self._top_min = np.full((n_layers, n_heads), -np.inf)
        self._top_rec: dict[tuple[int, int], dict[int, Any]] = {}
        self._res_rec: dict[tuple[int, int, int, int], tuple[int, Any]] = {}
        self._pending: dict[tuple[int, int], tuple] = {}

    def boundaries(self, layer: int) -> np.ndarray | None:
        """``[n_heads, n_intervals - 1]`` interval boundaries of ``layer`` once its warmup is complete."""
        return self._bounds[layer]

    def _set_bounds(self, layer: int) -> None:
        n = int(min(self._warm_seen[layer], self.warmup))
        if n == 0:
            self._bounds[layer] = np.zeros((self.n_heads, self.n_intervals - 1), dtype=np.float32)
            return
        vals = np.sort(self._warm[:n, layer, :], axis=0)  # [n, H]
        ranks = [min(int(round(i * n / self.n_intervals)), n - 1) for i in range(1, self.n_intervals)]
        self._bounds[layer] = np.ascontiguousarray(vals[ranks, :].T)  # [H, n_intervals - 1]

    def finish(self) -> None:
        """Fix the boundaries of layers whose warmup never completed (then no sequence was sampled there)."""
        for layer in range(self.n_layers):
            if self._bounds[layer] is None:
                self._set_bounds(layer)

    def observe(self, layer: int, sequence_ids: np.ndarray, maxima: np.ndarray) -> list[tuple[int, int]]:
        """Route the sequences of one batch through ``layer``'s samplers; return the ``(row, head)`` pairs kept.

        ``maxima``: ``[len(sequence_ids), n_heads]`` float32 max activations.
        """
        ids = np.asarray(sequence_ids, dtype=np.int64)
        mx = np.asarray(maxima, dtype=np.float32)
        self._pending = {}
        warm = ids < self.warmup
        if warm.any():
            self._warm[ids[warm], layer] = mx[warm]
            self._warm_seen[layer] += int(warm.sum())
        if self._bounds[layer] is None and self._warm_seen[layer] >= self.warmup:
            self._set_bounds(layer)
        rows = np.flatnonzero(~warm)
        if rows.size == 0:
            return []
        bounds = self._bounds[layer]
        if bounds is None:
            raise RuntimeError("sequence ids must be consecutive from 0: a sequence passed the warmup before it ended")
        m, sid = mx[rows], ids[rows]
        interval = np.minimum((bounds[None, :, :] <= m[:, :, None]).sum(-1), self.top)  # [P, H]
        for i in range(self.n_intervals):
            self.seen[layer, :, i] += (interval == i).sum(0)
        self._offer_top(layer, rows, sid, m, interval == self.top)
        if self.n_intervals > 1:
            self._offer_reservoirs(layer, rows, sid, interval)
        return sorted(self._pending)

    def _offer_top(self, layer, rows, sid, m, in_top) -> None:
        # a later sequence with a max no larger than the current K-th never enters (ties go to the lower id)
        cand = in_top & (m > self._top_min[layer][None, :])
        entered: dict[tuple[int, int], int] = {}  # (head, sequence) -> row, for this batch's entries
        for p, h in zip(*np.nonzero(cand)):  # row-major: each head sees its sequences in order
            h = int(h)
            heap = self._heaps[layer][h]
            entry = (float(m[p, h]), -int(sid[p]))
            if len(heap) < self.cap_top:
                heapq.heappush(heap, entry)
            elif entry > heap[0]:
                out = -heapq.heapreplace(heap, entry)[1]
                if entered.pop((h, out), None) is None:  # an entry of an earlier batch: drop its record
                    self._top_rec.get((layer, h), {}).pop(out, None)
            else:
                continue
            entered[(h, int(sid[p]))] = int(rows[p])
            if len(heap) == self.cap_top:
                self._top_min[layer, h] = heap[0][0]
        for (h, seq), row in entered.items():
            self._pending[(row, h)] = ("top", h, seq)

    def _offer_reservoirs(self, layer, rows, sid, interval) -> None:
        u = uniforms(self.seed, layer, np.arange(self.n_heads), sid)
        winners: dict[tuple[int, int, int], int] = {}
        for i in range(self.top):
            mine = interval == i
            if not mine.any():
                continue
            before = self.seen[layer, :, i] - mine.sum(0)  # arrivals before this batch
            n = before[None, :] + np.cumsum(mine, axis=0)  # 1-based arrival number
            slot = np.where(n <= self.cap, n - 1, np.floor(u * n).astype(np.int64))
            keep = mine & (slot < self.cap)
            for p, h in zip(*np.nonzero(keep)):
                winners[(int(h), i, int(slot[p, h]))] = int(p)  # a later arrival overwrites the slot
        for (h, i, s), p in winners.items():
            self._pending[(int(rows[p]), h)] = ("res", h, i, s, int(sid[p]))

    def put(self, layer: int, records: dict[tuple[int, int], Any]) -> None:
        """Store the records of the pairs ``observe`` returned (record: anything; kept as given)."""
        for key, dest in self._pending.items():
            rec = records[key]
            if dest[0] == "top":
                self._top_rec.setdefault((layer, dest[1]), {})[dest[2]] = rec
            else:
                _, h, i, s, seq = dest
                self._res_rec[(layer, h, i, s)] = (seq, rec)
        self._pending = {}

    def samples(self, layer: int, head: int) -> list[tuple[int, int, Any]]:
        """``(interval (1-based), sequence_id, record)``, intervals ascending; the top one by max activation
        (descending, ties by sequence id), the reservoirs in slot order."""
        out = []
        for i in range(self.n_intervals):
            if i == self.top:
                kept = {-e[1]: e[0] for e in self._heaps[layer][head]}
                recs = self._top_rec.get((layer, head), {})
                for seq in sorted(kept, key=lambda s: (-kept[s], s)):
                    out.append((i + 1, seq, recs[seq]))
            else:
                for s in range(self.cap):
                    hit = self._res_rec.get((layer, head, i, s))
                    if hit is not None:
                        out.append((i + 1, hit[0], hit[1]))
        return out

    def kept_sequence_ids(self) -> set[int]:
        ids = {seq for recs in self._top_rec.values() for seq in recs}
        return ids | {seq for seq, _ in self._res_rec.values()}


class HeadVisExamples(Probe):
    """Stratified example sequences of every head with sparse top-k attention rows, as HeadVis shows them.

    Parameters
    ----------
    n_intervals : int, default=5
        Activation intervals (equal-frequency over the warmup sequences).
    samples_per_interval : int, default=3
        Reservoir size of each interval but the top one.
    samples_per_top_interval : int, default=10
        Sequences kept in the top interval (the largest max activations).
    sparse_topk_per_row : int, default=8
        Keys kept per query row.
    sparse_threshold : float, default=0.005
        Weights below this are dropped from the rows (weights of exactly 0 are never stored).
    sample_seed : int, default=0
        Seed of the reservoirs.
    warmup : "auto" or int, default="auto"
        Sequences that fix the interval boundaries; "auto" is the reference's rule capped at ``n // 2``.
    n_sequences : int or None, default=None
        Sequences of at least two tokens the sweep will see (sets the "auto" warmup); None: the prompt count.

    ``results()`` gives ``headvis_mean_max_activation`` (a ``HeadScores``); ``examples()`` the ``HeadVisSamples``
    that ``attnlab.heads.headvis_tree.write_headvis_tree`` writes.
    """

    name = "headvis_examples"
    _parameter_constraints = {
        "n_intervals": [Interval(int, 1, None)],
        "samples_per_interval": [Interval(int, 1, None)],
        "samples_per_top_interval": [Interval(int, 1, None)],
        "sparse_topk_per_row": [Interval(int, 1, None)],
        "sparse_threshold": [Interval(float, 0, 1, closed="left")],
        "sample_seed": [Interval(int, None, None)],
        "warmup": [Options(("auto",)), Interval(int, 1, None)],
        "n_sequences": [Interval(int, 0, None), None],
    }

    def __init__(
        self,
        *,
        n_intervals: int = 5,
        samples_per_interval: int = 3,
        samples_per_top_interval: int = 10,
        sparse_topk_per_row: int = 8,
        sparse_threshold: float = 0.005,
        sample_seed: int = 0,
        warmup: int | str = "auto",
        n_sequences: int | None = None,
    ):
        self.n_intervals = n_intervals
        self.samples_per_interval = samples_per_interval
        self.samples_per_top_interval = samples_per_top_interval
        self.sparse_topk_per_row = sparse_topk_per_row
        self.sparse_threshold = sparse_threshold
        self.sample_seed = sample_seed
        self.warmup = warmup
        self.n_sequences = n_sequences

    def _attach(self, capture, ctx: ProbeContext) -> None:
        m = ctx.model
        n = self.n_sequences if self.n_sequences is not None else ctx.n_prompts
        self._warmup = auto_warmup(int(n)) if self.warmup == "auto" else int(self.warmup)
        self._n_layers, self._n_heads = m.n_layers, m.n_heads
        self._sampler = IntervalSampler(
            m.n_layers,
            m.n_heads,
            n_intervals=int(self.n_intervals),
            samples_per_interval=int(self.samples_per_interval),
            samples_per_top_interval=int(self.samples_per_top_interval),
            warmup=self._warmup,
            seed=int(self.sample_seed),
        )
        self._hist = np.zeros((m.n_layers, m.n_heads, ACTIVATION_BINS), dtype=np.int64)
        self._sum = np.zeros((m.n_layers, m.n_heads))
        self._count = np.zeros((m.n_layers, m.n_heads), dtype=np.int64)
        self._ids: dict[int, np.ndarray] = {}  # token ids of sequences some sampler kept
        self._n_valid = 0
        self._max_len = 0
        self._batch = None
        capture.on("rows", self._on_rows)

    # ---- per batch ---------------------------------------------------------------------------------------------

    def _start_batch(self, batch) -> None:
        self._batch = batch
        lengths = batch.lengths.cpu().numpy()
        valid = lengths >= 2
        sids = np.full(len(lengths), -1, dtype=np.int64)
        sids[valid] = self._n_valid + np.arange(int(valid.sum()))
        self._n_valid += int(valid.sum())
        if valid.any():
            self._max_len = max(self._max_len, int(lengths[valid].max()))
        self._valid_rows = np.flatnonzero(valid)
        self._sids = sids
        self._lengths = lengths
        self._first = batch.first_real.cpu().numpy()
        # a batch of warmup sequences only needs the max activations: no top-k work at all
        self._sampling = bool((sids >= self._warmup).any())

    def _on_rows(self, layer: int, rows: torch.Tensor, q_pos: torch.Tensor, batch) -> None:
        if batch is not self._batch:
            self._start_batch(batch)
        if int(q_pos[0]) == 0:  # a layer's first chunk
            self._mx = torch.zeros(rows.shape[:2], device=rows.device)
            self._chunks = []
        self._mx = torch.maximum(self._mx, self._chunk_max(rows, q_pos, batch))
        last = int(q_pos[-1]) == batch.seq_len - 1
        if self._sampling and not last:
            # rows are gone after this call: keep each row's top-k until the layer's samplers have decided
            v, i = rows.topk(min(int(self.sparse_topk_per_row), rows.shape[-1]), dim=-1)
            self._chunks.append((v, i.to(torch.int32)))
        if last:
            self._finish_layer(layer, batch, rows)

    def _chunk_max(self, rows: torch.Tensor, q_pos: torch.Tensor, batch) -> torch.Tensor:
        """``[batch, heads]`` largest weight of this chunk with query and key both past the first real token."""
        dev, t = rows.device, rows.shape[-1]
        # keys before a prompt's first real token are padding (weight 0), so the keys to search are a slice per
        # prompt (one slice for the whole batch under right padding): views, no masked copy of the rows
        firsts = self._first

        def past_first(x: torch.Tensor, f: int) -> torch.Tensor:
            return x[..., f + 1 :].amax(-1) if f + 1 < t else torch.zeros(x.shape[:-1], device=dev)

        if (firsts == firsts[0]).all():
            per_row = past_first(rows, int(firsts[0]))  # [b, h, c]
        else:
            per_row = torch.stack([past_first(rows[j], int(f)) for j, f in enumerate(firsts)])
        rel_q = q_pos[None, :] - batch.first_real.to(dev)[:, None]
        real = (rel_q >= 1) & (rel_q < batch.lengths.to(dev)[:, None])
        return torch.where(real[:, None, :], per_row, 0.0).amax(-1)

    def _finish_layer(self, layer: int, batch, rows: torch.Tensor) -> None:
        rows_ = self._valid_rows
        if rows_.size:
            mx = self._mx.float().cpu().numpy()[rows_]  # [P, H] float32
            bins = np.clip((mx * np.float32(ACTIVATION_BINS)).astype(np.int64), 0, ACTIVATION_BINS - 1)
            heads = np.broadcast_to(np.arange(self._n_heads), bins.shape)
            np.add.at(self._hist[layer], (heads.ravel(), bins.ravel()), 1)
            self._sum[layer] += mx.astype(np.float64).sum(0)
            self._count[layer] += len(rows_)
            pairs = self._sampler.observe(layer, self._sids[rows_], mx)
            if pairs:
                self._sampler.put(layer, self._records(pairs, rows_, mx, batch, rows))
        self._mx = self._chunks = None

    def _records(self, pairs, rows_, mx, batch, rows) -> dict[tuple[int, int], tuple]:
        """Sparse COO records ``(max_activation, flat int32, values float32, seq_len)`` of the kept pairs: the
        earlier chunks' stored top-k and, for these pairs only, the top-k of the layer's last chunk. Vectorised
        over the heads of each sequence."""
        dev = rows.device
        k = min(int(self.sparse_topk_per_row), rows.shape[-1])
        p_arr = np.array([p for p, _ in pairs])
        h_arr = np.array([h for _, h in pairs])
        b_arr = rows_[p_arr]
        b_idx, h_idx = torch.as_tensor(b_arr, device=dev), torch.as_tensor(h_arr, device=dev)
        if len(pairs) * 2 > rows.shape[0] * rows.shape[1]:  # most heads kept: one top-k over the chunk
            v, i = rows.topk(k, dim=-1)
            v, i = v[b_idx, h_idx], i[b_idx, h_idx]
        else:
            v, i = rows[b_idx, h_idx].topk(k, dim=-1)
        parts = [(cv[b_idx, h_idx], ci[b_idx, h_idx]) for cv, ci in self._chunks] + [(v, i.to(torch.int32))]
        vals = torch.cat([pv for pv, _ in parts], dim=1).cpu().numpy()  # [n, seq, k], queries in order
        keys = torch.cat([pi for _, pi in parts], dim=1).cpu().numpy().astype(np.int64)
        thr = float(self.sparse_threshold)
        out = {}
        for b in np.unique(b_arr):
            sub = np.flatnonzero(b_arr == b)  # this sequence's kept heads
            f, L = int(self._first[b]), int(self._lengths[b])
            w, kq = vals[sub, f : f + L], keys[sub, f : f + L] - f  # [m, L, k]: real query rows, relative keys
            keep = (w >= thr) & (w > 0) & (kq >= 0) & (kq < L)
            pi, qi, si = np.nonzero(keep)
            ki, wi = kq[pi, qi, si], w[pi, qi, si]
            order = np.lexsort((ki, qi, pi))  # by head, then (q, k)
            flat = (qi * L + ki)[order].astype(np.int32)
            values = np.round(wi[order].astype(np.float64), 4).astype(np.float32)
            ends = np.cumsum(np.bincount(pi, minlength=len(sub)))
            starts = ends - np.bincount(pi, minlength=len(sub))
            for j, n in enumerate(sub):
                p, h = int(p_arr[n]), int(h_arr[n])
                out[(p, h)] = (float(mx[p, h]), flat[starts[j] : ends[j]], values[starts[j] : ends[j]], L)
            seq = int(self._sids[b])
            if seq not in self._ids:
                self._ids[seq] = batch.input_ids[b, f : f + L].cpu().numpy().astype(np.int64)
        return out

    # ---- results -----------------------------------------------------------------------------------------------

    def examples(self, ctx: ProbeContext) -> HeadVisSamples:
        """The sampled sequences, tokens and activation histograms, ready for ``write_headvis_tree``."""
        s = self._sampler
        s.finish()
        sequences: dict[tuple[int, int], list[SampledSequence]] = {}
        for layer in range(self._n_layers):
            for head in range(self._n_heads):
                sequences[(layer, head)] = [
                    SampledSequence(seq, interval, rec[0], rec[1], rec[2], rec[3])
                    for interval, seq, rec in s.samples(layer, head)
                ]
        tok = ctx.model.tokenizer
        cache: dict[int, str] = {}

        def piece(i: int) -> str:
            if i not in cache:
                cache[i] = tok.decode([i])
            return cache[i]

        tokens = {seq: [piece(int(i)) for i in self._ids[seq]] for seq in sorted(s.kept_sequence_ids())}
        params = {
            "n_intervals": int(self.n_intervals),
            "samples_per_interval": int(self.samples_per_interval),
            "samples_per_top_interval": int(self.samples_per_top_interval),
            "sparse_topk_per_row": int(self.sparse_topk_per_row),
            "sparse_threshold": float(self.sparse_threshold),
            "sample_seed": int(self.sample_seed),
            "warmup_size": int(self._warmup),
            "warmup_rule": WARMUP_RULE_AUTO if self.warmup == "auto" else WARMUP_RULE_FIXED,
            "reservoir_rng": "splitmix64 hash of (seed, layer, head, sequence_id) (attnlab)",
        }
        return HeadVisSamples(
            n_layers=self._n_layers,
            n_heads=self._n_heads,
            sequences=sequences,
            tokens=tokens,
            histogram=self._hist.copy(),
            max_activation_sum=self._sum.copy(),
            max_activation_count=self._count.copy(),
            params=params,
            n_sequences=self._n_valid,
            max_seq_len=self._max_len,
        )

    def results(self, ctx: ProbeContext):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self._count > 0, self._sum / np.maximum(self._count, 1), np.nan)
        return [
            self.head_scores(
                ctx,
                "headvis_mean_max_activation",
                mean,
                description="mean over sequences of the largest attention weight off position 0 (HeadVis)",
                summary={"n_sequences": self._n_valid, "warmup_size": self._warmup},
            )
        ]
