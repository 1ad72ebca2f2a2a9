"""Tests for fedface.eval: verification, identification and embedding."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedface.eval import (
    eer,
    embed,
    gallery_probe_split,
    kfold_accuracy,
    pair_scores,
    rank1,
    raw_pixel_embed,
    roc_auc,
    roc_curve,
    tar_at_far,
    to_tensor,
    verification_report,
)


# --------------------------------------------------------------------------- #
# AUC / ROC
# --------------------------------------------------------------------------- #
def test_auc_perfect_reversed_ties():
    y = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    s = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert roc_auc(s, y) == 1.0
    assert roc_auc(-s, y) == 0.0
    assert roc_auc(np.full(6, 0.5), y) == 0.5
    # one genuine tied with one impostor: (8 wins + 0.5 tie) / 9
    s2 = np.array([0.9, 0.8, 0.3, 0.3, 0.2, 0.1])
    assert roc_auc(s2, y) == pytest.approx(8.5 / 9)


def test_auc_random_is_half():
    rng = np.random.default_rng(0)
    s = rng.normal(size=20000)
    y = rng.random(20000) < 0.5
    assert abs(roc_auc(s, y) - 0.5) < 0.02


def test_roc_curve_small():
    s = np.array([0.9, 0.8, 0.8, 0.4])
    y = np.array([True, True, False, False])
    far, tar, thr = roc_curve(s, y)
    np.testing.assert_allclose(far, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tar, [0, 0.5, 1, 1])
    assert thr[0] == np.inf
    np.testing.assert_allclose(thr[1:], [0.9, 0.8, 0.4])


# --------------------------------------------------------------------------- #
# EER
# --------------------------------------------------------------------------- #
def test_eer_gaussian():
    rng = np.random.default_rng(1)
    n = 200_000
    s = np.r_[rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n)]
    y = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    phi_minus_1 = 0.5 * math.erfc(1.0 / math.sqrt(2.0))  # 0.158655...
    assert abs(eer(s, y) - phi_minus_1) < 0.01


def test_eer_separable_and_interpolated():
    y = np.array([1, 1, 0, 0], dtype=bool)
    assert eer([0.9, 0.8, 0.2, 0.1], y) == 0.0
    assert eer([0.1, 0.2, 0.8, 0.9], y) == 1.0
    # ROC points (far, frr): (0,1) (0,.5) (.5,.5) (.5,0) (1,0) -> FAR = FRR = 0.5 exactly
    assert eer([0.9, 0.5, 0.6, 0.1], y) == pytest.approx(0.5)
    # 3 genuine / 1 impostor: points (0,1),(0,2/3),(1,2/3),(1,0): crossing between
    # (0,2/3) and (1,2/3) -> far = frr = 2/3
    y3 = np.array([1, 1, 1, 0], dtype=bool)
    assert eer([0.9, 0.2, 0.1, 0.5], y3) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- #
# TAR @ FAR
# --------------------------------------------------------------------------- #
def test_tar_at_far_and_resolution():
    gen = [0.9, 0.8, 0.7, 0.6]
    imp = [0.75, 0.5, 0.4, 0.3, 0.2]
    s = np.r_[gen, imp]
    y = np.r_[np.ones(4, bool), np.zeros(5, bool)]
    # only 5 impostors: FAR resolution 0.2, so FAR <= 1e-3 means FAR = 0
    assert tar_at_far(s, y, 1e-3) == 0.5
    assert tar_at_far(s, y, 0.2) == 1.0  # one false accept (0.75) allowed
    assert tar_at_far(s, y, 0.19) == 0.5
    rep = verification_report(s, y)
    assert rep["far_resolution"] == pytest.approx(0.2)
    assert rep["tar_at_far_1e-3"] == 0.5
    with pytest.raises(ValueError, match="far"):
        tar_at_far(s, y, 0.0)


# --------------------------------------------------------------------------- #
# k-fold accuracy
# --------------------------------------------------------------------------- #
def test_kfold_separable_is_one():
    rng = np.random.default_rng(2)
    y = rng.random(600) < 0.5
    s = np.where(y, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600))
    mean, std, per = kfold_accuracy(s, y)
    assert mean == 1.0 and std == 0.0 and len(per) == 10


def _ten_fold_example():
    # 10 folds x (5 genuine, 5 impostor). Folds 1..9: genuine 0.8, impostor 0.6.
    # Fold 0 is shifted: genuine 0.3, impostor 0.1 (separable on its own).
    s, y, f = [], [], []
    for k in range(10):
        g, i = (0.3, 0.1) if k == 0 else (0.8, 0.6)
        s += [g] * 5 + [i] * 5
        y += [True] * 5 + [False] * 5
        f += [k] * 10
    return np.array(s), np.array(y), np.array(f)


def test_kfold_hand_computed():
    s, y, f = _ten_fold_example()
    # Fold 0 held out: threshold from folds 1..9 is 0.7 -> rejects all of fold 0 -> 0.5.
    # Other folds: training has 45 (0.8, +), 40 (0.6, -), 5 (0.3, +), 5 (0.1, -);
    # threshold 0.7 makes 5 errors, any lower one >= 40 -> held-out fold is 1.0.
    mean, std, per = kfold_accuracy(s, y, f)
    np.testing.assert_allclose(per, [0.5] + [1.0] * 9)
    assert mean == pytest.approx(0.95)
    assert std == pytest.approx(0.15)  # population std: sqrt((.45^2 + 9*.05^2)/10)
    # default folds = 10 contiguous blocks, which is exactly this layout
    assert kfold_accuracy(s, y) == (mean, std, per)
    rep = verification_report(s, y, f)
    assert rep["threshold"] == pytest.approx(0.7)
    # one genuine pair scoring low in fold 0, otherwise clean: 9/10 and 0.99 / 0.03
    s2 = np.where(y, 0.8, 0.2)
    s2[0] = 0.1
    mean2, std2, per2 = kfold_accuracy(s2, y, f)
    np.testing.assert_allclose(per2, [0.9] + [1.0] * 9)
    assert (mean2, std2) == (pytest.approx(0.99), pytest.approx(0.03))


def test_kfold_single_fold_falls_back_to_best_threshold():
    s, y, _ = _ten_fold_example()
    # on the whole set the best threshold (0.7) misclassifies fold 0's genuine pairs
    mean, std, per = kfold_accuracy(s, y, np.zeros(len(s), int))
    assert mean == pytest.approx(95 / 100) and std == 0.0 and len(per) == 1
    mean, _, _ = kfold_accuracy([0.9, 0.8, 0.1], [1, 1, 0], [3, 3, 3])
    assert mean == 1.0


def test_kfold_fold_validation():
    with pytest.raises(ValueError, match="fold"):
        kfold_accuracy([0.9, 0.1], [1, 0], [0, 1, 2])


# --------------------------------------------------------------------------- #
# report and input validation
# --------------------------------------------------------------------------- #
def test_report_keys_and_types():
    rng = np.random.default_rng(3)
    y = np.arange(200) % 2 == 0
    s = rng.normal(size=200) + 2.0 * y
    rep = verification_report(s, y)
    assert set(rep) == {
        "accuracy", "accuracy_std", "auc", "eer", "tar_at_far_1e-3",
        "threshold", "num_pairs", "num_same", "far_resolution",
    }
    for k, v in rep.items():
        assert type(v) in (float, int), (k, type(v))
    assert type(rep["num_pairs"]) is int and rep["num_pairs"] == 200
    assert rep["num_same"] == 100 and rep["far_resolution"] == pytest.approx(0.01)
    assert 0.8 < rep["auc"] <= 1.0 and 0.0 <= rep["eer"] < 0.3
    json.dumps(rep)


@pytest.mark.parametrize("fn", [roc_auc, eer, tar_at_far, kfold_accuracy, roc_curve,
                                verification_report])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="different lengths"):
        fn([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="NaN"):
        fn([0.1, np.nan, 0.3], [True, False, True])
    with pytest.raises(ValueError, match="no positive"):
        fn([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="no negative"):
        fn([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        fn([0.1, 0.2], [2, 0])


# --------------------------------------------------------------------------- #
# identification
# --------------------------------------------------------------------------- #
def test_rank1_constructed():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    glab = np.array([10, 20])
    probes = np.array([[0.9, 0.1], [0.8, 0.3], [0.2, 0.9], [0.9, 0.2]])
    plab = np.array([10, 10, 20, 20])  # the last one is nearest to identity 10
    assert rank1(gallery, glab, probes, plab) == 0.75
    # cosine: scale of the vectors is irrelevant
    assert rank1(5 * gallery, glab, 0.1 * probes, plab) == 0.75
    with pytest.raises(ValueError, match="absent from the gallery"):
        rank1(gallery, glab, probes, np.array([10, 10, 20, 30]))
    with pytest.raises(ValueError, match="dimensions"):
        rank1(gallery, glab, np.ones((4, 3)), plab)


def test_gallery_probe_split():
    labels = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    g, p = gallery_probe_split(labels, seed=0)
    assert sorted(labels[g].tolist()) == [0, 2, 3]  # identity 1 (one image) dropped
    assert len(p) == 10 - 1 - 3
    assert not set(g) & set(p) and 3 not in set(g) | set(p)
    assert set(labels[p]) <= set(labels[g])
    g2, p2 = gallery_probe_split(labels, seed=0)
    np.testing.assert_array_equal(g, g2)
    np.testing.assert_array_equal(p, p2)
    # different seeds eventually pick different gallery images
    assert any(not np.array_equal(g, gallery_probe_split(labels, seed=k)[0])
               for k in range(1, 20))
    g0, p0 = gallery_probe_split(np.array([5, 6, 7]))
    assert g0.size == 0 and p0.size == 0


# --------------------------------------------------------------------------- #
# preprocessing and embeddings
# --------------------------------------------------------------------------- #
def test_to_tensor():
    rgb = np.zeros((2, 4, 5, 3), np.uint8)
    rgb[0, 0, 0] = [255, 0, 128]
    t = to_tensor(rgb)
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32
    assert t[0, 0, 0, 0] == 1.0 and t[0, 1, 0, 0] == -1.0
    assert t.min() >= -1.0 and t.max() <= 1.0
    grey = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    tg = to_tensor(grey)
    assert tg.shape == (2, 3, 4, 5)
    assert torch.equal(tg[:, 0], tg[:, 1]) and torch.equal(tg[:, 0], tg[:, 2])
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_tensor(np.zeros((2, 4, 5, 4), np.uint8))


def _linear_model(seed=0, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(3 * 8 * 8, 16)]
    if dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


def test_embed_unit_norm_deterministic_and_mode_restored():
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    model = _linear_model(dropout=True)
    model.train()
    model[1].eval()  # mixed modes must be restored exactly
    e1 = embed(model, imgs, batch_size=3)
    e2 = embed(model, imgs, batch_size=7)
    assert e1.shape == (10, 16) and e1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e1, e2, atol=1e-6)  # dropout off, batching irrelevant
    assert model.training and not model[1].training and model[2].training
    e_grey = embed(model, imgs[..., 0])
    assert e_grey.shape == (10, 16)


def test_embed_flip():
    rng = np.random.default_rng(5)
    model = _linear_model()
    asym = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert not np.allclose(embed(model, asym), embed(model, asym, flip=True), atol=1e-3)
    half = rng.integers(0, 256, (4, 8, 4, 3), dtype=np.uint8)
    sym = np.concatenate([half, half[:, :, ::-1]], axis=2)
    np.testing.assert_allclose(embed(model, sym), embed(model, sym, flip=True), atol=1e-5)


def test_raw_pixel_embed_brightness_invariant():
    rng = np.random.default_rng(6)
    img = rng.integers(20, 200, (1, 48, 40, 3), dtype=np.uint8)
    brighter = img + np.uint8(40)
    e = raw_pixel_embed(np.concatenate([img, brighter]), size=16)
    assert e.shape == (2, 256) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert pair_scores(e[:1], e[1:])[0] == pytest.approx(1.0, abs=1e-5)
    other = raw_pixel_embed(rng.integers(0, 256, (1, 48, 40), dtype=np.uint8), size=16)
    assert abs(pair_scores(e[:1], other)[0]) < 0.5
    assert np.all(raw_pixel_embed(np.full((1, 8, 8), 7, np.uint8), size=4) == 0)


def test_pair_scores():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    np.testing.assert_allclose(pair_scores(a, b), [0.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="shape"):
        pair_scores(a, b[:2])
