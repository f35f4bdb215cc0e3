"""A run's inputs, kept in the run directory so the run can be re-opened, re-scored and shared without the
generator or the file that made them.

Files (written atomically, data before the index that points at it):

- ``inputs.safetensors``: the exact token ids the scan ran on, one flat ``ids`` array plus ``offsets``
  (prompt i is ``ids[offsets[i]:offsets[i+1]]``), after the model's BOS policy, truncation and, for
  vision-language prompts, the processor's expansion of the image placeholder;
- ``images/<digest>.png``: each distinct image once, losslessly, named by its content digest (SHA-256 of its mode,
  size and pixels, so the digest names the picture, not one encoding of it);
- ``inputs.json``: the prompt set's name and seed, the texts (when the prompts were texts), per-prompt metadata
  (answers, needle spans, ...), the image digest of each prompt, and the fingerprint of the token ids.

Reading checks what it reads: the ids must give the recorded fingerprint, every image file must resolve inside the
run directory and decode to the pixels its digest names. Runs written before inputs were kept have no
``inputs.json``; ``load_inputs`` returns None for them and callers fall back to what they did before.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.errors import AttnlabError
from attnlab.heads.io import json_default, read_arrays, read_json, write_arrays, write_bytes, write_json
from attnlab.heads.prompts import PromptSet, fingerprint

INPUTS_JSON = "inputs.json"
INPUTS_ARRAYS = "inputs.safetensors"
IMAGES_DIR = "images"
FORMAT = 1


def image_digest(image: Any) -> str:
    """SHA-256 of an image's content: its mode, size and raw pixels (PIL image, or an ``[H, W(, C)]`` uint8 array)."""
    img = _as_pil(image)
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _as_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise AttnlabError(f"an image must be a PIL image or a uint8 [H, W(, C)] array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def _jsonable(meta: list) -> tuple[list | None, str]:
    """The metadata as JSON can hold it, or (None, why not)."""
    import json

    try:
        return json.loads(json.dumps(list(meta), default=json_default)), ""
    except (TypeError, ValueError) as e:
        return None, f"metadata not kept: {str(e).splitlines()[0]}"


def save_inputs(directory: str | Path, prompts: PromptSet, token_ids: list[list[int]]) -> dict[str, Any]:
    """Write ``prompts`` (texts or token ids, images, metadata) and the ``token_ids`` a scan ran on into
    ``directory``; returns the short record a run's ``info["inputs"]`` keeps."""
    d = Path(directory)
    if len(token_ids) != len(prompts):
        raise ValueError(f"{len(token_ids)} token-id lists for {len(prompts)} prompts")
    digests = None
    if prompts.images is not None:
        digests = []
        for image in prompts.images:
            img = _as_pil(image)
            digest = image_digest(img)
            path = d / IMAGES_DIR / f"{digest}.png"
            if not path.is_file():
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                write_bytes(path, buf.getvalue())
            digests.append(digest)
    lengths = np.array([len(x) for x in token_ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((int(t) for seq in token_ids for t in seq), dtype=np.int64, count=int(lengths.sum()))
    write_arrays(d / INPUTS_ARRAYS, {"ids": flat, "offsets": offsets})
    meta, note = _jsonable(prompts.meta)
    fp = fingerprint(token_ids)
    record = {
        "format": FORMAT,
        "name": prompts.name,
        "seed": prompts.seed,
        "n_prompts": len(token_ids),
        "fingerprint": fp,
        "given": "texts" if prompts.texts is not None else "token_ids",
        "texts": list(prompts.texts) if prompts.texts is not None else None,
        "images": digests,
        "meta": meta,
        "note": note,
    }
    write_json(d / INPUTS_JSON, record)
    return {"file": INPUTS_JSON, "n_prompts": len(token_ids), "fingerprint": fp, "images": len(digests or [])}


@dataclass
class RunInputs:
    """The inputs a run kept: ``token_ids`` (what the model saw), ``texts`` (when prompts were texts), images by
    digest (loaded on demand, checked), ``meta`` per prompt."""

    directory: Path
    name: str
    fingerprint: str
    token_ids: list[list[int]]
    given: str = "texts"
    texts: list[str] | None = None
    image_digests: list[str] | None = None
    meta: list[dict[str, Any]] = field(default_factory=list)
    seed: int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def has_images(self) -> bool:
        return self.image_digests is not None

    def image(self, index: int):
        """Prompt ``index``'s image (PIL), read from ``images/`` and checked against its digest."""
        from PIL import Image

        if self.image_digests is None:
            raise AttnlabError(f"the run's prompts have no images ({self.name})")
        if not 0 <= index < len(self.image_digests):
            raise AttnlabError(f"the run has {len(self.image_digests)} images; there is no image {index}")
        digest = self.image_digests[index]
        path = self.directory / IMAGES_DIR / f"{digest}.png"
        real = path.resolve()
        if not real.is_relative_to(self.directory.resolve()) or not real.is_file():
            raise AttnlabError(f"image {index} of the run ({digest[:12]}…) is missing from {IMAGES_DIR}/")
        try:
            with Image.open(real) as img:
                img.load()
                out = img.copy()
        except Exception:
            raise AttnlabError(f"image {index} of the run ({path.name}) cannot be read") from None
        if image_digest(out) != digest:
            raise AttnlabError(f"image {index} of the run ({path.name}) does not match its digest; it was changed")
        return out

    def images(self) -> list | None:
        return None if self.image_digests is None else [self.image(i) for i in range(len(self.image_digests))]

    def prompt_set(self) -> PromptSet:
        """The inputs as a ``PromptSet`` to scan again: the texts (with their images) when the run's prompts were
        texts, else the token ids."""
        texts = self.texts if self.given == "texts" else None
        return PromptSet(
            name=self.name,
            texts=list(texts) if texts is not None else None,
            token_ids=None if texts is not None else [list(x) for x in self.token_ids],
            images=self.images(),
            meta=[dict(m) if isinstance(m, dict) else m for m in self.meta],
            seed=self.seed,
        )

    def label(self, index: int, width: int = 48) -> str:
        """A short one-line preview of prompt ``index`` (its text, else its first token ids)."""
        if self.texts is not None:
            text = " ".join(str(self.texts[index]).split())
        else:
            text = " ".join(str(t) for t in self.token_ids[index][:12])
        return text if len(text) <= width else text[: width - 1] + "…"


_CACHE: dict[tuple, RunInputs | None] = {}


def load_inputs(directory: str | Path) -> RunInputs | None:
    """The inputs kept in a run directory, or None for a run written before inputs were kept. Malformed or
    tampered inputs raise ``AttnlabError`` (one line). Cached per directory while ``inputs.json`` is unchanged."""
    d = Path(directory)
    path = d / INPUTS_JSON
    if not path.is_file():
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(d.resolve()), st.st_mtime_ns, st.st_size)
    if key in _CACHE:
        return _CACHE[key]
    result = _read(d, path)
    if len(_CACHE) > 32:
        _CACHE.clear()
    _CACHE[key] = result
    return result


def _read(d: Path, path: Path) -> RunInputs:
    where = f"{d.name}/{INPUTS_JSON}"
    for f in (path, d / INPUTS_ARRAYS):
        if not f.resolve().is_relative_to(d.resolve()):
            raise AttnlabError(f"{f.name} in {d.name} points outside the run directory; refused")
    try:
        rec = read_json(path)
        arrays = read_arrays(d / INPUTS_ARRAYS)
    except Exception as e:
        raise AttnlabError(f"the inputs of run {d.name} cannot be read: {type(e).__name__}") from None
    if not isinstance(rec, dict) or "fingerprint" not in rec:
        raise AttnlabError(f"{where} is malformed")
    ids_flat, offsets = arrays.get("ids"), arrays.get("offsets")
    if ids_flat is None or offsets is None or offsets.ndim != 1 or len(offsets) < 1 or offsets[-1] != len(ids_flat):
        raise AttnlabError(f"{d.name}/{INPUTS_ARRAYS} is malformed")
    token_ids = [ids_flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
    if fingerprint(token_ids) != rec["fingerprint"]:
        raise AttnlabError(f"the inputs of run {d.name} do not match their fingerprint; they were changed")
    texts, digests, meta = rec.get("texts"), rec.get("images"), rec.get("meta") or []
    n = len(token_ids)
    if texts is not None and (
        not isinstance(texts, list) or len(texts) != n or not all(isinstance(t, str) for t in texts)
    ):
        raise AttnlabError(f"{where}: texts do not match the {n} prompts")
    if digests is not None and (
        not isinstance(digests, list)
        or len(digests) != n
        or not all(isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x) for x in digests)
    ):
        raise AttnlabError(f"{where}: image digests do not match the {n} prompts")
    if not isinstance(meta, list) or (meta and len(meta) != n):
        meta = []
    return RunInputs(
        directory=d,
        name=str(rec.get("name", "")),
        fingerprint=str(rec["fingerprint"]),
        token_ids=token_ids,
        given=str(rec.get("given", "texts" if texts is not None else "token_ids")),
        texts=texts,
        image_digests=digests,
        meta=meta,
        seed=rec.get("seed"),
    )


__all__ = ["RunInputs", "image_digest", "load_inputs", "save_inputs", "INPUTS_JSON", "INPUTS_ARRAYS", "IMAGES_DIR"]
