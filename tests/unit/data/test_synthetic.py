"""Tests for the embedded synthetic face data set (fedface.data.synthetic)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from fedface.data import synthetic as syn
from fedface.data.synthetic import (
    SyntheticConfig,
    generate,
    identity_name,
    identity_params,
    image_filename,
    make_pairs,
    render_image,
    write_identity_folder,
    write_pairs_file,
)

SMALL = SyntheticConfig(num_identities=6, images_per_identity=3, size=48, seed=3)


def test_shapes_and_dtypes():
    img = render_image(SMALL, 0, 0)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    images, labels = generate(SMALL)
    assert images.shape == (18, 48, 48, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == [i for i in range(6) for _ in range(3)]
    for size in (64, 112):
        assert render_image(SyntheticConfig(size=size), 5, 2).shape == (size, size, 3)


def test_deterministic_and_order_independent():
    a = render_image(SMALL, 4, 2)
    b = render_image(SyntheticConfig(**SMALL.to_dict()), 4, 2)
    np.testing.assert_array_equal(a, b)
    syn._prepare.cache_clear()
    syn._texture_patch.cache_clear()
    syn._identity_params_cached.cache_clear()
    np.testing.assert_array_equal(a, render_image(SMALL, 4, 2))

    full, labels = generate(SMALL)
    sub, sub_labels = generate(SMALL, [4, 1])
    n = SMALL.images_per_identity
    np.testing.assert_array_equal(sub[:n], full[4 * n:5 * n])
    np.testing.assert_array_equal(sub[n:], full[1 * n:2 * n])
    assert sub_labels.tolist() == [4] * n + [1] * n
    # images_per_identity / num_identities do not change the pixels of existing images
    more = SyntheticConfig(**{**SMALL.to_dict(), "images_per_identity": 5, "num_identities": 9})
    np.testing.assert_array_equal(render_image(more, 2, 1), full[2 * n + 1])
    # a different seed gives different pixels
    other = SyntheticConfig(**{**SMALL.to_dict(), "seed": 4})
    assert not np.array_equal(render_image(other, 4, 2), a)


def test_identities_and_images_differ():
    p0, p1 = identity_params(SMALL, 0), identity_params(SMALL, 1)
    assert p0 != p1 and p0.index == 0
    imgs = [render_image(SMALL, 0, j) for j in range(3)]
    assert not np.array_equal(imgs[0], imgs[1])  # nuisance varies per image
    canon = SyntheticConfig(size=48, rotation_deg=0, shift=0, scale=0, yaw=0, lighting=0,
                            brightness=0, contrast=0, color_cast=0, expression=0, noise=0,
                            blur=0, background=0)
    a, b = render_image(canon, 7, 0), render_image(canon, 7, 1)
    np.testing.assert_array_equal(a, b)  # without nuisance an identity renders identically


def _best_balanced_accuracy(sim: np.ndarray, same: np.ndarray) -> float:
    """max over thresholds of (TPR + TNR) / 2 (same and different pairs weigh equally)."""
    s = same[np.argsort(-sim)]
    tpr = np.cumsum(s) / s.sum()
    tnr = 1.0 - np.cumsum(~s) / (~s).sum()
    return float(max(((tpr + tnr) / 2).max(), 0.5))


def test_identity_survives_nuisance_but_raw_pixels_are_weak():
    cfg = SyntheticConfig(num_identities=30, images_per_identity=6, size=48, seed=0)
    images, labels = generate(cfg)
    # a simple identity-bearing statistic: chromaticity of the central (face) patch
    c = images[:, 20:28, 18:30].reshape(len(images), -1, 3).astype(np.float64).mean(1)
    chroma = c[:, :2] / c.sum(1, keepdims=True)
    grey = np.stack([cv2.resize(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), (32, 32),
                                interpolation=cv2.INTER_AREA) for x in images]).astype(np.float64)
    grey = grey.reshape(len(images), -1)
    grey -= grey.mean(1, keepdims=True)
    grey /= np.linalg.norm(grey, axis=1, keepdims=True)

    ia, ib = np.triu_indices(len(images), 1)
    same = labels[ia] == labels[ib]
    d = np.linalg.norm(chroma[ia] - chroma[ib], axis=1)
    assert d[same].mean() < 0.6 * d[~same].mean()
    acc_chroma = _best_balanced_accuracy(-d, same)
    acc_raw = _best_balanced_accuracy((grey[ia] * grey[ib]).sum(1), same)
    print(f"balanced verification accuracy: chroma {acc_chroma:.3f}, raw {acc_raw:.3f}")
    assert acc_raw < 0.8  # raw pixels are a weak matcher (about 0.64 here)
    assert acc_chroma > 0.7  # about 0.75 here, from one colour statistic alone
    assert acc_chroma > acc_raw + 0.05


def test_write_identity_folder_idempotent_and_refuses_other_config(tmp_path, monkeypatch):
    cfg = SyntheticConfig(num_identities=3, images_per_identity=2, size=32, seed=1)
    root = tmp_path / "synth"
    assert write_identity_folder(root, cfg) == root
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert files == [image_filename(i, j) for i in range(3) for j in range(2)]
    assert files[0] == "id_00000/id_00000_0001.png"
    note = (root / "SYNTHETIC.md").read_text()
    assert "synthetic" in note.lower() and "not real" in note.lower()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["config"] == cfg.to_dict() and len(manifest["pixel_sha256"]) == 64
    # PNG is lossless: files hold exactly the rendered pixels
    img = cv2.cvtColor(cv2.imread(str(root / image_filename(2, 1))), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(img, render_image(cfg, 2, 1))

    mtime = os.stat(root / "manifest.json").st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("second call must not render")

    monkeypatch.setattr(syn, "render_image", boom)
    assert write_identity_folder(root, SyntheticConfig(**cfg.to_dict())) == root
    assert os.stat(root / "manifest.json").st_mtime_ns == mtime
    monkeypatch.undo()

    with pytest.raises(FileExistsError, match="different"):
        write_identity_folder(root, SyntheticConfig(**{**cfg.to_dict(), "seed": 2}))
    with pytest.raises(FileExistsError, match="different"):
        write_identity_folder(root, cfg, identities=[0, 1])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="manifest"):
        write_identity_folder(tmp_path / "other", cfg)


def _parse_pairs(path: Path):
    lines = path.read_text().splitlines()
    folds, n = map(int, lines[0].split("\t"))
    out = []
    for k, line in enumerate(lines[1:]):
        f = line.split("\t")
        fold = k // (2 * n)
        if len(f) == 3:
            out.append((f[0], int(f[1]), f[0], int(f[2]), True, fold))
        else:
            assert len(f) == 4
            out.append((f[0], int(f[1]), f[2], int(f[3]), False, fold))
    return folds, n, lines, out


def test_pairs_balanced_disjoint_and_roundtrip(tmp_path):
    labels = np.repeat(np.arange(100, 140), 5)  # 40 identities x 5 images
    pairs = make_pairs(labels, num_folds=10, pairs_per_fold=30, seed=0)
    assert pairs == make_pairs(labels, num_folds=10, pairs_per_fold=30, seed=0)
    assert len(pairs) == 10 * 60
    ids_per_fold = []
    for f in range(10):
        fp = [p for p in pairs if p[3] == f]
        assert sum(p[2] for p in fp) == 30 and sum(not p[2] for p in fp) == 30
        assert all((labels[a] == labels[b]) == same and a != b for a, b, same, _ in fp)
        assert len({(a, b) for a, b, *_ in fp}) == 60  # unique pairs within a fold
        ids_per_fold.append({int(labels[a]) for a, *_ in fp} | {int(labels[b]) for _, b, *_ in fp})
    for f in range(10):
        for g in range(f + 1, 10):
            assert not ids_per_fold[f] & ids_per_fold[g]  # identity-disjoint folds

    names = [identity_name(lab) for lab in labels]
    path = write_pairs_file(tmp_path / "pairs.txt", pairs, names)
    folds, n, lines, parsed = _parse_pairs(path)
    assert lines[0] == "10\t30" and (folds, n) == (10, 30)
    assert len(lines) == 1 + 10 * 60
    index = {(names[k], k % 5 + 1): k for k in range(len(labels))}  # LFW numbers are 1-based
    back = [(index[(na, ia)], index[(nb, ib)], same, fold) for na, ia, nb, ib, same, fold in parsed]
    assert back == pairs
    assert all(1 <= ia <= 5 and 1 <= ib <= 5 for _, ia, _, ib, *_ in parsed)


def test_pairs_lfw_default_size_and_small_sets():
    labels = np.repeat(np.arange(100), 10)
    pairs = make_pairs(labels)  # LFW defaults: 10 folds x (300 same + 300 different)
    assert len(pairs) == 6000
    # too few identities for disjoint folds: still balanced, shared identities
    small = np.repeat(np.arange(4), 3)
    sp = make_pairs(small, num_folds=10, pairs_per_fold=20)
    for f in range(10):
        fp = [p for p in sp if p[3] == f]
        assert sum(p[2] for p in fp) == 20 and len(fp) == 40
        assert all((small[a] == small[b]) == same for a, b, same, _ in fp)
    with pytest.raises(ValueError):
        make_pairs(np.arange(5))  # no identity has two images
    with pytest.raises(ValueError):
        write_pairs_file(Path("unused.txt"), [(0, 1, True, 0)], ["a", "a"])  # unbalanced
