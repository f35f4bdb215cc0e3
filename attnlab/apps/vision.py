"""The vision view's data: the image a VLM run saw (regenerated from the run's dataset record) or one the user
uploaded, and the selected head's attention over its patch grid (``image_attention_grid``).

Shape-scene runs of organism-vlm record their dataset as ``shapes-<kind>(n=N,seed=S)``
(``attnlab.datasets.shape_prompt_set`` builds that PromptSet, for ``attnlab scan --dataset shapes`` and here);
the app regenerates those scenes and checks the run's fingerprint before showing them. Uploads
are decoded in memory with PIL (size and pixel limits), never written to disk.
"""

from __future__ import annotations

import base64
import io
import re

from PIL import Image

from attnlab.apps.live import check_regenerable
from attnlab.datasets import shape_prompt_set
from attnlab.datasets.base import fingerprint
from attnlab.errors import AttnlabError
from attnlab.probes.image_centric_heads import image_attention_grid

shape_prompts = shape_prompt_set  # the name older callers import; one implementation, in attnlab.datasets

_SHAPES = re.compile(r"^shapes-(attribute|count|position)\(n=(\d{1,4}),seed=(-?\d{1,9})\)$")
MAX_UPLOAD_BYTES = 2_000_000
MAX_PIXELS = 4096 * 4096
UPLOAD_QUESTION = "USER: <image>\nwhat shape is red? ASSISTANT:"


def is_vision_run(info: dict) -> bool:
    return info.get("model", {}).get("modality") == "vision-language"


def run_image_prompts(model, info: dict):
    """The run's (texts, images), regenerated from its dataset record and checked against its fingerprint."""
    ds = info.get("dataset", {})
    m = _SHAPES.match(str(ds.get("name", "")))
    if not m:
        raise AttnlabError(
            f"this run's images ({str(ds.get('name'))[:60]!r}) cannot be regenerated; upload an image instead"
        )
    prompts = shape_prompt_set(m.group(1), check_regenerable(int(m.group(2))), int(m.group(3)))
    batch = model.encode(prompts.texts, images=prompts.images)
    ids = [batch.input_ids[i, batch.real_slice(i)].tolist() for i in range(batch.size)]
    if fingerprint(ids) != ds.get("fingerprint"):
        raise AttnlabError(
            f"regenerating {ds.get('name')} gave other inputs than the run used (fingerprint differs); "
            "upload an image instead"
        )
    return prompts.texts, prompts.images


def decode_upload(contents, *, max_bytes: int = MAX_UPLOAD_BYTES):
    """A ``dcc.Upload`` data URL -> RGB PIL image (in memory only); refuses non-images and oversize files."""
    if not isinstance(contents, str) or "," not in contents:
        raise AttnlabError("upload an image first")
    head, data = contents.split(",", 1)
    if not head.startswith("data:") or ";base64" not in head:
        raise AttnlabError("the upload is not a base64 data URL")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise AttnlabError(f"the image is larger than {max_bytes // 1_000_000} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise AttnlabError("the upload is not valid base64") from None
    if len(raw) > max_bytes:
        raise AttnlabError(f"the image is larger than {max_bytes // 1_000_000} MB")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise AttnlabError(f"the image has {img.width}x{img.height} pixels; the limit is {MAX_PIXELS} pixels")
            img.load()
            return img.convert("RGB")
    except AttnlabError:
        raise
    except Exception:
        raise AttnlabError("the upload could not be read as an image (PNG, JPEG, ...)") from None


def head_image_grid(
    live, info: dict, selected: dict | None, choice, upload=None, question: str | None = None, inputs=None
):
    """-> (image, grid, layer, head) for the selected head: the run's image ``choice`` (index) or the upload.

    ``inputs``: the run's kept inputs (``Run.inputs()``): its texts and images are read from the run; without
    them (runs written before runs kept their inputs) shape scenes are regenerated and fingerprint-checked."""
    if not selected:
        raise AttnlabError("select a head on the head map")
    if not is_vision_run(info):
        raise AttnlabError("this run's model takes no images")
    layer, head = int(selected["layer"]), int(selected["head"])
    image = decode_upload(upload) if choice == "upload" else None
    text = (question or "").strip() or UPLOAD_QUESTION
    if "<image>" not in text:
        raise AttnlabError("the question must contain <image> where the image goes")
    if len(text) > live.max_chars:
        raise AttnlabError(f"the question has {len(text)} characters; the limit is {live.max_chars}")
    from attnlab.apps.run_inputs import model_to_load

    with live.exclusive(model_to_load(info)) as model:
        if not (0 <= layer < model.n_layers and 0 <= head < model.n_heads):
            raise AttnlabError(f"{model.name} has no head L{layer}H{head}")
        if image is None:
            try:
                index = int(choice)
            except (TypeError, ValueError):
                raise AttnlabError(f"unknown image choice {str(choice)[:40]!r}") from None
            if inputs is not None and inputs.has_images and inputs.texts is not None:
                if not 0 <= index < len(inputs):
                    raise AttnlabError(f"the run has {len(inputs)} images; there is no image {index}")
                text, image = inputs.texts[index], inputs.image(index)
            else:
                texts, images = run_image_prompts(model, info)
                if not 0 <= index < len(images):
                    raise AttnlabError(f"the run has {len(images)} images; there is no image {index}")
                text, image = texts[index], images[index]
        grid = image_attention_grid(model, text, image, layer=layer, head=head)
    return image, grid, layer, head
