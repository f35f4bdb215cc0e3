"""The bundled organisms load through the same ``attnlab.load`` path as a user's model, and the probes see what
their model cards report (organism-lm: NIAH-trained Llama with GQA and a partial first-token sink;
organism-vlm: LLaVA whose image tokens soak up attention)."""

from __future__ import annotations

import pytest

import attnlab
from attnlab.datasets import DATASETS
from attnlab.errors import AttnlabError
from attnlab.models.bundled import bundled_path

needs = lambda alias: pytest.mark.skipif(bundled_path(alias) is None, reason=f"{alias} not bundled")


@needs("organism-lm")
def test_organism_lm_loads_with_gqa_and_shows_a_partial_first_token_sink():
    m = attnlab.load("organism-lm")
    assert (m.architecture, m.n_layers, m.n_heads, m.n_kv_heads, m.n_ctx) == ("LlamaForCausalLM", 8, 12, 6, 1024)
    assert m.bos_policy == "tokenizer"
    res = attnlab.scan(m, "sinks", DATASETS["prose"](m, 8, 0), progress=False)
    sink = res["first_token_sink"].scores[1:]
    # measured 0.29 of heads past layer 0 above 0.3 (MODEL_CARD); uniform attention over these prompts gives < 0.05
    assert (sink > 0.3).mean() >= 0.2
    hidden = res["act_hidden_sinks"].summary["hidden_sink_tokens"]
    assert max(hidden, key=hidden.get) in (".", ",", " the")


@needs("organism-vlm")
def test_organism_vlm_loads_and_its_image_tokens_are_hidden_sinks():
    from attnlab.datasets.base import PromptSet
    from attnlab.datasets.shapes import render_scene, task_questions

    m = attnlab.load("organism-vlm")
    assert m.modality == "vision-language" and m.image_token_id is not None
    items = task_questions("attribute", 4, 0)
    texts = [f"USER: <image>\n{q.text} ASSISTANT:" for _, q in items]
    images = [render_scene(s) for s, _ in items]
    batch = m.encode(texts, images=images)
    assert batch.image_mask.sum(1).tolist() == [64] * 4
    res = attnlab.scan(m, "sinks", PromptSet(name="shapes", texts=texts, images=images), progress=False)
    hidden = res["act_hidden_sinks"].summary["hidden_sink_tokens"]
    assert max(hidden, key=hidden.get) == "<image>"


@needs("organism-dit")
def test_organism_dit_is_refused_by_the_transformer_loader_with_a_clear_message():
    with pytest.raises(AttnlabError, match="diffusers"):
        attnlab.load("organism-dit")
