"""K-Same: clustering guarantees on chips, dlib-consistent alignment, and apply_batch on LFW.

Run this file as a script (``.venv/bin/python tests/unit/anonymize/test_ksame.py [N]``) to print
a measurement, not a test: how far dlib's 128-d descriptor moves, the HOG detection rate and
rank-1 re-identification against the originals, on N LFW images (one per person).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fedface.anonymize.boxes import Box
from fedface.anonymize.ksame import (
    KSame,
    KSameConfig,
    NotEnoughFacesError,
    chip_transform,
    face_ellipse_mask,
    ksame_chips,
)
from fedface.errors import UserError


def _chips(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- ksame_chips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(10, 2), (11, 3), (25, 4), (7, 7), (13, 5), (40, 10), (9, 4), (3, 1)])
@pytest.mark.parametrize("space", ["pixels", "pca"])
def test_every_cluster_holds_k_to_2k_minus_1_faces(n, k, space):
    _, ids = ksame_chips(_chips(n), k, space=space)
    assert ids.shape == (n,) and (ids >= 0).all()
    sizes = np.bincount(ids)
    assert len(sizes) == n // k  # clusters of exactly k, the remainder joins the last one
    assert sizes.min() >= k
    assert sizes.max() <= max(2 * k - 1, 1)


@pytest.mark.parametrize("n,k", [(11, 3), (20, 4)])
def test_each_output_chip_is_the_rounded_average_of_its_cluster(n, k):
    chips = _chips(n)
    out, ids = ksame_chips(chips, k)
    assert out.shape == chips.shape and out.dtype == np.uint8
    for c in np.unique(ids):
        members = ids == c
        expected = np.rint(chips[members].astype(np.float64).mean(axis=0)).astype(np.uint8)
        assert (out[members] == expected).all()


@pytest.mark.parametrize("space", ["pixels", "pca"])
def test_clusters_are_made_of_nearest_neighbours(space):
    rng = np.random.default_rng(3)
    k, groups = 4, 3
    bases = rng.integers(0, 256, (groups, 32, 32, 3)).astype(np.int16)
    chips = np.concatenate([
        np.clip(b + rng.integers(-6, 7, (k, 32, 32, 3)), 0, 255) for b in bases
    ]).astype(np.uint8)
    order = rng.permutation(len(chips))
    _, ids = ksame_chips(chips[order], k, space=space)
    truth = np.repeat(np.arange(groups), k)[order]
    for c in np.unique(ids):
        assert len(set(truth[ids == c])) == 1  # each cluster is one group of look-alikes


def test_deterministic_for_a_seed_and_the_seed_matters():
    chips = _chips(30)
    a, ia = ksame_chips(chips, 4, seed=7)
    b, ib = ksame_chips(chips, 4, seed=7)
    assert (a == b).all() and (ia == ib).all()
    seeds = [ksame_chips(chips, 4, seed=s)[1] for s in range(5)]
    assert any((s != seeds[0]).any() for s in seeds[1:])


def test_fewer_faces_than_k_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"ksame needs at least k=5 faces, found 3: lower k "
                                         r"or anonymize a larger folder"):
        ksame_chips(_chips(3), 5)
    with pytest.raises(UserError):
        ksame_chips(_chips(0), 2)


def test_chips_are_not_modified():
    chips = _chips(12)
    before = chips.copy()
    ksame_chips(chips, 3)
    assert (chips == before).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be an int"):
        ksame_chips(_chips(4), 0)
    with pytest.raises(ValueError, match="space"):
        ksame_chips(_chips(4), 2, space="lbp")
    with pytest.raises(ValueError, match="uint8"):
        ksame_chips(_chips(4).astype(np.float32), 2)
    with pytest.raises(ValueError, match="k=1"):
        KSameConfig(k=1)
    with pytest.raises(ValueError, match="padding"):
        KSameConfig(padding=0.25)
    with pytest.raises(ValueError, match="space"):
        KSameConfig(space="lbp")


def test_face_ellipse_mask_fits_in_the_chip():
    m = face_ellipse_mask(160, 0.6, 0.3)
    assert m.max() == pytest.approx(1.0) and m.min() == 0.0
    assert (m[0] == 0).all() and (m[-1] == 0).all() and (m[:, 0] == 0).all() and (m[:, -1] == 0).all()
    assert m[80, 80] == 1.0


# -- geometry ----------------------------------------------------------------------------------------


def test_chip_transform_reproduces_dlib_get_face_chip():
    import dlib

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8), (0, 0), 2.0)
    pts = np.array([[170, 101], [147, 103], [92, 99], [116, 102], [131, 146]], dtype=np.int64)
    shape = dlib.full_object_detection(
        dlib.rectangle(70, 60, 190, 180), [dlib.point(int(x), int(y)) for x, y in pts])
    for size, padding in [(160, 0.6), (112, 0.25)]:
        ref = dlib.get_face_chip(image, shape, size, padding).astype(np.float64)
        m = chip_transform(pts.astype(np.float64), size, padding)
        ours = cv2.warpAffine(image, m, (size, size),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP).astype(np.float64)
        # dlib truncates where OpenCV rounds: about half a grey level apart on average.
        assert np.abs(ours - ref)[2:-2, 2:-2].mean() < 1.0


def test_apply_batch_without_faces_returns_copies_and_refuses_too_few():
    images = [np.full((50, 60, 3), 9, np.uint8), np.zeros((40, 40), np.uint8)]
    out, report = KSame(KSameConfig(k=2)).apply_batch(images, [[], []])
    assert report["faces"] == 0 and report["cluster_ids"] == [[], []]
    assert all((a == b).all() and a is not b for a, b in zip(out, images, strict=True))
    lm = np.array([[40, 20], [34, 21], [18, 20], [24, 21], [29, 33]], dtype=np.float64)
    with pytest.raises(NotEnoughFacesError, match="found 1"):
        KSame(KSameConfig(k=2)).apply_batch(images, [[Box(10, 5, 50, 45, 1.0, lm)], []])
    with pytest.raises(ValueError, match="2 images but 1"):
        KSame(KSameConfig(k=2)).apply_batch(images, [[]])


# -- real faces --------------------------------------------------------------------------------------

N_LFW, K_LFW = 12, 4


def _lfw_faces(folder: Path, n: int) -> tuple[list[np.ndarray], list[list[Box]]]:
    """``n`` images of different people (each with exactly one HOG face) + 5-point landmarks."""
    from fedface.data import load_image
    from fedface.data.dlib_models import load_detector, load_shape_predictor

    detector, predictor = load_detector(), load_shape_predictor(5)
    people = sorted(p for p in folder.iterdir() if p.is_dir())
    step = max(1, len(people) // (3 * n))
    images, faces = [], []
    for person in people[::step]:
        path = person / f"{person.name}_0001.jpg"
        if not path.is_file():
            continue
        image = load_image(path)
        rects = detector(image, 0)
        if len(rects) != 1:
            continue
        r = rects[0]
        shape = predictor(image, r)
        lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        images.append(image)
        faces.append([Box(r.left(), r.top(), r.right() + 1, r.bottom() + 1, 1.0, lm)])
        if len(images) == n:
            break
    return images, faces


def _lfw_folder() -> Path:
    """LFW deep-funneled in the shared data folder (``$FEDFACE_SHARED_DATA``, as conftest)."""
    shared = Path(os.environ.get("FEDFACE_SHARED_DATA",
                                 Path(__file__).resolve().parents[4] / "shared" / "data"))
    return shared / "lfw" / "lfw-deepfunneled"


@pytest.fixture(scope="module")
def lfw_batch():
    root = _lfw_folder()
    if not root.is_dir():
        pytest.skip(f"{root} not found: the K-Same real-face test needs LFW deep-funneled")
    return _lfw_faces(root, N_LFW)


@pytest.fixture(scope="module")
def lfw_ksame(lfw_batch):
    images, faces = lfw_batch
    before = [im.copy() for im in images]
    out, report = KSame(KSameConfig(k=K_LFW)).apply_batch(images, faces)
    assert all((a == b).all() for a, b in zip(images, before, strict=True)), "inputs modified"
    return out, report


def _support(image: np.ndarray, box: Box, cfg: KSameConfig) -> np.ndarray:
    """Pixels the blended ellipse reaches (dilated by 2 px for interpolation)."""
    m = chip_transform(box.landmarks, cfg.chip_size, cfg.padding)
    mask = (face_ellipse_mask(cfg.chip_size, cfg.padding, cfg.blend) > 0).astype(np.uint8)
    h, w = image.shape[:2]
    warped = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_NEAREST)
    return cv2.dilate(warped, np.ones((5, 5), np.uint8)) > 0


def _inner_chip(image: np.ndarray, box: Box, cfg: KSameConfig) -> np.ndarray:
    """Grey pixels of the fully replaced part of the ellipse, zero mean and unit norm."""
    m = chip_transform(box.landmarks, cfg.chip_size, cfg.padding)
    chip = cv2.warpAffine(image, m, (cfg.chip_size, cfg.chip_size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    inner = face_ellipse_mask(cfg.chip_size, cfg.padding, cfg.blend) >= 1.0
    v = cv2.cvtColor(chip, cv2.COLOR_RGB2GRAY)[inner].astype(np.float64)
    v -= v.mean()
    return v / np.linalg.norm(v)


def test_lfw_clusters_and_report(lfw_batch, lfw_ksame):
    images, faces = lfw_batch
    _, report = lfw_ksame
    assert report["k"] == K_LFW and report["faces"] == len(images)
    assert report["min_cluster_size"] >= K_LFW and sum(report["cluster_sizes"]) == len(images)
    assert all(len(ids) == 1 and ids[0] >= 0 for ids in report["cluster_ids"])
    assert report["landmarks_computed"] == 0


def test_lfw_face_changes_and_nothing_else_does(lfw_batch, lfw_ksame):
    images, faces = lfw_batch
    out, _ = lfw_ksame
    cfg = KSameConfig(k=K_LFW)
    for image, result, (box,) in zip(images, out, faces, strict=True):
        assert result.shape == image.shape and result.dtype == np.uint8
        x0, y0, x1, y1 = box.pixels(image.shape[1], image.shape[0])
        diff = np.abs(result.astype(np.int16) - image.astype(np.int16))
        assert diff[y0:y1, x0:x1].mean() > 6.0  # the face is replaced, not nudged
        outside = ~_support(image, box, cfg)
        assert outside.mean() > 0.4
        assert (diff[outside] == 0).all()


def test_lfw_same_cluster_same_face(lfw_batch, lfw_ksame):
    images, faces = lfw_batch
    out, report = lfw_ksame
    cfg = KSameConfig(k=K_LFW)
    ids = [c[0] for c in report["cluster_ids"]]
    vecs = [_inner_chip(o, f[0], cfg) for o, f in zip(out, faces, strict=True)]
    same, other = [], []
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            (same if ids[i] == ids[j] else other).append(float(vecs[i] @ vecs[j]))
    assert min(same) > 0.9  # a colour-matched copy of one average: near-perfect correlation
    assert np.mean(same) > np.mean(other) + 0.1
    # Without colour matching the replaced pixels of a cluster are (nearly) identical.
    plain, rep = KSame(KSameConfig(k=K_LFW, match_color=False)).apply_batch(images, faces)
    assert rep["cluster_ids"] == report["cluster_ids"]
    mask = face_ellipse_mask(cfg.chip_size, cfg.padding, cfg.blend) >= 1.0
    chips = []
    for o, (box,) in zip(plain, faces, strict=True):
        m = chip_transform(box.landmarks, cfg.chip_size, cfg.padding)
        chips.append(cv2.warpAffine(o, m, (cfg.chip_size, cfg.chip_size),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)[mask])
    for i in range(len(chips)):
        for j in range(i + 1, len(chips)):
            if ids[i] == ids[j]:
                assert np.abs(chips[i].astype(float) - chips[j].astype(float)).mean() < 4.0


def test_lfw_output_is_still_a_face(lfw_ksame):
    from fedface.data.dlib_models import load_detector

    out, _ = lfw_ksame
    detector = load_detector()
    found = sum(len(detector(o, 0)) > 0 for o in out)
    assert found >= 0.8 * len(out)


def test_lfw_landmarks_computed_when_missing(lfw_batch, lfw_ksame):
    images, faces = lfw_batch
    out, _ = lfw_ksame
    bare = [[Box(b.x0, b.y0, b.x1, b.y1, b.score) for b in f] for f in faces]
    again, report = KSame(KSameConfig(k=K_LFW)).apply_batch(images, bare)
    assert report["landmarks_computed"] == len(images)
    assert all((a == b).all() for a, b in zip(again, out, strict=True))


def test_lfw_grey_images(lfw_batch):
    images, faces = lfw_batch
    grey = [cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in images]
    out, report = KSame(KSameConfig(k=K_LFW)).apply_batch(grey, faces)
    assert report["min_cluster_size"] >= K_LFW
    cfg = KSameConfig(k=K_LFW)
    for g, o, (box,) in zip(grey, out, faces, strict=True):
        assert o.shape == g.shape and o.dtype == np.uint8
        outside = ~_support(g, box, cfg)
        assert (o[outside] == g[outside]).all() and (o != g).mean() > 0.05


# -- measurement (not a test) --------------------------------------------------------------------


def measure(folder: Path, n: int = 80, ks: tuple[int, ...] = (4, 10)) -> None:
    """Print, per k: dlib descriptor distance (output vs its original), HOG detection rate, and
    rank-1 re-identification with the originals as gallery (1/k is the K-Same bound)."""
    import dlib

    from fedface.data.dlib_models import (
        load_detector,
        load_face_recognition_model,
        load_shape_predictor,
    )

    images, faces = _lfw_faces(folder, n)
    detector, predictor = load_detector(), load_shape_predictor(5)
    rec = load_face_recognition_model()

    def shape_of(image, box):
        return predictor(image, dlib.rectangle(int(box.x0), int(box.y0),
                                               int(box.x1) - 1, int(box.y1) - 1))

    gallery = np.array([rec.compute_face_descriptor(im, shape_of(im, f[0]))
                        for im, f in zip(images, faces, strict=True)])
    for k in ks:
        out, report = KSame(KSameConfig(k=k)).apply_batch(images, faces)
        dists, found, hits = [], 0, 0
        for idx, (o, f) in enumerate(zip(out, faces, strict=True)):
            rects = detector(o, 0)
            found += len(rects) > 0
            shape = predictor(o, rects[0]) if rects else shape_of(o, f[0])
            d = np.array(rec.compute_face_descriptor(o, shape))
            dists.append(float(np.linalg.norm(d - gallery[idx])))
            hits += int(np.argmin(np.linalg.norm(gallery - d, axis=1)) == idx)
        dists_a = np.array(dists)
        print(f"k={k} faces={len(out)} clusters={report['cluster_sizes']} "
              f"descriptor distance median={np.median(dists_a):.3f} mean={dists_a.mean():.3f} "
              f"share>0.6={np.mean(dists_a > 0.6):.2f} HOG detected={found}/{len(out)} "
              f"rank-1 re-id={hits / len(out):.2f} (bound {1 / k:.2f})")


if __name__ == "__main__":  # pragma: no cover - a measurement, run by hand
    measure(_lfw_folder(), int(sys.argv[1]) if len(sys.argv) > 1 else 80)
