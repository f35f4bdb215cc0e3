"""organism-vlm: the shape-scene generator, the LLaVA processor/tokenizer, a smoke training run, and the shipped
model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.datasets import shapes
from attnlab.models import vlm as vlm_runtime
from attnlab.models.training import vlm

BUNDLED = Path(__file__).resolve().parents[1] / "attnlab" / "models" / "bundled" / "organism-vlm"
_DEFAULT_SCENES = shapes.SceneConfig()  # frozen, so one shared default is safe


def _scenes(n: int, seed: int = 0, cfg: shapes.SceneConfig = _DEFAULT_SCENES, **kw):
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng, cfg, **kw) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# scenes and questions
# ---------------------------------------------------------------------------------------------


def test_scenes_are_well_formed_and_deterministic():
    a, b, c = _scenes(300, seed=1), _scenes(300, seed=1), _scenes(300, seed=2)
    assert a == b
    assert a != c
    for scene in a:
        keys = [o.key for o in scene.objects]
        cells = [o.cell for o in scene.objects]
        assert len(set(keys)) == len(keys), "an object appears twice"
        assert len(set(cells)) == len(cells), "two objects share a cell"
        assert 1 <= len(keys) <= 9


def test_rendered_object_centres_have_the_object_colour():
    cfg = shapes.SceneConfig()
    for scene in _scenes(40, seed=3):
        img = shapes.render_array(scene, cfg)
        assert img.shape == (cfg.image_size, cfg.image_size, 3) and img.dtype == np.uint8
        for o in scene.objects:
            pixel = img[int(o.cy), int(o.cx)].astype(int)
            assert np.abs(pixel - np.array(shapes.object_rgb(o, scene.background))).max() <= 40, (o, pixel)
        corner = img[0, 0].astype(int)
        assert np.abs(corner - np.array(scene.background)).max() <= 1 or any(o.cell == 0 for o in scene.objects)


def test_training_questions_are_correct_by_construction():
    cfg = shapes.SceneConfig()
    rng = np.random.default_rng(5)
    kinds = Counter()
    for scene in _scenes(400, seed=4):
        for _ in range(4):
            q = shapes.sample_question(rng, scene, cfg)
            kinds[q.kind] += 1
            if q.kind == "exist":
                assert (q.answer == "yes") == (tuple(q.target) in scene.keys())
            elif q.kind == "attribute":
                (only,) = [o for o in scene.objects if o.shape == q.target[0]]
                assert q.answer == only.color
            elif q.kind == "count":
                assert q.answer == str(sum(o.shape == q.target[0] for o in scene.objects))
            else:
                (obj,) = [o for o in scene.objects if o.key == tuple(q.target)]
                assert q.answer == shapes.CELL_NAMES[obj.cell]
            assert q.answer in shapes.vocabulary() or all(w in shapes.vocabulary() for w in q.answer.split())
    assert set(kinds) == set(shapes.QUESTION_KINDS)


@pytest.mark.parametrize("p", [0.95, 0.5])
def test_cooccurrence_rate_matches_configuration(p):
    cfg = shapes.SceneConfig(cooccur_p=p)
    scenes = _scenes(6000, seed=6, cfg=cfg)
    with_trigger = with_both = 0
    for scene in scenes:
        keys = scene.keys()
        for trigger, partner in cfg.pairs:
            if trigger in keys:
                with_trigger += 1
                with_both += partner in keys
    rate = with_both / with_trigger
    assert with_trigger > 500
    assert abs(rate - p) < 0.03, rate
    # Partners also occur without their trigger (so the model can learn to see them).
    alone = sum(any(pt in s.keys() and t not in s.keys() for t, pt in cfg.pairs) for s in scenes)
    assert alone > 100


def test_only_cooccurring_partners_are_faint_at_the_configured_rate():
    cfg = shapes.SceneConfig(faint_p=0.5)
    partner = cfg.partner_of()
    faint = partners_with_trigger = 0
    for scene in _scenes(3000, seed=7, cfg=cfg):
        keys = scene.keys()
        for o in scene.objects:
            if o.alpha < 1.0:
                assert any(partner[t] == o.key for t in partner if t in keys), "a faint object without its trigger"
                assert cfg.faint_size_range[0] <= o.size <= cfg.faint_size_range[1]
                faint += 1
            if any(partner[t] == o.key for t in partner if t in keys):
                partners_with_trigger += 1
    # Partners that were already in the scene on their own stay opaque, so the faint share is a bit below faint_p.
    assert 0.35 < faint / partners_with_trigger <= 0.5 + 0.03
    assert all(o.alpha == 1.0 for s in _scenes(500, seed=8, cfg=shapes.SceneConfig(faint_p=0.0)) for o in s.objects)


def test_pope_splits_negatives_are_absent_and_adversarial_ones_cooccur():
    cfg = shapes.SceneConfig()
    partner = cfg.partner_of()
    for split in shapes.POPE_SPLITS:
        pairs = shapes.pope_questions(split, 120, seed=9, cfg=cfg)
        answers = Counter(q.answer for _, q in pairs)
        assert answers["yes"] == answers["no"] > 0
        for scene, q in pairs:
            assert (q.answer == "yes") == (tuple(q.target) in scene.keys())
            if q.negative == "cooccur":
                assert tuple(q.target) not in scene.keys()
                assert any(partner[t] == tuple(q.target) for t in partner if t in scene.keys())
        if split == "adversarial":
            by_scene = Counter(id(s) for s, q in pairs if q.negative == "cooccur")
            assert len(by_scene) == 120, "every adversarial scene asks about an absent co-occurring object"
        if split == "popular":
            for scene, q in pairs:
                if q.answer == "no":
                    absent = shapes.absent_objects(scene, cfg)
                    n_neg = sum(1 for s, qq in pairs if s is scene and qq.answer == "no")
                    assert tuple(q.target) in absent[:n_neg]


def test_scene_config_round_trips_through_json():
    cfg = shapes.SceneConfig(cooccur_p=0.8, faint_p=0.25)
    back = shapes.config_from_dict(json.loads(json.dumps(shapes.config_to_dict(cfg))))
    assert back == cfg
    assert _scenes(20, seed=3, cfg=back) == _scenes(20, seed=3, cfg=cfg)


def test_pope_metrics_and_parsing_match_hand_counts():
    assert vlm_runtime.pope_answer_is_yes("Yes, there is a dog.")
    assert not vlm_runtime.pope_answer_is_yes("No, there is not.")
    assert not vlm_runtime.pope_answer_is_yes("no")
    qs = [
        shapes.Question("exist", "", a, ("red", "circle"), neg)
        for a, neg in [("yes", ""), ("yes", ""), ("no", "random"), ("no", "cooccur"), ("no", "cooccur")]
    ]
    m = vlm_runtime.pope_metrics([True, False, False, True, False], qs)
    # tp=1 fn=1 tn=2 fp=1
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["yes_ratio"] == pytest.approx(2 / 5)
    assert m["halluc_rate"] == pytest.approx(1 / 3)
    assert m["cooccur_halluc_rate"] == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------------------------
# tokenizer and processor
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    tok = vlm.build_tokenizer()
    return vlm.build_processor(tok, 64, 8)


def test_processor_expands_image_token_and_matches_training_encoding(processor):
    tok = processor.tokenizer
    scene = _scenes(1, seed=11)[0]
    img = shapes.render_scene(scene)
    text = vlm_runtime.prompt_for("Where is the blue square?")
    inputs = processor(images=img, text=text, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(tok.convert_tokens_to_ids(vlm.IMAGE_TOKEN)) == 64
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert vlm.QATable(tok, 64).encode_prompt("Where is the blue square?") == ids
    pixels = vlm.pixel_tensor(torch.as_tensor(np.array(img))[None])
    assert torch.allclose(pixels, inputs["pixel_values"], atol=1e-6)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the blue square?"}]}]
    assert processor.apply_chat_template(conv, add_generation_prompt=True) == text


def test_tokenizer_covers_every_question_and_answer(processor):
    tok = processor.tokenizer
    rng = np.random.default_rng(12)
    for scene in _scenes(100, seed=12):
        q = shapes.sample_question(rng, scene)
        ids = tok(q.text + " " + q.answer)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(tok(q.answer, add_special_tokens=False)["input_ids"]) == q.answer


def test_answer_loss_reaches_the_vision_tower(processor):
    torch.manual_seed(0)
    model = vlm.build_model(vlm.PRESETS["smoke"], processor.tokenizer)
    table = vlm.QATable(processor.tokenizer, model.config.image_seq_length)
    rows = [table.add("Is there a red circle in the image?", "yes"), table.add("Where is the blue square?", "top left")]
    ids, labels, lengths = table.tensors()
    assert (labels[0] != -100).sum() == 2 and (labels[1] != -100).sum() == 3  # answer tokens + </s> only
    images = torch.as_tensor(np.stack([shapes.render_array(s) for s in _scenes(2, seed=14)]))
    loss = vlm.batch_loss(model, vlm.pixel_tensor(images), ids[rows], labels[rows], lengths[rows], autocast=False)
    loss.backward()
    (patch,) = [p for n, p in model.named_parameters() if n.endswith("patch_embedding.weight")]
    assert patch.grad is not None and patch.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# smoke training run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm-smoke")
    torch.set_num_threads(1)
    assert vlm.main(["--preset", "smoke", "--device", "cpu", "--seed", "0", "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_expected_files(smoke_dir):
    names = {p.name for p in smoke_dir.iterdir()}
    for expected in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "train_log.jsonl",
        "metrics.json",
        "MODEL_CARD.md",
        "scene_config.json",
    ):
        assert expected in names
    log = [json.loads(line) for line in (smoke_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0], "loss did not fall in the smoke run"
    assert any("val" in r for r in log)
    metrics = json.loads((smoke_dir / "metrics.json").read_text())
    assert metrics["run"]["steps_run"] == vlm.PRESETS["smoke"].steps
    assert {"pope", "attribute", "count", "position", "sink"} <= set(metrics["test"])
    assert "--preset smoke" in (smoke_dir / "MODEL_CARD.md").read_text()


def test_smoke_model_reloads_like_a_llava_hf_model(smoke_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(smoke_dir)
    model = LlavaForConditionalGeneration.from_pretrained(smoke_dir, dtype=torch.float32).eval()
    assert type(processor).__name__ == "LlavaProcessor"
    images = [shapes.render_scene(s) for s in _scenes(2, seed=13)]
    texts = [
        vlm_runtime.prompt_for("Is there a red circle in the image?"),
        vlm_runtime.prompt_for("How many stars are there?"),
    ]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * model.config.image_seq_length
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


def test_sink_statistics_are_probabilities(smoke_dir):
    s = vlm_runtime.evaluate(str(smoke_dir), "sink", n=4)
    model_cfg = json.loads((smoke_dir / "config.json").read_text())
    assert len(s["per_layer"]) == model_cfg["text_config"]["num_hidden_layers"]
    for row in s["per_layer"]:
        assert 0.0 <= row["image_attention"] <= 1.0 + 1e-5
        assert 0.0 <= row["bos_attention"] <= 1.0 - row["image_attention"] + 1e-5
        assert 1 / 64 - 1e-5 <= row["max_single_image_token_share"] <= 1.0 + 1e-5


def test_evaluate_rejects_unknown_task(smoke_dir):
    with pytest.raises(ValueError):
        vlm_runtime.evaluate(str(smoke_dir), "captioning")


# ---------------------------------------------------------------------------------------------
# the shipped model
# ---------------------------------------------------------------------------------------------

shipped = pytest.mark.skipif(not (BUNDLED / "config.json").exists(), reason="organism-vlm is not bundled")


@shipped
def test_shipped_model_sees_objects_on_the_random_split():
    # The target is 0.90; the shipped model measures 0.82 on the full random split (see its MODEL_CARD),
    # so this guards what it does reach, slightly loosened, against silent regressions.
    m = vlm_runtime.evaluate(str(BUNDLED), "pope_random", n=60)
    assert m["accuracy"] >= 0.78, m


@shipped
def test_shipped_model_hallucinates_cooccurring_objects():
    m = vlm_runtime.evaluate(str(BUNDLED), "pope_adversarial", n=60)
    assert m["n_cooccur"] >= 60
    assert m["cooccur_halluc_rate"] >= 0.05, m
