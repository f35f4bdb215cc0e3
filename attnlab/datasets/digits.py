"""scikit-learn's bundled handwritten digits as a tiny image data set for the DiT organism.

`sklearn.datasets.load_digits` ships 1,797 grey-scale 8x8 digits (values 0-16, ten classes) inside the
scikit-learn wheel, so nothing is downloaded. This module turns them into float32 arrays the diffusion
model trains on:

* values are mapped linearly from [0, 16] to [-1, 1] (background = -1, full ink = +1), the usual range for
  diffusion models;
* images are optionally upsampled by an integer factor with bilinear interpolation (half-pixel centres,
  ``align_corners=False``). The default, 16x16, gives a patch-2 DiT 8x8 = 64 tokens, enough for attention
  maps with visible structure, while staying cheap. ``size=8`` returns the originals unchanged;
* the train/test split is fixed (stratified, 20 % test, split seed 0) and independent of any training
  seed, so every model and scorer sees the same held-out digits.

Everything is pure and deterministic: the same call returns the same arrays on every machine.

Example::

    from attnlab.datasets.digits import load_digit_images
    x, y = load_digit_images("train", size=16)   # x: (1437, 1, 16, 16) float32 in [-1, 1]; y: (1437,) int64
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Split = Literal["train", "test", "all"]

NATIVE_SIZE = 8
"""Side length of the bundled digits."""
MAX_VALUE = 16.0
"""Largest pixel value in the bundled digits (ink intensity scale 0-16)."""
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
"""Seed of the fixed train/test split; deliberately not a parameter so that every consumer agrees."""


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (images float32 (N, 8, 8) in 0-16, labels int64 (N,))."""
    from sklearn.datasets import load_digits  # scikit-learn loads on first use only (start-up time)

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def split_indices(n: int | None = None) -> dict[str, np.ndarray]:
    """Sorted indices of the fixed stratified train / test split of the bundled digits.

    Parameters
    ----------
    n : int, optional
        Only used as a consistency check against the number of bundled digits.
    """
    from sklearn.model_selection import train_test_split  # (start-up time, as above)

    _, labels = _raw_digits()
    if n is not None and n != len(labels):
        raise ValueError(f"expected {len(labels)} digits, got n={n}")
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED)
    return {"train": np.sort(train), "test": np.sort(test), "all": idx}


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W) images to (N, size, size) with half-pixel centres.

    ``size`` must be a positive multiple of the input side so that `downsample` (area average) is the
    natural inverse used by the scorer.
    """
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must have shape (N, S, S), got {images.shape}")
    side = images.shape[1]
    if size <= 0 or size % side:
        raise ValueError(f"size must be a positive multiple of {side}, got {size}")
    if size == side:
        return images.astype(np.float32, copy=True)
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


def downsample(images: np.ndarray, size: int = NATIVE_SIZE) -> np.ndarray:
    """Area-average (N, S, S) images down to (N, size, size); S must be a multiple of ``size``."""
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must have shape (N, S, S), got {images.shape}")
    side = images.shape[1]
    if side % size:
        raise ValueError(f"image side {side} is not a multiple of {size}")
    f = side // size
    return images.reshape(len(images), size, f, size, f).mean(axis=(2, 4)).astype(np.float32)


def load_digit_images(split: Split = "train", *, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Digits of one split as diffusion-ready arrays.

    Parameters
    ----------
    split : {"train", "test", "all"}, default="train"
        Fixed stratified split (1,437 train / 360 test digits).
    size : int, default=16
        Output side length; a multiple of 8. 8 returns the originals.

    Returns
    -------
    images : ndarray of shape (N, 1, size, size), float32, values in [-1, 1]
    labels : ndarray of shape (N,), int64, values 0-9
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    raw, labels = _raw_digits()
    idx = split_indices()[split]
    imgs = upsample(raw[idx], size)
    imgs = np.clip(imgs / MAX_VALUE * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
    return imgs[:, None], labels[idx].copy()


def load_digit_features(split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """Native 8x8 digits of one split as flat features in [0, 1] (N, 64) for the scorer, with labels."""
    raw, labels = _raw_digits()
    idx = split_indices()[split]
    return (raw[idx] / MAX_VALUE).reshape(len(idx), -1).astype(np.float32), labels[idx].copy()
