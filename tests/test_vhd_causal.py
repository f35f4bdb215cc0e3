"""VHD causal check on organism-vlm: the image-question evaluator used for it sees the images, the causal table is
built from the probe's own top heads, and the measured structure behind the (negative) result holds: on this
organism the heads whose ablation hurts image questions sit in layer 0, where most heads have VHD = 0."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.models.bundled import bundled_path

pytestmark = pytest.mark.skipif(bundled_path("organism-vlm") is None, reason="organism-vlm not bundled")


@pytest.fixture(scope="module")
def vlm():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add contention on a shared CPU
    yield attnlab.load("organism-vlm")
    torch.set_num_threads(before)


def test_evaluator_scores_answers_with_their_own_images(vlm):
    from attnlab.ablation.evaluators import image_question_evaluator
    from attnlab.datasets.shapes import shape_question_items

    items = shape_question_items(24, 303)
    true = image_question_evaluator(vlm, items)([])
    swapped = [(items[(i + 7) % len(items)][0], q) for i, (_, q) in enumerate(items)]  # each question on another scene
    wrong = image_question_evaluator(vlm, swapped)([])
    assert true["accuracy"] > wrong["accuracy"] + 0.1 and true["logprob"] > wrong["logprob"]


def test_causal_table_uses_the_top_vhd_heads_and_layer_zero_carries_the_effect(vlm):
    from attnlab.ablation.causal_test import vhd_causal_tables
    from attnlab.ablation.evaluators import image_question_evaluator
    from attnlab.datasets.shapes import shape_question_items

    tables = vhd_causal_tables(vlm, k=4, n_seeds=2, n_detect=8, n_eval=24, variants={"spec": {}})
    acc = tables["spec"]["accuracy"].set_index("condition")
    assert list(acc.index) == ["baseline", "top_k", "random"] and acc.loc["random", "n_sets"] == 2
    assert len(acc.loc["top_k", "heads"].split()) == 4
    assert 0 <= acc.loc["top_k", "metric"] <= 1 and 0 < acc.loc["top_k", "p_value"] <= 1
    evaluate = image_question_evaluator(vlm, shape_question_items(24, 202))
    base = evaluate([])["logprob"]
    drop = [base - evaluate([(l, h) for h in range(vlm.n_heads)])["logprob"] for l in range(vlm.n_layers)]
    assert drop[0] > 2 * max(drop[1:])  # whole-layer zero ablation: layer 0 matters most for image questions
