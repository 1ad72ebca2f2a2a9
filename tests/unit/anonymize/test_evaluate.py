"""The anonymizer evaluation library: thresholds, re-id rates, quality, imglab, detector P/R."""

import math
from pathlib import Path

import numpy as np
import pytest

from fedface.anonymize.boxes import Box
from fedface.anonymize.evaluate import (
    DlibMatcher,
    PairSet,
    box_calibration,
    collect_detections,
    detection_rate,
    detector_pr,
    lfw_pair_images,
    pr_from_detections,
    psnr,
    read_imglab,
    reid_rates,
    ssim,
    threshold_at_far,
)
from fedface.data.images import load_image
from fedface.eval.verification import tar_at_far
from tests.conftest import SHARED_DATA


# --------------------------------------------------------------------------- #
# threshold_at_far
# --------------------------------------------------------------------------- #
def test_threshold_at_far_is_the_k_th_smallest_impostor():
    rng = np.random.default_rng(0)
    d = rng.permutation(np.arange(1000) / 1000.0)  # 0.000 .. 0.999
    t = threshold_at_far(d, 0.001)  # k = 1
    assert t == pytest.approx(0.001)
    assert np.sum(d < t) == 1  # realized FAR exactly 0.1%
    assert threshold_at_far(d, 0.01) == pytest.approx(0.010)
    assert np.sum(d < threshold_at_far(d, 0.01)) == 10
    assert threshold_at_far(d, 0.0015) == pytest.approx(0.001)  # floor(1.5) = 1
    assert threshold_at_far(d, 1.0) == math.inf


def test_threshold_at_far_never_exceeds_the_target():
    rng = np.random.default_rng(1)
    for n in (10, 999, 1000, 1001, 12345):
        d = rng.normal(1.0, 0.1, n)
        for far in (0.001, 0.01, 0.1, 0.5):
            t = threshold_at_far(d, far)
            k = int(np.floor(far * n))
            assert np.sum(d < t) == k <= far * n  # realized FAR <= target
            assert np.sum(d <= t) == k + 1  # any larger threshold would exceed it
    # fewer impostors than 1 / far: FAR 0, threshold at the closest impostor
    d = np.array([0.5, 0.3, 0.9])
    assert threshold_at_far(d, 0.001) == 0.3


def test_threshold_at_far_ties_and_errors():
    d = np.array([0.2, 0.2, 0.2, 0.7] * 250)  # 1000 values, 750 tied at 0.2
    t = threshold_at_far(d, 0.001)
    assert t == 0.2 and np.mean(d < t) == 0.0
    with pytest.raises(ValueError, match="far"):
        threshold_at_far(d, 0.0)
    with pytest.raises(ValueError, match="no impostor"):
        threshold_at_far(np.array([]), 0.1)


# --------------------------------------------------------------------------- #
# reid_rates on hand-built descriptors
# --------------------------------------------------------------------------- #
def _population(n_id=60, per_id=4, dim=16, spread=0.15, seed=0):
    """Identities as random unit centres, images as centre + small noise; all genuine pairs
    within an identity and as many different pairs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_id, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_id), per_id)
    desc = centres[labels] + rng.normal(0, spread / np.sqrt(dim), (labels.size, dim))
    a, b, same = [], [], []
    for k in range(n_id):
        idx = np.flatnonzero(labels == k)
        a += [idx[0], idx[2]]
        b += [idx[1], idx[3]]
        same += [True, True]
        other = np.flatnonzero(labels == (k + 1) % n_id)
        a += [idx[0], idx[1]]
        b += [other[0], other[1]]
        same += [False, False]
    pairs = PairSet(np.array(a), np.array(b), np.array(same), labels.astype(str))
    return desc, pairs, rng


def test_identity_anonymizer_gives_the_clean_rate():
    desc, pairs, _ = _population()
    r = reid_rates(pairs, desc, desc.copy(), far=0.001)
    assert r["naive_rate"] == r["clean_rate"] == r["adaptive_rate"]
    assert r["threshold_adaptive"] == r["threshold_clean"]
    assert r["clean_rate"] > 0.9
    n = 60 * 4
    assert r["n_images"] == n and r["n_genuine"] == 120 and r["n_naive_trials"] == 240
    assert r["n_impostor_clean"] == (n * n - 60 * 16) // 2
    assert r["naive_far_observed"] <= 0.001  # ordered pairs: each clean pair counted twice


def test_random_descriptor_anonymizer_defeats_the_naive_attacker():
    desc, pairs, rng = _population()
    anon = rng.normal(size=desc.shape)  # nothing of the identity survives
    anon /= np.linalg.norm(anon, axis=1, keepdims=True)
    r = reid_rates(pairs, desc, anon, far=0.001)
    assert r["clean_rate"] > 0.9
    assert r["naive_rate"] < 0.02
    assert r["adaptive_rate"] < 0.02


def test_reid_rates_threshold_uses_all_cross_identity_combinations():
    desc, pairs, _ = _population()
    r = reid_rates(pairs, desc, desc, far=0.01)
    codes = pairs.labels
    i, j = np.triu_indices(len(codes), 1)
    keep = codes[i] != codes[j]
    imp = np.linalg.norm(desc[i[keep]] - desc[j[keep]], axis=1)
    assert r["threshold_clean"] == pytest.approx(threshold_at_far(imp, 0.01))
    gen = np.linalg.norm(desc[pairs.a[pairs.same]] - desc[pairs.b[pairs.same]], axis=1)
    assert r["clean_rate"] == pytest.approx(np.mean(gen < r["threshold_clean"]))
    # same figure as verification.tar_at_far when its impostors are these combinations
    scores = -np.concatenate([gen, imp])
    same = np.r_[np.ones(gen.size, bool), np.zeros(imp.size, bool)]
    assert r["clean_rate"] == pytest.approx(tar_at_far(scores, same, 0.01))


def test_naive_counts_both_directions_and_adaptive_recalibrates():
    desc, pairs, _ = _population()
    anon = desc.copy()
    gen_b = pairs.b[pairs.same]
    anon[gen_b] += 10.0  # the b side of every genuine pair moves far away
    r = reid_rates(pairs, desc, anon, far=0.001)
    # clean a vs anon b fails; anon a vs clean b: a-side images are untouched -> clean rate
    assert r["naive_rate"] == pytest.approx(r["clean_rate"] / 2)
    # a uniform shift of every anonymized descriptor: adaptive attacker is unaffected
    r2 = reid_rates(pairs, desc, desc + 10.0, far=0.001)
    assert r2["naive_rate"] == 0.0
    assert r2["adaptive_rate"] == pytest.approx(r2["clean_rate"])


def test_reid_rates_drops_undescribed_images_and_checks_shapes():
    desc, pairs, _ = _population()
    anon = desc.copy()
    anon[0] = np.nan
    r = reid_rates(pairs, desc, anon)
    assert r["n_dropped_images"] == 1 and r["n_genuine"] == 119
    with pytest.raises(ValueError, match="one row per image"):
        reid_rates(pairs, desc[:-1], desc[:-1])


# --------------------------------------------------------------------------- #
# image quality
# --------------------------------------------------------------------------- #
def _face_like(h=96, w=80, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0)
    img = np.stack([base, base * 0.8, base * 0.6], axis=2) + rng.normal(0, 10, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def test_ssim_psnr_identical_and_blurred():
    import cv2

    img = _face_like()
    assert ssim(img, img) == pytest.approx(1.0)
    assert psnr(img, img) == math.inf
    blurred = cv2.GaussianBlur(img, (0, 0), 3)
    s, p = ssim(img, blurred), psnr(img, blurred)
    assert 0.0 < s < 0.9
    assert 10.0 < p < 40.0
    stronger = cv2.GaussianBlur(img, (0, 0), 8)
    assert ssim(img, stronger) < s and psnr(img, stronger) < p
    # grey images work too; shape mismatches do not
    assert ssim(img[:, :, 0], img[:, :, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shape"):
        psnr(img, img[:-1])


def test_psnr_matches_its_formula():
    a = np.zeros((10, 10, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # MSE = 255^2 / 300
    assert psnr(a, b) == pytest.approx(10 * np.log10(300))


# --------------------------------------------------------------------------- #
# imglab XML and detector precision / recall
# --------------------------------------------------------------------------- #
XML = """<?xml version='1.0' encoding='ISO-8859-1'?>
<dataset><name>t</name><images>
  <image file='one.png'>
    <box top='10' left='20' width='30' height='40'/>
    <box top='60' left='60' width='20' height='20' ignore='1'/>
  </image>
  <image file='two.png'>
    <box top='5' left='5' width='20' height='20'>
      <part name='01' x='15' y='12'/><part name='00' x='10' y='12'/>
    </box>
    <box top='40' left='40' width='30' height='30'/>
    <box top='70' left='5' width='20' height='20'/>
  </image>
  <image file='empty.png'/>
</images></dataset>
"""


@pytest.fixture
def imglab(tmp_path):
    from PIL import Image

    for name in ("one.png", "two.png", "empty.png"):
        Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / name)
    path = tmp_path / "faces.xml"
    path.write_text(XML)
    return path


def test_read_imglab(imglab):
    boxes = read_imglab(imglab)
    keys = list(boxes)
    assert [Path(k).name for k in keys] == ["one.png", "two.png", "empty.png"]
    assert all(Path(k).is_file() for k in keys)
    one, two, empty = boxes.values()
    assert len(one) == 1 and one[0].as_tuple() == (20.0, 10.0, 50.0, 50.0)  # ignored box dropped
    assert len(two) == 3 and empty == []
    np.testing.assert_array_equal(two[0].landmarks, [[10, 12], [15, 12]])  # sorted by name
    assert two[1].landmarks is None
    assert len(read_imglab(imglab, keep_ignored=True)[keys[0]]) == 2


def _fake_detector(imglab, noisy):
    truth = read_imglab(imglab)
    calls = [0]

    def detect(image):
        # the images are identical blanks: tell them apart by call order (file order)
        k = calls[0]
        calls[0] += 1
        gt = list(truth.values())[k % 3]
        if not noisy:
            return list(gt)
        out = []
        if k % 3 == 0:  # image one: its face, shifted a bit (IoU 0.6) + a false alarm
            b = gt[0]
            out += [Box(b.x0 + 5, b.y0 + 5, b.x1 + 5, b.y1 + 5, 0.9), Box(70, 0, 90, 20, 0.2)]
        elif k % 3 == 1:  # image two: first face twice (duplicate = FP), second badly placed
            b0, b1 = gt[0], gt[1]
            out += [b0, Box(b0.x0 + 1, b0.y0, b0.x1 + 1, b0.y1, 0.5),
                    Box(b1.x0 + 20, b1.y0 + 20, b1.x1 + 20, b1.y1 + 20, 0.8)]
        else:  # empty image: one false alarm
            out.append(Box(0, 0, 10, 10, 0.1))
        return out

    return detect


def test_detector_pr_perfect_detector(imglab):
    r = detector_pr(_fake_detector(imglab, noisy=False), imglab)
    assert (r["tp"], r["fp"], r["fn"]) == (4, 0, 0)
    assert r["recall"] == 1.0 and r["precision"] == 1.0
    assert [(p["tp"], p["fp"], p["fn"]) for p in r["per_image"]] == [(1, 0, 0), (3, 0, 0), (0, 0, 0)]


def test_detector_pr_noisy_detector(imglab):
    r = detector_pr(_fake_detector(imglab, noisy=True), [imglab])
    # one: shifted face IoU = 25*35/(2*1200-875) = 0.574 -> TP, false alarm FP
    # two: exact TP, duplicate FP, far-off box FP; faces 2 and 3 missed (FN)
    # empty: FP
    assert [(p["tp"], p["fp"], p["fn"]) for p in r["per_image"]] == [(1, 1, 0), (1, 2, 2), (0, 1, 0)]
    assert (r["tp"], r["fp"], r["fn"]) == (2, 4, 2)
    assert r["recall"] == pytest.approx(0.5) and r["precision"] == pytest.approx(2 / 6)
    # a stricter IoU drops the shifted match; a score cut drops the low-score false alarms
    truth, dets = collect_detections(_fake_detector(imglab, noisy=True), imglab)
    assert pr_from_detections(truth, dets, iou_thr=0.7)["tp"] == 1
    cut = pr_from_detections(truth, dets, min_score=0.3)
    assert (cut["tp"], cut["fp"], cut["fn"]) == (2, 2, 2)


def test_box_calibration_recovers_a_known_scale(imglab):
    truth = read_imglab(imglab)
    shrunk = {k: [b.expand(1 / 1.2) for b in v] for k, v in truth.items()}
    cal = box_calibration(truth, shrunk)
    assert cal["best_scale"] == pytest.approx(1.2, abs=0.011)
    assert cal["best_mean_iou"] > 0.99 > cal["mean_iou_at_1"]
    assert pr_from_detections(truth, shrunk, box_scale=cal["best_scale"])["recall"] == 1.0
    # boxes that sit 20% of their height too high: the shift is found and undoes it
    high = {k: [Box(b.x0, b.y0 - 0.2 * b.height, b.x1, b.y1 - 0.2 * b.height) for b in v]
            for k, v in truth.items()}
    cal = box_calibration(truth, high)
    assert cal["shift"] == pytest.approx([0.0, 0.2])
    assert cal["best_scale_shifted"] == pytest.approx(1.0) and cal["best_mean_iou_shifted"] > 0.99
    fixed = pr_from_detections(truth, high, iou_thr=0.9, box_shift=cal["shift"])
    assert fixed["recall"] == 1.0 and fixed["box_shift"] == pytest.approx([0.0, 0.2])


def test_detection_rate():
    faces = [[Box(10, 10, 50, 50)], [Box(10, 10, 50, 50), Box(60, 60, 90, 90)], []]
    images = [np.zeros((100, 100, 3), np.uint8)] * 3

    def detect(image):
        return [Box(12, 12, 52, 52)]

    assert detection_rate(images, faces, detect) == pytest.approx(2 / 3)
    assert detection_rate(images, faces, lambda im: []) == 0.0
    assert detection_rate(images[:1], [Box(10, 10, 50, 50)], detect, iou_min=0.95) == 0.0


# --------------------------------------------------------------------------- #
# real data (skips without the shared data folder)
# --------------------------------------------------------------------------- #
def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: real-data tests need the shared data folder "
                    "(set FEDFACE_SHARED_DATA to its path)")
    return path


def test_dlib_matcher_on_lfw_genuine_pairs(tmp_path):
    lfw = _need(SHARED_DATA / "lfw" / "pairsDevTest.txt").parent
    paths, pairs = lfw_pair_images(lfw, "pairsDevTest.txt")
    assert len(pairs) == 1000 and pairs.same.sum() == 500
    assert len(paths) == len(pairs.labels) == len(set(paths))
    genuine = np.flatnonzero(pairs.same)[:20]
    m = DlibMatcher()
    idx = sorted(set(pairs.a[genuine]) | set(pairs.b[genuine]))
    clean = m.describe_clean([paths[i] for i in idx], cache_dir=tmp_path)
    again = DlibMatcher().describe_clean([paths[i] for i in idx], cache_dir=tmp_path)
    assert again.from_cache and not clean.from_cache
    np.testing.assert_array_equal(again.descriptors, clean.descriptors)
    np.testing.assert_array_equal(again.landmarks[0], clean.landmarks[0])
    assert again.boxes[3].as_tuple() == clean.boxes[3].as_tuple()
    # describing in a given box: the clean box reproduces the clean descriptor, and an
    # anonymized (blurred) probe described in that box moves away from it
    import cv2

    img = load_image(paths[idx[0]])
    np.testing.assert_allclose(m.describe(img, clean.boxes[0]), clean.descriptors[0], atol=1e-6)
    blurred = m.describe(cv2.GaussianBlur(img, (0, 0), 8), clean.boxes[0])
    assert np.linalg.norm(blurred - clean.descriptors[0]) > 0.2
    row = {i: k for k, i in enumerate(idx)}
    d = np.array([np.linalg.norm(clean.descriptors[row[a]] - clean.descriptors[row[b]])
                  for a, b in zip(pairs.a[genuine], pairs.b[genuine])])
    assert clean.located.mean() >= 0.9
    assert np.mean(d < 0.6) >= 0.8, d


def test_dlib_hog_on_faces_multi():
    import dlib

    fm = _need(SHARED_DATA / "faces-multi" / "testing.xml").parent
    det = dlib.get_frontal_face_detector()

    def detect(image):
        rects, scores, _ = det.run(image, 1, 0.0)
        return [Box(r.left(), r.top(), r.right() + 1, r.bottom() + 1, s) for r, s in zip(rects, scores)]

    r = detector_pr(detect, [fm / "training.xml", fm / "testing.xml"], iou=0.5)
    assert r["tp"] + r["fn"] == 43
    # measured: 43/43 found, no false alarm, mean IoU 0.895 (the labels follow dlib's convention)
    assert r["recall"] >= 0.9 and r["precision"] >= 0.9, r
    assert r["mean_iou_matched"] > 0.8


def test_identical_descriptors_are_not_a_reidentification():
    """A method that makes every face the same (a solid mask) leaves the matcher nothing:
    float noise between 'identical' descriptors must not rank genuine pairs first."""
    from fedface.anonymize.evaluate import PairSet, reid_rates

    rng = np.random.default_rng(0)
    n = 60
    labels = np.repeat(np.arange(30), 2).astype(str)
    clean = rng.normal(size=(n, 128))
    same = np.ones(128) * 0.1
    # Float noise that happens to be shared by the two photos of a person (same context).
    noise = rng.normal(scale=1e-8, size=(30, 128))
    anon = same + np.repeat(noise, 2, axis=0)
    pairs = PairSet(np.arange(0, n, 2), np.arange(1, n, 2), np.ones(30, bool), labels)
    assert reid_rates(pairs, clean, anon)["adaptive_rate"] == 0.0
