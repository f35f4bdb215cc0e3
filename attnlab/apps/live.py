"""Live model runs for the app: load a run's model once, run one prompt at a time, keep q/k for fast head switching.

A click on another head must not cost a forward pass. So the first request for a prompt runs the model once and
keeps every layer's rotated queries and keys (``[heads, seq, d_head]``, a few MB per layer at 2k tokens); a head's
pattern is then one ``[seq, d] x [d, seq]`` product and a softmax (``attnlab.capture.attention_rows``).

Live runs are serialised by one lock: a second request waits up to ``wait_s`` and then gets a "busy" error rather
than queueing without bound. Prompts are limited to ``max_chars`` characters and the model's context.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attnlab.capture import Capture
from attnlab.datasets import DATASETS, fingerprint
from attnlab.errors import AttnlabError
from attnlab.models.loading import load
from attnlab.probes.scan import prompt_token_ids

MAX_REGENERATED_PROMPTS = 4096  # a run.json may claim any prompt count: the app regenerates at most this many


def check_regenerable(n_prompts: int, limit: int = MAX_REGENERATED_PROMPTS) -> int:
    """``n_prompts`` if the app may regenerate that many of a run's prompts, else a one-line AttnlabError."""
    if n_prompts > limit:
        raise AttnlabError(
            f"the run records {n_prompts:,} prompts, more than the app regenerates ({limit:,}); type a prompt instead"
        )
    return n_prompts


@dataclass(frozen=True)
class PatternData:
    """One head's attention on one prompt: ``weights[q, k]`` (float32) and the token strings."""

    weights: np.ndarray
    tokens: list[str]
    layer: int
    head: int
    model: str


@dataclass(frozen=True)
class RunPrompt:
    """One of a run's own prompts as the model saw it: the token ids, and for a vision-language prompt the text
    and image that the processor turns into those ids (the image must be fed again for the same attention)."""

    ids: tuple[int, ...]
    text: str | None = None
    image: Any = None
    index: int = 0


@dataclass
class _Prompt:
    tokens: list[str]
    q: dict[int, Any]  # layer -> tensor [n_heads, seq, d]
    k: dict[int, Any]  # layer -> tensor [n_kv_heads, seq, d]


def _loader(name: str):
    return load(name)


class LiveModels:
    """Loaded models (by the name a run recorded) and per-prompt q/k caches, behind one lock.

    Parameters
    ----------
    loader : callable name -> LoadedModel, default ``attnlab.load``
    max_models : int, default=2
        Models kept loaded (least recently used is dropped).
    max_prompts : int, default=8
        Prompts whose q/k are kept.
    max_chars : int, default=20000
        Longest prompt accepted (characters), checked before tokenizing.
    max_tokens : int, default=4096
        Longest prompt accepted (tokens), besides the model's own context.
    wait_s : float, default=30
        How long a request waits for another live run to finish before it is refused as busy.
    max_run_prompts : int, default=4096
        Most prompts regenerated from a run's dataset record (a run.json may claim any number).
    fused_min_len : int, default=512
        Prompts at least this long run with the fused SDPA path (``attnlab.capture``), about twice as fast on
        long inputs as the eager path; q/k are the same either way.
    """

    def __init__(
        self,
        loader: Callable[[str], Any] | None = None,
        *,
        max_models: int = 2,
        max_prompts: int = 8,
        max_chars: int = 20000,
        max_tokens: int = 4096,
        wait_s: float = 30.0,
        fused_min_len: int = 512,
        max_run_prompts: int = MAX_REGENERATED_PROMPTS,
    ):
        self.loader = loader or _loader
        self.max_models = max_models
        self.max_prompts = max_prompts
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self.wait_s = wait_s
        self.fused_min_len = fused_min_len
        self.max_run_prompts = max_run_prompts
        self.last_path = ""
        self.lock = threading.Lock()
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._prompts: OrderedDict[tuple[str, str], _Prompt] = OrderedDict()
        self._run_ids: OrderedDict[tuple[str, str], list[list[int]]] = OrderedDict()

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def preload(self, name: str, model: Any) -> None:
        """Register an already loaded model under ``name`` (notebooks, tests)."""
        with self.lock:
            self._remember(self._models, name, model, self.max_models)

    def model(self, name: str):
        """The loaded model for ``name`` (call with the lock held)."""
        if name not in self._models:
            self._remember(self._models, name, self.loader(name), self.max_models)
        self._models.move_to_end(name)
        return self._models[name]

    @staticmethod
    def _remember(cache: OrderedDict, key, value, limit: int) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)

    def run_prompt_ids(self, info: dict, index: int, model_name: str | None = None) -> list[int]:
        """Token ids of prompt ``index`` of a run written before runs kept their inputs, regenerated from its
        dataset record (builder name, n_prompts, seed) and checked against the run's dataset fingerprint, so the
        page never shows other inputs than the scan ran on. (Runs that keep their inputs are read instead:
        ``attnlab.apps.run_inputs.run_prompt``.) ``model_name``: what to load the run's model by (default the
        name it recorded)."""
        ds = info.get("dataset", {})
        key = str(ds.get("name", "")).split("(")[0]
        if key not in DATASETS:
            raise AttnlabError(f"this run's prompts ({ds.get('name')!r}) cannot be regenerated; type a prompt instead")
        model_name = model_name or info["model"]["name"]
        cache_key = (model_name, str(ds.get("fingerprint")))
        n_prompts = int(ds.get("n_prompts", 1) or 1)
        if not 0 <= index < n_prompts:
            raise AttnlabError(f"the run has {n_prompts} prompts; there is no prompt {index}")
        if cache_key not in self._run_ids:
            check_regenerable(n_prompts, self.max_run_prompts)
            with self._acquire():
                model = self.model(model_name)
                prompts = DATASETS[key](model, n_prompts, int(ds.get("seed", 0) or 0))
                ids = prompt_token_ids(model, prompts, truncate=True)
            if fingerprint(ids) != ds.get("fingerprint"):
                raise AttnlabError(
                    f"regenerating {ds.get('name')} gave other prompts than the run used (fingerprint differs); "
                    "type a prompt instead"
                )
            self._remember(self._run_ids, cache_key, ids, 16)
        ids = self._run_ids[cache_key]
        if not 0 <= index < len(ids):
            raise AttnlabError(f"the run has {len(ids)} prompts; there is no prompt {index}")
        return ids[index]

    def _acquire(self):
        lock = self.lock

        class _Ctx:
            def __enter__(self_inner):
                if not lock.acquire(timeout=self.wait_s):
                    raise AttnlabError("busy: another live model run is in progress; try again in a moment")

            def __exit__(self_inner, *exc):
                lock.release()

        return _Ctx()

    def exclusive(self, model_name: str):
        """Context manager: the loaded model ``model_name`` with the live-run lock held (ablations, image
        attention: any other live computation of the app), so live runs stay one at a time."""

        @contextlib.contextmanager
        def held():
            with self._acquire():
                yield self.model(model_name)

        return held()

    def pattern(self, model_name: str, prompt: str | list[int] | RunPrompt, layer: int, head: int) -> PatternData:
        """Attention weights of head (layer, head) on ``prompt`` (text, token ids as a run used them, or a
        ``RunPrompt`` with its image): one forward pass per new prompt, then cached."""
        image = None
        if isinstance(prompt, RunPrompt):
            image, text, prompt = prompt.image, prompt.text, list(prompt.ids)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise AttnlabError("the prompt is empty")
            if len(prompt) > self.max_chars:
                raise AttnlabError(f"the prompt has {len(prompt)} characters; the limit is {self.max_chars}")
        elif not prompt:
            raise AttnlabError("the prompt is empty")
        with self._acquire():
            model = self.model(model_name)
            if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
                raise AttnlabError(
                    f"{model_name} has no head L{layer}H{head} ({model.n_layers} layers x {model.n_heads} heads)"
                )
            ids = (
                model.token_ids(prompt)
                if isinstance(prompt, str)
                else model.check_length([int(t) for t in prompt], truncate=False, index=0)
            )
            if len(ids) > self.max_tokens:
                raise AttnlabError(f"the prompt has {len(ids)} tokens; the limit is {self.max_tokens}")
            digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes())
            batch = None
            if image is not None:
                batch = _image_batch(model, text, image, ids)
                from attnlab.heads.inputs import image_digest

                digest.update(image_digest(image).encode())
            key = (model_name, digest.hexdigest())
            if key not in self._prompts:
                self._remember(self._prompts, key, self._run(model, ids, batch), self.max_prompts)
            self._prompts.move_to_end(key)
            cached = self._prompts[key]
            weights = _head_weights(model, cached, layer, head)
        return PatternData(weights=weights, tokens=cached.tokens, layer=layer, head=head, model=model_name)

    def _run(self, model, ids: list[int], batch=None) -> _Prompt:
        """One forward pass keeping every layer's rotated q and k (batch of one, no padding; ``batch`` carries the
        pixel values of an image prompt)."""

        batch = batch if batch is not None else model.batch_from_ids([ids], [0])
        q: dict[int, Any] = {}
        k: dict[int, Any] = {}
        cap = Capture(model, attention="auto", fused_min_len=self.fused_min_len, progress=False)
        cap.on("q", lambda layer, x, b: q.__setitem__(layer, x[0].detach().float().cpu().clone()))
        cap.on("k", lambda layer, x, b: k.__setitem__(layer, x[0].detach().float().cpu().clone()))
        with torch.inference_mode():
            cap.run_batch(batch, logit_positions=None)
        self.last_path = cap.last_path  # "eager" or "fused": which forward path produced the cached q/k
        if len(q) != model.n_layers or len(k) != model.n_layers:
            raise AttnlabError(f"could not capture queries and keys of every layer of {model.name}")
        return _Prompt(tokens=model.tokens_as_text(ids), q=q, k=k)


def _image_batch(model, text: str | None, image, ids: list[int]):
    """The batch of an image prompt (text + image through the processor), checked to give the run's token ids."""
    if model.processor is None:
        raise AttnlabError(f"{model.name} takes no images, but this prompt has one")
    if not text:
        raise AttnlabError("an image prompt needs its text")
    batch = model.encode([text], images=[image])
    got = batch.input_ids[0, batch.real_slice(0)].tolist()
    if got != list(ids):
        raise AttnlabError("the prompt's text and image give other tokens than the run recorded")
    return batch


def _head_weights(model, cached: _Prompt, layer: int, head: int) -> np.ndarray:
    """``softmax(q_h k_g^T / sqrt(d))`` (causal mask for decoders) for one query head and its KV group.

    The same computation as ``attnlab.capture.attention_rows`` for a batch of one without padding, written as one
    matmul and in-place masking because it runs on every head click (2k tokens: a 2k x 2k matrix).
    """
    group = model.n_heads // model.n_kv_heads
    q = cached.q[layer][head]  # [seq, d]
    k = cached.k[layer][head // group]
    scores = (q @ k.T).mul_(model.d_head**-0.5)
    if model.causal:
        seq = scores.shape[0]
        scores.masked_fill_(torch.ones(seq, seq, dtype=torch.bool).triu_(1), float("-inf"))
    return torch.softmax(scores, dim=-1).numpy()
