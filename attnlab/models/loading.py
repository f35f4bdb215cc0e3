"""``attnlab.load``: a hub id, a local checkpoint directory or a bundled alias -> a ``LoadedModel``.

Every model goes through the same path: the checkpoint directory is resolved, its architecture checked against
TransformerLens' supported architectures, and it is booted as a TransformerLens 4.x ``TransformerBridge`` (raw HF
weights, eager attention so patterns can be hooked). The ``LoadedModel`` records what probes need (layer and head
counts, GQA groups, BOS policy, modality, context length) and turns prompts into padded ``Batch`` objects.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
import os
import re
import socket
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from attnlab.errors import AttnlabError
from attnlab.models.bundled import BUNDLED, bundled_path

# torch, transformers and TransformerLens are imported inside the functions that use them ("deferred" below): this
# module is imported for Batch and LoadedModel by light modules and at CLI start; the libraries load with a model.


def configure_environment() -> None:
    """Quiet, fork-safe defaults for the Hugging Face libraries, unless the user set them: transformers logs errors
    only and tokenizers does not parallelise (forked workers would warn or deadlock). Run by ``load`` and at CLI
    start, not at import."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Batch:
    """Padded token ids of a batch of prompts, with where each prompt's real tokens are.

    ``first_real[b]`` is the index of prompt b's first real token (non-zero only with left padding) and
    ``lengths[b]`` its number of real tokens. ``image_mask`` marks image-placeholder tokens of VLM inputs.
    """

    input_ids: Any  # LongTensor [batch, seq]
    attention_mask: Any  # LongTensor [batch, seq], 1 = real token
    prompt_indices: list[int]
    pixel_values: Any = None
    image_mask: Any = None  # BoolTensor [batch, seq] or None

    # first_real / lengths are read by every probe at every layer: computed once per batch (the mask is never
    # changed in place; ``to`` makes a new batch)
    @functools.cached_property
    def first_real(self):
        return self.attention_mask.long().argmax(dim=1)

    @functools.cached_property
    def lengths(self):
        return self.attention_mask.long().sum(dim=1)

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @functools.cached_property
    def host_ids(self):
        """The token ids ``[batch, seq]`` on the host, copied once per batch (per-prompt reads of a device tensor
        would each wait for the device)."""
        return self.input_ids.cpu()

    @functools.cached_property
    def host_mask(self):
        """The attention mask ``[batch, seq]`` (long) on the host, copied once per batch (probes read positions
        from it without a device sync per call)."""
        return self.attention_mask.long().cpu()

    def real_slice(self, b: int) -> slice:
        """Positions of prompt b's real tokens."""
        row = self.host_mask[b]
        start = int(row.argmax())
        return slice(start, start + int(row.sum()))

    @functools.cached_property
    def right_padded(self) -> bool:
        """Every row is real tokens, then padding (no left padding): plain causal kernels see the exact keys."""
        m = self.host_mask
        return bool((m[:, 1:] <= m[:, :-1]).all())

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)
        return Batch(
            move(self.input_ids),
            move(self.attention_mask),
            self.prompt_indices,
            move(self.pixel_values),
            move(self.image_mask),
        )


@dataclass
class LoadedModel:
    """A model booted into a TransformerLens ``TransformerBridge`` plus the facts probes need.

    Attributes
    ----------
    name : str
        What the user asked for (alias, path or hub id).
    path : str
        The checkpoint directory or hub id that was loaded.
    bridge : TransformerBridge
    architecture : str
        HF architecture class name, e.g. ``"LlamaForCausalLM"``.
    n_layers, n_heads, n_kv_heads, d_head, d_model, n_ctx : int
    causal : bool
        False for bidirectional encoders (BERT).
    bos_policy : str
        ``"tokenizer"`` (the tokenizer adds BOS/CLS itself), ``"prepend"`` (attnlab prepends the BOS token, as
        TransformerLens does for GPT-2) or ``"none"`` (the first content token is position 0).
    modality : str
        ``"text"`` or ``"vision-language"``.
    image_token_id : int or None
        Placeholder id of image tokens (VLMs); each Batch's ``image_mask`` marks where they sit.
    """

    name: str
    path: str
    bridge: Any
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    n_ctx: int
    causal: bool
    bos_policy: str
    modality: str
    device: str
    dtype: str
    tokenizer: Any = None
    processor: Any = None
    image_token_id: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        kv = f" ({self.n_kv_heads} KV)" if self.n_kv_heads != self.n_heads else ""
        kind = "causal" if self.causal else "bidirectional"
        image = ", images" if self.modality == "vision-language" else ""
        return (
            f"LoadedModel({self.name!r}: {self.architecture}, {self.n_layers} layers x {self.n_heads} heads{kv}, "
            f"d_head {self.d_head}, context {self.n_ctx}, {kind}{image}, {self.device} {self.dtype})"
        )

    def _repr_html_(self) -> str:
        from attnlab.notebook import html_escape, table_html

        rows = [
            {"": "architecture", "value": self.architecture},
            {"": "layers x heads", "value": f"{self.n_layers} x {self.n_heads}"},
            {
                "": "KV heads",
                "value": f"{self.n_kv_heads} (grouped-query)" if self.n_kv_heads != self.n_heads else self.n_kv_heads,
            },
            {"": "d_model / d_head", "value": f"{self.d_model} / {self.d_head}"},
            {"": "context", "value": self.n_ctx},
            {"": "attention", "value": "causal" if self.causal else "bidirectional"},
            {"": "modality", "value": self.modality},
            {"": "device, dtype", "value": f"{self.device}, {self.dtype}"},
            {"": "loaded from", "value": self.path},
        ]
        return f"<div><b>{html_escape(self.name)}</b>{table_html(rows, ['', 'value'])}</div>"

    @property
    def hf_model(self):
        """The underlying Hugging Face model (its attention modules are bridge components)."""
        return self.bridge.original_model

    def summary(self) -> dict[str, Any]:
        keys = (
            "name",
            "path",
            "architecture",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_head",
            "d_model",
            "n_ctx",
            "causal",
            "bos_policy",
            "modality",
            "device",
            "dtype",
            "image_token_id",
        )
        return {k: getattr(self, k) for k in keys}

    # ---- prompts -> batches -------------------------------------------------------------------------------

    def token_ids(self, prompt: str, *, truncate: bool = False, index: int = 0) -> list[int]:
        """Token ids of one text prompt under this model's BOS policy; raises on empty or over-long prompts."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise AttnlabError(f"prompt {index} is empty")
        ids = list(self.tokenizer(prompt, add_special_tokens=self.bos_policy == "tokenizer")["input_ids"])
        if self.image_token_id is not None and self.image_token_id in ids:
            raise AttnlabError(
                f"missing image: prompt {index} holds the image token but no image was given; pass the prompt "
                "with its image (e.g. --dataset shapes), or remove the image token for a text-only prompt"
            )
        if self.bos_policy == "prepend":
            ids = [self.tokenizer.bos_token_id, *ids]
        return self.check_length(ids, truncate=truncate, index=index)

    def check_length(self, ids: list[int], *, truncate: bool, index: int) -> list[int]:
        """Raise on a prompt longer than the context (or cut it with ``truncate``)."""
        if len(ids) > self.n_ctx:
            if not truncate:
                raise AttnlabError(
                    f"prompt {index} has {len(ids)} tokens, more than {self.name}'s context of {self.n_ctx}; "
                    "shorten it or pass --truncate"
                )
            ids = ids[: self.n_ctx]
        return ids

    def batch_from_ids(
        self,
        ids: Sequence[Sequence[int]],
        prompt_indices: Sequence[int],
        *,
        padding_side: str = "right",
        truncate: bool = False,
    ) -> Batch:
        """Pad lists of token ids into a Batch (pad id from the tokenizer; padded positions masked out)."""
        import torch  # deferred

        if not ids:
            raise AttnlabError("no prompts to run")
        rows = []
        for i, seq in zip(prompt_indices, ids):
            if len(seq) == 0:
                raise AttnlabError(f"prompt {i} is empty")
            rows.append(self.check_length(list(seq), truncate=truncate, index=i))
        width = max(len(r) for r in rows)
        pad = self.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(width - len(r), width)
            input_ids[b, sl] = torch.tensor(r, dtype=torch.long)
            mask[b, sl] = 1
        image_mask = (input_ids == self.image_token_id) & mask.bool() if self.image_token_id is not None else None
        return Batch(input_ids, mask, list(prompt_indices), image_mask=image_mask)

    def encode(
        self,
        prompts: Sequence[str],
        *,
        images: Sequence[Any] | None = None,
        truncate: bool = False,
        padding_side: str = "right",
        start_index: int = 0,
    ) -> Batch:
        """Text prompts (and, for VLMs, PIL images) -> Batch."""
        indices = list(range(start_index, start_index + len(prompts)))
        if images is not None:
            return self._encode_multimodal(prompts, images, indices, truncate=truncate, padding_side=padding_side)
        ids = [self.token_ids(p, truncate=truncate, index=i) for i, p in zip(indices, prompts)]
        return self.batch_from_ids(ids, indices, padding_side=padding_side)

    def _encode_multimodal(self, prompts, images, indices, *, truncate: bool, padding_side: str) -> Batch:
        if self.processor is None:
            raise AttnlabError(f"{self.name} is a text model; it takes no images")
        if len(images) != len(prompts):
            raise AttnlabError(f"{len(prompts)} prompts but {len(images)} images")
        for i, (p, im) in zip(indices, zip(prompts, images)):
            if not p or not p.strip():
                raise AttnlabError(f"prompt {i} is empty")
            if im is None:
                raise AttnlabError(f"prompt {i} has no image")
        self.processor.tokenizer.padding_side = padding_side
        enc = self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        if enc["input_ids"].shape[1] > self.n_ctx:
            raise AttnlabError(
                f"a prompt with its image takes {enc['input_ids'].shape[1]} tokens, "
                f"more than {self.name}'s context of {self.n_ctx}"
            )
        mask = enc["attention_mask"]
        image_mask = (enc["input_ids"] == self.image_token_id) & mask.bool()
        return Batch(enc["input_ids"], mask, indices, pixel_values=enc["pixel_values"], image_mask=image_mask)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
            if cand is not None:
                return int(cand)
        return 0

    def tokens_as_text(self, ids: Sequence[int]) -> list[str]:
        """Readable token strings (byte-level BPE markers turned into spaces)."""
        toks = self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        return [
            t.replace("Ġ", " ").replace("Ċ", "\\n").replace("▁", " ") if isinstance(t, str) else str(t) for t in toks
        ]

    # ---- running --------------------------------------------------------------------------------------------

    def forward(self, batch: Batch, **kwargs):
        """One forward pass of a Batch through the bridge (logits)."""
        batch = batch.to(self.device)
        extra = {"pixel_values": batch.pixel_values.to(self.torch_dtype)} if batch.pixel_values is not None else {}
        return self.bridge(batch.input_ids, attention_mask=batch.attention_mask, **extra, **kwargs)

    @property
    def torch_dtype(self):
        import torch  # deferred

        return getattr(torch, self.dtype)


# ---- resolving names ------------------------------------------------------------------------------------------


def _bundled_names() -> str:
    return ", ".join(BUNDLED)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download  # deferred

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None
    return path if (Path(path) / "config.json").is_file() else None


def resolve(name: str) -> str:
    """Checkpoint directory (or reachable hub id) for a bundled alias, a local path or a hub id.

    Raises AttnlabError with a one-line message otherwise, within a few seconds even with no network.
    """
    if not name or not str(name).strip():
        raise AttnlabError(f"no model given; bundled models: {_bundled_names()}")
    name = str(name).strip()
    if name in BUNDLED:
        path = bundled_path(name)
        if path is None:
            raise AttnlabError(
                f"bundled model {name!r} is not installed (its files are missing); "
                "run `attnlab models` to see what is available"
            )
        return str(path)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise AttnlabError(f"{name} is not a model checkpoint directory (no config.json)")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or not _HUB_ID.match(name):
        raise AttnlabError(f"no model directory {name!r} and not a valid hub id; bundled models: {_bundled_names()}")
    cached = _cached_snapshot(name)
    if cached:
        return cached
    if _hub_reachable():
        return name
    raise AttnlabError(
        f"cannot load {name!r}: not a bundled alias ({_bundled_names()}), not a local checkpoint directory, "
        "not in the local Hugging Face cache, and the hub is unreachable"
    )


def _check_architecture(path: str) -> tuple[Any, str]:
    if Path(path, "model_index.json").exists() or Path(path, "transformer", "config.json").exists():
        raise AttnlabError(
            f"{path} is a diffusers pipeline; attnlab.load takes transformer language/vision-language models "
            "(use the DiT tools for diffusers models)"
        )
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES  # deferred
    from transformers import AutoConfig  # deferred

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # unknown model_type, malformed config.json, ...
        raise AttnlabError(f"cannot read the model config at {path}: {str(e).splitlines()[0]}") from None
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config  # deferred

    try:
        arch = determine_architecture_from_hf_config(config)
    except Exception:
        arch = None
    named = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise AttnlabError(f"unsupported architecture {named}: TransformerLens' bridge has no adapter for it")
    if getattr(config, "is_encoder_decoder", False):
        raise AttnlabError(
            f"unsupported architecture {named}: an encoder-decoder model; attnlab probes decoder-only and "
            "encoder-only transformers"
        )
    return config, arch


def _check_attention(bridge, name: str, arch: str) -> None:
    """Every block must have an attention layer (state-space models such as Mamba have none; hybrids lack some)."""
    try:
        blocks = list(bridge.blocks)
        has_attn = [_has_attention(b) for b in blocks]
    except AttributeError:
        blocks, has_attn = [], []
    if not blocks or not all(has_attn):
        what = "no attention layers" if not any(has_attn) else f"attention in {sum(has_attn)} of {len(blocks)} blocks"
        raise AttnlabError(f"unsupported architecture {arch or name}: {what}; attnlab needs attention in every block")


def _has_attention(block) -> bool:
    try:
        return getattr(block, "attn", None) is not None
    except AttributeError:
        return False


def _check_device(device: str | None) -> str:
    import torch  # deferred

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise AttnlabError(f"--device {dev} was asked for but no CUDA GPU is available; use --device cpu")
    if dev == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AttnlabError("--device mps was asked for but MPS is not available; use --device cpu")
    if not (dev == "cpu" or dev.startswith("cuda") or dev == "mps"):
        raise AttnlabError(f"unknown device {dev!r}; use cpu, cuda, cuda:N or mps")
    return dev


def _bos_policy(tokenizer, causal: bool) -> str:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    specials = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}
    if ids and ids[0] in specials:
        return "tokenizer"
    if causal and tokenizer.bos_token_id is not None:
        return "prepend"
    return "none"


def _is_causal(bridge) -> bool:
    attn = bridge.blocks[0].attn
    hf_attn = getattr(attn, "original_component", None)
    flag = getattr(hf_attn, "is_causal", None)
    if flag is None:
        flag = bool(getattr(bridge.original_model.config, "is_decoder", True))
    return bool(flag)


def _tokenizer(path: str, bridge):
    """The checkpoint's own tokenizer, as saved (the bridge may reconfigure its copy, e.g. drop a post-processor)."""
    from transformers import AutoTokenizer  # deferred

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return bridge.tokenizer


def check_versions() -> str | None:
    """A one-line warning when the installed transformers and transformer-lens cannot decode with a KV cache.

    transformers 5.24 renamed the attention modules' ``past_key_values`` argument to ``cache``. A bridge that still
    reads only ``past_key_values`` then never fills the cache, so every cached decoding step (``generate``, or a
    forward given a cache) is computed without its prefix, silently. Uncached forwards, which the probes use, are
    unaffected. Returns the message, or None when the pair is fine.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge  # deferred

    tf = importlib.metadata.version("transformers")
    if tuple(int(p) for p in re.findall(r"\d+", tf)[:2]) < (5, 24):
        return None
    try:
        reads_new_name = '"cache"' in inspect.getsource(AttentionBridge._update_kv_cache)
    except (OSError, TypeError, AttributeError):
        reads_new_name = False
    if reads_new_name:
        return None
    tl = importlib.metadata.version("transformer-lens")
    return (
        f"transformers {tf} with transformer-lens {tl}: cached decoding through the bridge "
        "ignores its cache (transformers >= 5.24 renamed past_key_values to cache); install transformers<5.24 "
        "(pip install 'transformers<5.24') or use generate(..., use_cache=False)"
    )


def load(
    name_or_path: str,
    *,
    device: str | None = "cpu",
    dtype: str = "float32",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
) -> LoadedModel:
    """Load a model for probing.

    Parameters
    ----------
    name_or_path : str
        A bundled alias (``minilm``, ``organism-lm``, ``organism-vlm``), a local checkpoint directory (anything
        ``save_pretrained`` wrote), or a Hugging Face hub id such as ``gpt2`` (needs the hub or a local cache).
    device : str, default="cpu"
        ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
    dtype : {"float32", "bfloat16", "float16"}, default="float32"
    device_map : str or dict or None, default=None
        Spread the model over several devices (a model too big for one GPU): ``"auto"`` / ``"balanced"`` or an
        explicit map of module names to devices, passed through to ``TransformerBridge.boot_transformers`` (which
        hands it to Hugging Face / Accelerate); ``device`` is then ignored and batches go to the device of the
        input embedding. TransformerLens rejects disk offload.
    max_memory : dict or None, default=None
        Per-device memory budget for ``device_map`` (e.g. ``{0: "70GiB", 1: "70GiB"}``).
    """
    configure_environment()
    import torch  # deferred

    if dtype not in DTYPES:
        raise AttnlabError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if max_memory is not None and device_map is None:
        raise AttnlabError("max_memory applies only with a device_map")
    dev = _check_device(device) if device_map is None else None
    path = resolve(name_or_path)
    config, arch = _check_architecture(path) if Path(path).exists() else (None, "")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformer_lens.model_bridge import TransformerBridge  # deferred

        try:
            placement = {"device": dev} if device_map is None else {"device_map": device_map, "max_memory": max_memory}
            bridge = TransformerBridge.boot_transformers(path, dtype=getattr(torch, dtype), **placement)
        except AttnlabError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AttnlabError(f"could not load {name_or_path!r}: {first}") from None
    mismatch = check_versions()
    if mismatch:
        warnings.warn(mismatch, UserWarning, stacklevel=2)
    hf = bridge.original_model
    hf.eval()
    if dev is None:  # spread by a device_map: inputs go where the embedding is
        dev = str(hf.get_input_embeddings().weight.device)
    # The bridge asks HF to return attention weights; we reduce them in hooks instead of keeping every layer's.
    for cfg in (hf.config, getattr(hf.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "output_attentions"):
            cfg.output_attentions = False
    cfg = bridge.cfg
    arch = arch or type(hf).__name__
    _check_attention(bridge, str(name_or_path), arch)
    n_heads = int(cfg.n_heads)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    causal = _is_causal(bridge)
    tokenizer = _tokenizer(path, bridge)
    processor = None
    image_token_id = None
    modality = "text"
    if getattr(hf.config, "vision_config", None) is not None:
        modality = "vision-language"
        from transformers import AutoProcessor  # deferred

        try:
            processor = AutoProcessor.from_pretrained(path)
        except Exception as e:
            raise AttnlabError(
                f"{name_or_path} is a vision-language model but its processor could not be loaded: "
                f"{str(e).splitlines()[0]}"
            ) from None
        tokenizer = processor.tokenizer
        image_token_id = getattr(hf.config, "image_token_id", None) or getattr(hf.config, "image_token_index", None)
    if tokenizer is None:
        raise AttnlabError(f"{name_or_path} has no tokenizer")
    n_ctx = int(getattr(cfg, "n_ctx", 0) or 0) or int(getattr(tokenizer, "model_max_length", 512))
    return LoadedModel(
        name=str(name_or_path),
        path=str(path),
        bridge=bridge,
        architecture=arch,
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        n_ctx=n_ctx,
        causal=causal,
        bos_policy=_bos_policy(tokenizer, causal),
        modality=modality,
        device=dev,
        dtype=dtype,
        tokenizer=tokenizer,
        processor=processor,
        image_token_id=image_token_id,
    )
