"""What the app reads from a run instead of regenerating it: the model to load and the run's own prompts.

- ``model_to_load(info)``: the bundled alias or hub id when that is what the scan was given, else the checkpoint's
  absolute path the run recorded, so an app started in another directory loads the model a relative path named.
- ``run_prompt(live, run, index)``: prompt ``index`` as the scan saw it. Runs keep their inputs
  (``attnlab.heads.inputs``): token ids, texts, images by digest; those are read, never regenerated. Runs written
  before that are regenerated from their dataset record and checked against its fingerprint, as before.
- ``prompt_options(run)``: the pattern view's choices, with a preview of each prompt's text where the run kept it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnlab.apps.live import RunPrompt
from attnlab.errors import AttnlabError

TYPED = "typed"


def model_to_load(info: dict) -> str:
    """The name to load a run's model by: a bundled alias or hub id as given, else the recorded absolute path."""
    from attnlab.models.bundled import BUNDLED

    model = info.get("model", {}) if isinstance(info, dict) else {}
    name, path = str(model.get("name") or ""), str(model.get("path") or "")
    if not name and not path:
        raise AttnlabError("the run does not record its model")
    if name in BUNDLED or not path:
        return name
    p = Path(path)
    hub_snapshot = any(part.startswith("models--") for part in p.parts)
    if p.is_absolute() and p.is_dir() and not hub_snapshot:
        return path  # a local checkpoint: its absolute path loads it from any working directory
    return name  # a hub id (loaded from the cache or the hub by its id), or a checkpoint that is gone (load says so)


def _inputs(run):
    try:
        return run.inputs()
    except AttnlabError:
        raise
    except Exception as e:  # unreadable inputs: one line, as for any other run file
        raise AttnlabError(f"the inputs of run {run.directory.name} cannot be read: {type(e).__name__}") from None


def n_prompts(run) -> int:
    """How many prompts the run was made on (its kept inputs, else its dataset record; 0 when unreadable)."""
    try:
        stored = _inputs(run)
    except AttnlabError:
        stored = None
    if stored is not None:
        return len(stored)
    return int(run.info.get("dataset", {}).get("n_prompts", 0) or 0)


def prompt_options(run, limit: int | None = None) -> list[dict[str, str]]:
    """``run prompt i`` entries (with a preview of the text where the run kept it), the first ``limit`` at most,
    and the typed prompt."""
    try:
        stored = _inputs(run)
    except AttnlabError:
        stored = None
    n = len(stored) if stored is not None else int(run.info.get("dataset", {}).get("n_prompts", 0) or 0)
    shown = n if limit is None else min(n, limit)
    if stored is not None:
        options = [{"label": f"run prompt {i}: {stored.label(i)}", "value": str(i)} for i in range(shown)]
    else:
        options = [{"label": f"run prompt {i}", "value": str(i)} for i in range(shown)]
    return options + [{"label": "typed prompt", "value": TYPED}]


def run_prompt(live, run, index: int) -> RunPrompt:
    """Prompt ``index`` of ``run`` as the scan saw it: token ids, plus its text and image for vision-language
    prompts (the image must be fed again to get the same attention)."""
    stored = _inputs(run)
    if stored is not None:
        if not 0 <= index < len(stored):
            raise AttnlabError(f"the run has {len(stored)} prompts; there is no prompt {index}")
        if stored.has_images:
            text = stored.texts[index] if stored.texts is not None else None
            if text is None:
                raise AttnlabError("the run's image prompts kept no text; type a prompt instead")
            return RunPrompt(ids=tuple(stored.token_ids[index]), text=text, image=stored.image(index), index=index)
        return RunPrompt(ids=tuple(stored.token_ids[index]), index=index)
    info = run.info
    if info.get("model", {}).get("modality") == "vision-language":
        return _regenerated_image_prompt(live, info, index)
    return RunPrompt(ids=tuple(live.run_prompt_ids(info, index, model_to_load(info))), index=index)


def _regenerated_image_prompt(live, info: dict, index: int) -> RunPrompt:
    """A shape-scene prompt of a run written before runs kept their inputs, regenerated and fingerprint-checked."""
    from attnlab.apps.vision import run_image_prompts

    with live.exclusive(model_to_load(info)) as model:
        texts, images = run_image_prompts(model, info)
        if not 0 <= index < len(texts):
            raise AttnlabError(f"the run has {len(texts)} prompts; there is no prompt {index}")
        batch = model.encode([texts[index]], images=[images[index]])
        ids = batch.input_ids[0, batch.real_slice(0)].tolist()
    return RunPrompt(ids=tuple(ids), text=texts[index], image=images[index], index=index)


def run_prompt_set(run, model=None) -> Any:
    """The run's prompts as a ``PromptSet`` (kept inputs), or None for a run that did not keep them."""
    stored = _inputs(run)
    return None if stored is None else stored.prompt_set()


__all__ = ["TYPED", "model_to_load", "n_prompts", "prompt_options", "run_prompt", "run_prompt_set"]
