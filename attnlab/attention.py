"""Attention patterns for a notebook: one head, a grid of heads, and two prompts compared.

    attnlab.pattern(model, "The cat sat on the mat.", "L1H3")          # one head, any length, windowed
    attnlab.patterns(model, prompt, layer=1)                           # every head of a layer (a grid)
    attnlab.patterns(model, prompt, heads=["L1H3", "L3H10"])           # chosen heads
    attnlab.compare_patterns(model, prompt_a, prompt_b, heads=["L1H3"])  # same heads, two prompts, difference

Rows come from the capture engine's ``"rows"`` site (``attnlab.capture``), so a long prompt is handled like a
scan: only the asked query rows are kept, chunk by chunk, and on the fused path memory grows with the window times
the prompt length, never with its square. Results are typed (``AttentionPatterns``, ``PatternComparison``), with
``plot()``, ``to_frame()``, a short ``repr`` and an HTML view in notebooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnlab.errors import AttnlabError

HeadLike = tuple[int, int] | str


def _head(model, head: HeadLike) -> tuple[int, int]:
    from attnlab.heads.formats import parse_head

    if isinstance(head, str):
        try:
            layer, h = parse_head(head)
        except Exception:
            raise AttnlabError(f"{head!r} is not a head (write it as L3H7 or (3, 7))") from None
    else:
        try:
            layer, h = (int(x) for x in head)
        except (TypeError, ValueError):
            raise AttnlabError(f"{head!r} is not a head (write it as L3H7 or (3, 7))") from None
    if not (0 <= layer < model.n_layers and 0 <= h < model.n_heads):
        raise AttnlabError(f"{model.name} has no head L{layer}H{h} ({model.n_layers} layers x {model.n_heads} heads)")
    return layer, h


def _heads(model, layer: int | None, heads: Sequence[HeadLike] | None) -> list[tuple[int, int]]:
    if (layer is None) == (heads is None):
        raise AttnlabError("give a layer (all its heads) or a list of heads")
    if layer is not None:
        if not 0 <= int(layer) < model.n_layers:
            raise AttnlabError(f"{model.name} has no layer {layer} ({model.n_layers} layers)")
        return [(int(layer), h) for h in range(model.n_heads)]
    out = [_head(model, h) for h in heads]
    if not out:
        raise AttnlabError("no heads given")
    return list(dict.fromkeys(out))


def _encode(model, prompt, image=None):
    """The batch of one prompt (text, token ids, or text with an image for a vision-language model)."""
    if image is not None:
        if not isinstance(prompt, str):
            raise AttnlabError("an image prompt needs its text (with the image placeholder)")
        return model.encode([prompt], images=[image])
    if isinstance(prompt, str):
        return model.batch_from_ids([model.token_ids(prompt)], [0])
    ids = [int(t) for t in prompt]
    if not ids:
        raise AttnlabError("the prompt is empty")
    return model.batch_from_ids([ids], [0])


def attention_rows(
    model,
    prompt,
    heads: Sequence[tuple[int, int]],
    *,
    window: tuple[int, int] | None = None,
    image=None,
    attention: str = "auto",
) -> tuple[np.ndarray, list[str], int, int]:
    """``(weights [n_heads_asked, stop - start, n_keys], tokens, start, stop)``: the asked heads' attention rows for
    query positions ``start .. stop - 1`` of one prompt (keys: the whole prompt; a causal row is 0 past its query).
    """
    import torch

    from attnlab.capture import Capture

    batch = _encode(model, prompt, image)
    n = int(batch.lengths[0])
    start, stop = (0, n) if window is None else (int(window[0]), int(window[1]))
    start, stop = max(0, start + (n if start < 0 else 0)), min(n, stop + (n if stop < 0 else 0))
    if not 0 <= start < stop <= n:
        raise AttnlabError(f"the window {window} holds no query of the prompt's {n} tokens")
    layers = sorted({layer for layer, _ in heads})
    want = {layer: [h for l, h in heads if l == layer] for layer in layers}
    out: dict[tuple[int, int], np.ndarray] = {}
    rows_of: dict[int, list] = {layer: [] for layer in layers}

    def keep(layer, rows, q_pos, b):  # rows [batch, heads, chunk, seq] (float32, padding keys zero)
        rows_of[layer].append((q_pos.cpu(), rows[0, want[layer]].detach().float().cpu()))

    first = int(batch.first_real[0])
    queries = torch.arange(first + start, first + stop)
    cap = Capture(model, attention=attention, progress=False)
    cap.on("rows", keep, layers=layers, queries=lambda b: queries)
    with torch.inference_mode():
        cap.run_batch(batch, logit_positions=None)
    for layer in layers:
        got = sorted(rows_of[layer], key=lambda x: int(x[0][0]))
        rows = torch.cat([r for _, r in got], dim=1)[:, :, first : first + n].numpy()  # [asked, queries, keys]
        for i, h in enumerate(want[layer]):
            out[(layer, h)] = rows[i]
    ids = batch.input_ids[0, batch.real_slice(0)].tolist()
    return np.stack([out[h] for h in heads]).astype(np.float32), model.tokens_as_text(ids), start, stop


@dataclass
class AttentionPatterns:
    """Attention of some heads on one prompt: ``weights[i]`` is head ``heads[i]``'s ``[query, key]`` rows for queries
    ``query_start .. query_stop - 1`` (keys: the whole prompt)."""

    weights: np.ndarray
    tokens: list[str]
    heads: list[tuple[int, int]]
    model: str = ""
    query_start: int = 0
    query_stop: int = 0

    def __post_init__(self) -> None:
        if not self.query_stop:
            self.query_stop = self.query_start + self.weights.shape[1]

    @property
    def labels(self) -> list[str]:
        return [f"L{l}H{h}" for l, h in self.heads]

    def __getitem__(self, head: HeadLike) -> np.ndarray:
        from attnlab.heads.formats import parse_head

        key = parse_head(head) if isinstance(head, str) else (int(head[0]), int(head[1]))
        if key not in self.heads:
            raise KeyError(f"L{key[0]}H{key[1]} is not among {', '.join(self.labels)}")
        return self.weights[self.heads.index(key)]

    def full(self, head: HeadLike) -> np.ndarray:
        """``[n_tokens, n_tokens]`` pattern of one head, the rows outside the window left at 0 (for figures)."""
        n = len(self.tokens)
        out = np.zeros((n, n), dtype=np.float32)
        out[self.query_start : self.query_stop] = self[head]
        return out

    def to_frame(self):
        """Long form: one row per (head, query, key) with the tokens and the weight."""
        import pandas as pd

        h, qi, k = np.meshgrid(
            np.arange(len(self.heads)), np.arange(self.weights.shape[1]), np.arange(len(self.tokens)), indexing="ij"
        )
        q = qi + self.query_start
        return pd.DataFrame(
            {
                "head": [self.labels[i] for i in h.ravel()],
                "query": q.ravel(),
                "query_token": [self.tokens[i] for i in q.ravel()],
                "key": k.ravel(),
                "key_token": [self.tokens[i] for i in k.ravel()],
                "weight": self.weights.ravel(),
            }
        )

    def plot(self, *, cols: int | None = None, max_size: int = 96, title: str | None = None):
        """One head: the query x key heatmap (``figures.attention_pattern``); several: a grid of them, one panel
        per head, sharing one colour scale (``pattern_figures.pattern_grid``)."""
        if len(self.heads) == 1:
            from attnlab.figures import attention_pattern

            layer, head = self.heads[0]
            return attention_pattern(
                self.full(self.heads[0]),
                self.tokens,
                layer=layer,
                head=head,
                model=self.model,
                window=(self.query_start, self.query_stop),
                max_size=max(max_size, 256),
                title=title,
            )
        from attnlab.pattern_figures import pattern_grid

        return pattern_grid(self, cols=cols, max_size=max_size, title=title)

    def __repr__(self) -> str:
        heads = ", ".join(self.labels[:6]) + (f", … ({len(self.heads)} heads)" if len(self.heads) > 6 else "")
        window = (
            f", queries {self.query_start}-{self.query_stop - 1}" if self.weights.shape[1] != len(self.tokens) else ""
        )
        return f"AttentionPatterns({self.model}: {heads} on {len(self.tokens)} tokens{window})"

    def _repr_mimebundle_(self, include=None, exclude=None):
        """In a notebook: the figure (self-contained HTML as well as plotly's mimetype; ``attnlab.notebook``)."""
        from attnlab.notebook import figure_bundle

        return figure_bundle(self.plot(), repr(self))


@dataclass
class PatternComparison:
    """The same heads on two prompts: ``a`` and ``b`` (``AttentionPatterns``) and their difference ``b - a`` on the
    positions both prompts have (the first ``min(n_a, n_b)`` tokens, row and column aligned by position)."""

    a: AttentionPatterns
    b: AttentionPatterns
    labels: tuple[str, str] = ("A", "B")

    @property
    def heads(self) -> list[tuple[int, int]]:
        return self.a.heads

    @property
    def n_common(self) -> int:
        return min(len(self.a.tokens), len(self.b.tokens))

    def difference(self, head: HeadLike) -> np.ndarray:
        """``b - a`` of one head on the common positions, ``[n_common, n_common]``."""
        n = self.n_common
        return self.b.full(head)[:n, :n] - self.a.full(head)[:n, :n]

    def first_difference(self) -> int | None:
        """The first position where the two prompts' tokens differ (None if one is a prefix of the other)."""
        for i, (x, y) in enumerate(zip(self.a.tokens, self.b.tokens)):
            if x != y:
                return i
        return None

    def to_frame(self):
        """One row per head: the largest |b - a| on the common positions and where it is."""
        import pandas as pd

        rows = []
        for head, label in zip(self.heads, self.a.labels):
            d = self.difference(head)
            i, j = np.unravel_index(np.abs(d).argmax(), d.shape) if d.size else (0, 0)
            rows.append(
                {
                    "head": label,
                    "max_abs_difference": float(np.abs(d).max()) if d.size else 0.0,
                    "query": int(i),
                    "key": int(j),
                }
            )
        return pd.DataFrame(rows)

    def plot(self, *, max_size: int = 96, max_heads: int = 6, title: str | None = None):
        """A row per head: the pattern on each prompt and their difference (diverging colours, centred on 0)."""
        from attnlab.pattern_figures import pattern_comparison

        return pattern_comparison(self, max_size=max_size, max_heads=max_heads, title=title)

    def __repr__(self) -> str:
        top = self.to_frame().sort_values("max_abs_difference", ascending=False).head(3)
        moved = ", ".join(f"{r.head} {r.max_abs_difference:.3f}" for r in top.itertuples())
        return (
            f"PatternComparison({self.a.model}: {len(self.heads)} heads, {self.labels[0]} {len(self.a.tokens)} tokens "
            f"vs {self.labels[1]} {len(self.b.tokens)} tokens; largest |B - A|: {moved})"
        )

    def _repr_mimebundle_(self, include=None, exclude=None):
        """In a notebook: the figure (self-contained HTML as well as plotly's mimetype; ``attnlab.notebook``)."""
        from attnlab.notebook import figure_bundle

        return figure_bundle(self.plot(), repr(self))


def pattern(model, prompt, head: HeadLike, *, window: tuple[int, int] | None = None, image=None) -> AttentionPatterns:
    """One head's attention on ``prompt`` (text or token ids; ``image`` for a vision-language prompt).

    ``window=(start, stop)``: only queries ``start .. stop - 1`` (negative counts from the end), for long prompts.
    ``.plot()`` draws it with token labels, downsampled in blocks past 256 rows (each row keeps its mass).
    """
    return patterns(model, prompt, heads=[head], window=window, image=image)


def patterns(
    model,
    prompt,
    *,
    layer: int | None = None,
    heads: Sequence[HeadLike] | None = None,
    window: tuple[int, int] | None = None,
    image=None,
) -> AttentionPatterns:
    """Every head of ``layer``, or the chosen ``heads``, on one prompt (one forward pass); ``.plot()`` is a grid."""
    chosen = _heads(model, layer, heads)
    weights, tokens, start, stop = attention_rows(model, prompt, chosen, window=window, image=image)
    return AttentionPatterns(weights, tokens, chosen, model=model.name, query_start=start, query_stop=stop)


def compare_patterns(
    model,
    prompt_a,
    prompt_b,
    *,
    layer: int | None = None,
    heads: Sequence[HeadLike] | None = None,
    labels: tuple[str, str] = ("A", "B"),
) -> PatternComparison:
    """The same heads on two prompts (e.g. a clean and a corrupted one) and their difference ``B - A``."""
    chosen = _heads(model, layer, heads)
    a = patterns(model, prompt_a, heads=chosen)
    b = patterns(model, prompt_b, heads=chosen)
    return PatternComparison(a, b, labels=(str(labels[0]), str(labels[1])))


__all__ = ["AttentionPatterns", "PatternComparison", "attention_rows", "compare_patterns", "pattern", "patterns"]
