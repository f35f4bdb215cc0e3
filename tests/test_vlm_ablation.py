"""Ablation scoring and the causal test on a vision-language model (tiny random LLaVA): every prompt runs with its
own image through every sub-batch, the batched evaluator equals a one-prompt-at-a-time loop, `attnlab ablate`
scores image questions on a VLM run, and text / image metrics on the wrong kind of model fail with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnlab.ablation.evaluators import ImagePrompts, ablation_evaluator, check_metric_modality
from attnlab.ablation.head_ablation import HeadAblation
from attnlab.ablation.metrics import AnswerTokens
from attnlab.datasets import shape_prompt_set
from attnlab.errors import AttnlabError
from attnlab.models.loading import Batch


@pytest.fixture(scope="module")
def questions():
    """Six shape-scene questions (two kinds) with their answers and rendered images."""
    ps = [shape_prompt_set("attribute", 3, 11), shape_prompt_set("position", 3, 12)]
    texts = [t for p in ps for t in p.texts]
    return texts, [" " + m["answer"] for p in ps for m in p.meta], [im for p in ps for im in p.images]


def loop_logprob(model, texts, answers, images, heads, mode="zero", reference=None):
    """Reference: one prompt per forward, its ids and pixel values straight from the processor, the answer
    tokens appended, ``HeadAblation`` applied to that single row."""
    abl = HeadAblation(heads, mode=mode).fit(model, reference)
    out = []
    with torch.no_grad():
        for text, answer, image in zip(texts, answers, images):
            enc = model.encode([text], images=[image])
            prompt = enc.input_ids[0, enc.real_slice(0)].tolist()
            target = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + target])
            batch = Batch(ids, torch.ones_like(ids), [0], enc.pixel_values, ids == model.image_token_id)
            with abl.apply(model, batch):
                logp = model.forward(batch)[0].float().log_softmax(-1)
            out.append(sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(target)))
    return float(np.mean(out))


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_batched_vlm_scores_equal_the_one_at_a_time_loop(loaded, questions, mode):
    model = loaded("llava")
    texts, answers, images = questions
    heads = [(0, 1), (1, 2)]
    ref = model.encode(texts[:4], images=images[:4]) if mode == "mean" else None
    evaluate = ablation_evaluator(
        model,
        texts,
        AnswerTokens(answers),
        images=images,
        mode=mode,
        reference=texts[:4] if ref is not None else None,
        reference_images=images[:4] if ref is not None else None,
        batch_size=4,
    )  # sub-batches of 4 and 2
    for hs in ([], heads):
        assert evaluate(hs) == pytest.approx(
            loop_logprob(model, texts, answers, images, hs, mode=mode, reference=ref), abs=1e-4
        )
    assert abs(evaluate(heads) - evaluate([])) > 1e-4  # the ablation did something


def test_the_images_are_really_used(loaded, questions):
    model = loaded("llava")
    texts, answers, images = questions
    blank = [Image.new("RGB", im.size, (255, 255, 255)) for im in images]
    shuffled = images[3:] + images[:3]
    metric = lambda: AnswerTokens(answers)
    own = ablation_evaluator(model, texts, metric(), images=images, batch_size=4)([])
    other = ablation_evaluator(model, texts, metric(), images=blank, batch_size=4)([])
    swapped = ablation_evaluator(model, texts, metric(), images=shuffled, batch_size=4)([])
    assert abs(own - other) > 1e-3 and abs(own - swapped) > 1e-3
    # each row keeps its own image in every sub-batch: equal to the loop with the shuffled images
    assert swapped == pytest.approx(loop_logprob(model, texts, answers, shuffled, []), abs=1e-4)
    # a PromptSet carries its images itself
    ps = shape_prompt_set("attribute", 3, 11)
    a = ablation_evaluator(model, ps, AnswerTokens(answers[:3]))([])
    b = ablation_evaluator(model, ps.texts, AnswerTokens(answers[:3]), images=ps.images)([])
    assert a == b


def test_several_metrics_from_one_forward(loaded, questions):
    model = loaded("llava")
    texts, answers, images = questions
    both = ablation_evaluator(
        model, texts, {"acc": AnswerTokens(answers, reduce="exact_match"), "lp": AnswerTokens(answers)}, images=images
    )([(1, 0)])
    assert set(both) == {"acc", "lp"} and 0.0 <= both["acc"] <= 1.0
    assert both["lp"] == pytest.approx(
        ablation_evaluator(model, texts, AnswerTokens(answers), images=images)([(1, 0)]), abs=1e-6
    )
    with pytest.raises(ValueError, match="same token ids"):
        ablation_evaluator(model, texts, {"a": AnswerTokens(answers), "b": AnswerTokens(" yes")}, images=images)


def test_image_prompts_pixels_match_the_processor(loaded, questions):
    model = loaded("llava")
    texts, _, images = questions
    view = ImagePrompts(model, images)
    batch = view.batch_from_ids([view.token_ids(t, index=i) for i, t in enumerate(texts)], list(range(len(texts))))
    enc = model.encode(texts, images=images)
    assert torch.equal(batch.pixel_values, enc.pixel_values) and torch.equal(batch.image_mask, enc.image_mask)
    assert int(batch.image_mask.sum()) > 0


def test_wrong_modality_is_a_one_line_error(loaded, questions):
    texts, answers, images = questions
    gpt2, llava = loaded("gpt2"), loaded("llava")
    with pytest.raises(AttnlabError, match="text model"):
        ablation_evaluator(gpt2, ["a b c"], AnswerTokens(" d"), images=images[:1])
    with pytest.raises(AttnlabError, match="2 prompts but 1 images"):
        ablation_evaluator(llava, texts[:2], AnswerTokens(answers[:2]), images=images[:1])
    for model, metric, expect in (
        (llava, "niah", "vision-language model"),
        (llava, "logprob", "vision-language model"),
        (gpt2, "shapes", "text model"),
        (gpt2, "shapes-logprob", "text model"),
    ):
        with pytest.raises(AttnlabError, match=expect) as e:
            check_metric_modality(model, metric)
        assert "\n" not in str(e.value)
    check_metric_modality(llava, "shapes")
    check_metric_modality(gpt2, "niah")


def test_cli_ablate_on_a_vlm_run(checkpoint_dir, tmp_path, capsys):
    from attnlab.cli import main

    torch.set_num_threads(1)
    llava, gpt2 = str(checkpoint_dir / "llava"), str(checkpoint_dir / "gpt2")
    run = tmp_path / "vlm-run"
    assert (
        main(
            [
                "scan",
                "--model",
                llava,
                "--probes",
                "vision_aware_heads",
                "--dataset",
                "shapes",
                "--n-prompts",
                "2",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "tables"
    assert (
        main(
            [
                "ablate",
                "--model",
                llava,
                "--heads",
                f"{run}:vhd",
                "--k",
                "2",
                "--metric",
                "shapes",
                "--n-seeds",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "top_k" in printed and "random" in printed
    record = json.loads((out / "causal_test_vhd_k2_shapes.json").read_text())
    rows = {r["condition"]: r for r in record["rows"]}
    assert record["metric"] == "shapes" and len(record["random_values"]) == 2
    assert all(0.0 <= rows[c]["metric"] <= 1.0 for c in rows) and len(rows["top_k"]["heads"].split()) == 2
    # the log-prob variant on the same run: a real (negative) log-prob, the table differs from accuracy
    assert (
        main(
            [
                "ablate",
                "--model",
                llava,
                "--heads",
                f"{run}:vhd",
                "--k",
                "2",
                "--metric",
                "shapes-logprob",
                "--n-seeds",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lp = json.loads((out / "causal_test_vhd_k2_shapes-logprob.json").read_text())["rows"][0]["metric"]
    assert lp < 0
    capsys.readouterr()
    for model, metric, expect in ((llava, "niah", "vision-language model"), (gpt2, "shapes", "text model")):
        assert (
            main(
                ["ablate", "--model", model, "--heads", f"{run}:vhd", "--k", "2", "--metric", metric, "--out", str(out)]
            )
            == 2
        )
        err = [
            line for line in capsys.readouterr().err.splitlines() if line.startswith("attnlab:")
        ]  # (the loader's progress bar aside)
        assert len(err) == 1 and err[0].startswith("attnlab: error:") and expect in err[0]
    assert (
        main(
            [
                "ablate",
                "--model",
                llava,
                "--heads",
                f"{run}:vision_aware_heads",
                "--k",
                "2",
                "--metric",
                "shapes",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "have ['vhd'" in capsys.readouterr().err  # the probe name is not a result name: the run's names are listed
