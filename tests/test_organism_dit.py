"""organism-dit: digits loader, scorer, smoke training + diffusers reload, sampling, shipped-model behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from attnlab.datasets import digits as digits_data  # noqa: E402
from attnlab.models import dit  # noqa: E402
from attnlab.models.training import dit as dit_training  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "attnlab" / "models" / "bundled" / "organism-dit"


# ---------------------------------------------------------------------------------------------- data


def test_digits_split_is_fixed_disjoint_and_stratified():
    idx = digits_data.split_indices()
    train, test = set(idx["train"].tolist()), set(idx["test"].tolist())
    assert not train & test
    assert len(train) + len(test) == 1797
    _, y_test = digits_data.load_digit_images("test", size=8)
    assert sorted(set(y_test.tolist())) == list(range(10))
    assert np.bincount(y_test).min() >= 30
    again = digits_data.split_indices()
    np.testing.assert_array_equal(idx["test"], again["test"])


@pytest.mark.parametrize("size", [8, 16])
def test_digit_images_shape_range_and_native_values(size):
    x, y = digits_data.load_digit_images("train", size=size)
    assert x.shape == (len(y), 1, size, size) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == -1.0 and x.max() > 0.9  # background and full ink both present
    if size == 8:
        feats, y2 = digits_data.load_digit_features("train")
        np.testing.assert_allclose((x[:, 0].reshape(len(y), -1) + 1) / 2, feats, atol=1e-6)
        np.testing.assert_array_equal(y, y2)


def test_upsample_then_downsample_is_close_to_identity():
    feats, _ = digits_data.load_digit_features("test")
    small = feats.reshape(-1, 8, 8)
    rt = digits_data.downsample(digits_data.upsample(small, 16))
    own = np.abs(rt - small).mean()
    other = np.abs(rt - np.roll(small, 1, axis=0)).mean()
    assert own < 0.1 and own < 0.5 * other
    with pytest.raises(ValueError):
        digits_data.upsample(small, 12)


# ---------------------------------------------------------------------------------------------- scorer


def test_scorer_is_accurate_on_held_out_real_digits():
    x, y = dit.real_digits_01("test", size=16)
    scorer = dit.get_scorer()
    assert (scorer.predict(x) == y).mean() >= 0.9
    p = scorer.prob_of(x, y)
    assert p.shape == (len(y),) and p.mean() > 0.8
    # a wrong label gets a low probability
    assert scorer.prob_of(x, (y + 1) % 10).mean() < 0.1


def _dilate(images: np.ndarray) -> np.ndarray:
    """3x3 grey-scale dilation (max filter) of (N, 1, S, S) images."""
    t = torch.from_numpy(images)
    return torch.nn.functional.max_pool2d(t, 3, stride=1, padding=1).numpy()


def test_style_scores_rank_thickened_digits_above_originals():
    x, _ = dit.real_digits_01("test", size=16)
    x = x[:100]
    thick = _dilate(x)
    s0, s1 = dit.style_scores(x), dit.style_scores(thick)
    for name in ("ink", "thickness"):
        assert (s1[name] >= s0[name]).all()
        assert s1[name].mean() > s0[name].mean() * 1.2


def test_slant_sign_follows_shear():
    img = np.zeros((2, 16, 16))
    for r in range(16):
        img[0, r, 15 - r] = 1.0  # "/" leans right
        img[1, r, r] = 1.0  # "\" leans left
    slant = dit.style_scores(img)["slant"]
    assert slant[0] > 0.5 and slant[1] < -0.5


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit-smoke")
    torch.set_num_threads(1)
    rc = dit_training.main(["--out", str(out), "--preset", "smoke", "--device", "cpu", "--seed", "0", "--threads", "1"])
    assert rc == 0
    return out


def test_smoke_run_writes_expected_files(smoke_dir):
    for rel in (
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "train_log.jsonl",
        "metrics.json",
        "MODEL_CARD.md",
        "samples.png",
    ):
        assert (smoke_dir / rel).is_file(), rel
    assert not list(smoke_dir.rglob("*.bin")) and not list(smoke_dir.rglob("*.pkl"))
    log = [json.loads(line) for line in (smoke_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == dit_training.PRESETS["smoke"]["steps"]
    assert all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    metrics = json.loads((smoke_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["classify"]["acc_guided"] <= 1.0
    assert metrics["train"]["steps_done"] == log[-1]["step"]
    assert "python -m attnlab.models.train dit" in (smoke_dir / "MODEL_CARD.md").read_text()
    from PIL import Image

    with Image.open(smoke_dir / "samples.png") as im:
        assert im.size[0] > 16 * 10 and im.size[1] > 16 * 10


def test_smoke_model_reloads_in_diffusers(smoke_dir):
    from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(smoke_dir), subfolder="transformer")
    assert model.config.num_embeds_ada_norm == 10 and model.config.in_channels == 1
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 11  # ten digits + the null class
    ddpm = DDPMScheduler.from_pretrained(str(smoke_dir), subfolder="scheduler")
    ddim = DDIMScheduler.from_pretrained(str(smoke_dir), subfolder="scheduler")
    assert ddpm.config.prediction_type == ddim.config.prediction_type == "epsilon"
    # the reloaded weights are the trained ones (zero-initialised output layer has moved)
    assert model.proj_out_2.weight.abs().sum() > 0


def test_sampling_is_deterministic_with_right_shape_and_range(smoke_dir):
    org = dit.load(smoke_dir)
    labels = [0, 3, 7, dit.NULL_CLASS]
    a = dit.sample(org, labels, guidance_scale=2.0, num_steps=4, seed=123, device="cpu")
    b = dit.sample(str(smoke_dir), labels, guidance_scale=2.0, num_steps=4, seed=123, device="cpu")
    c = dit.sample(org, labels, guidance_scale=2.0, num_steps=4, seed=124, device="cpu")
    size = org.transformer.config.sample_size
    assert a.shape == (4, 1, size, size) and a.dtype == torch.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    d = dit.sample(org, labels, guidance_scale=2.0, num_steps=4, seed=123, scheduler="dpm")
    assert d.shape == a.shape and torch.isfinite(d).all()
    with pytest.raises(ValueError):
        dit.sample(org, [11], num_steps=2)


def test_guidance_combination_matches_formula(smoke_dir):
    org = dit.load(smoke_dir)
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16)
    t = torch.tensor(500)
    y = torch.tensor([1, 2, 3])
    m = org.transformer
    with torch.no_grad():
        cond = dit.guided_noise(m, x, t, y, 1.0)
        null = dit.guided_noise(m, x, t, y, 0.0)
        mix = dit.guided_noise(m, x, t, y, 3.0)
    torch.testing.assert_close(mix, null + 3.0 * (cond - null), rtol=1e-4, atol=1e-5)


def test_custom_noise_fn_replaces_guidance(smoke_dir):
    org = dit.load(smoke_dir)
    labels = [2, 5]
    guided = dit.sample(org, labels, guidance_scale=1.0, num_steps=3, seed=7)
    same = dit.sample(org, labels, num_steps=3, seed=7, noise_fn=lambda m, x, t, y: dit.guided_noise(m, x, t, y, 1.0))
    torch.testing.assert_close(guided, same, rtol=0, atol=0)
    zero = dit.sample(org, labels, num_steps=3, seed=7, noise_fn=lambda m, x, t, y: torch.zeros_like(x))
    assert not torch.equal(zero, guided)


def test_evaluate_rejects_unknown_task(smoke_dir):
    with pytest.raises(ValueError):
        dit.evaluate(str(smoke_dir), "fid")


# ---------------------------------------------------------------------------------------------- shipped model


@pytest.mark.skipif(not (SHIPPED / "transformer" / "config.json").exists(), reason="organism-dit not shipped yet")
def test_shipped_model_generates_the_intended_digits():
    res = dit.evaluate(str(SHIPPED), "classify", n=5, seed=1, num_steps=20, include_unguided=False)
    assert res["n_total"] == 50
    assert res["acc_guided"] >= 0.75
