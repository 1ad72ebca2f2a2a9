"""Tests for fedface.data I/O: images, reports, LFW protocol files, folders, dlib models, alignment.

Fast (well under a minute). Real-data tests read ../shared/data (or $FEDFACE_SHARED_DATA) in place
and skip with a reason when it is absent.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from fedface.data import (
    AlignConfig,
    DataReport,
    FaceAligner,
    FaceDataset,
    ImageError,
    Pair,
    PairFileError,
    dlib_models,
    images,
    load_dataset,
    load_image,
    read_pairs,
    read_people,
    scan_identity_folder,
)
from fedface.data.datasets import DataSource, detect_layout, find_images_root, resolve_source
from fedface.data.pairs import read_people_folds

# ----------------------------------------------------------------------------------------------
# helpers


def _shared_data() -> Path:
    env = os.environ.get("FEDFACE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def lfw_dir() -> Path:
    d = _shared_data() / "lfw"
    if not (d / "pairs.txt").is_file():
        pytest.skip("../shared/data/lfw not found: real-data tests need the shared data folder")
    return d


@pytest.fixture(scope="module")
def orl_dir() -> Path:
    d = _shared_data() / "orl"
    if not (d / "s1").is_dir():
        pytest.skip("../shared/data/orl not found: real-data tests need the shared data folder")
    return d


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(h: int = 64, w: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(h, w)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _gradient(h: int = 120, w: int = 100) -> np.ndarray:
    """A smooth image with no face in it."""
    y = np.linspace(0, 255, h)[:, None]
    x = np.linspace(0, 255, w)[None, :]
    img = np.stack([y + 0 * x, 0 * y + x, (y + x) / 2], axis=2)
    return img.astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# images


def test_load_image_converts_every_mode_to_rgb(tmp_path: Path) -> None:
    rgb = _rgb(40, 50)
    grey = rgb[:, :, 0]
    cases = {
        "grey.png": (Image.fromarray(grey), (40, 50)),
        "rgba.png": (Image.fromarray(np.dstack([_rgb(33, 21), np.full((33, 21), 255, np.uint8)])),
                     (33, 21)),
        "palette.png": (Image.fromarray(_rgb(17, 70)).convert("P"), (17, 70)),
        "deep16.png": (Image.fromarray(grey.astype(np.uint16) * 257), (40, 50)),
        "la.png": (Image.fromarray(grey).convert("LA"), (40, 50)),
        "img.pgm": (Image.fromarray(grey), (40, 50)),
        "img.ppm": (Image.fromarray(rgb), (40, 50)),
        "img.bmp": (Image.fromarray(rgb), (40, 50)),
        "img.tif": (Image.fromarray(rgb), (40, 50)),
        "img.webp": (Image.fromarray(rgb), (40, 50)),
        "img.JPG": (Image.fromarray(rgb), (40, 50)),
        "cmyk.jpeg": (Image.fromarray(rgb).convert("CMYK"), (40, 50)),
    }
    for name, (im, (h, w)) in cases.items():
        im.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.shape == (h, w, 3), name
        assert out.dtype == np.uint8, name
        assert out.flags.c_contiguous, name
    # grey and 16-bit grey are exact: three equal channels holding the original values
    for name in ("grey.png", "deep16.png", "img.pgm"):
        out = load_image(tmp_path / name)
        assert np.array_equal(out[:, :, 0], grey), name
        assert np.array_equal(out[:, :, 0], out[:, :, 2]), name
    assert np.array_equal(load_image(tmp_path / "img.ppm"), rgb)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 15]) == (255, 255, 255)


def _expect_error(path: Path, *words: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for word in words:
        assert word in msg.lower(), msg
    return info.value


def test_load_image_errors_name_the_file_and_problem(tmp_path: Path, monkeypatch) -> None:
    jpeg = _jpeg_bytes()
    (tmp_path / "zero.jpg").write_bytes(b"")
    _expect_error(tmp_path / "zero.jpg", "empty")

    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    _expect_error(tmp_path / "cut.jpg", "truncated")
    (tmp_path / "cut_tail.jpg").write_bytes(jpeg[:-2])  # only the EOI marker lost
    _expect_error(tmp_path / "cut_tail.jpg", "truncated")

    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    _expect_error(tmp_path / "notes.jpg", "not an image")

    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    _expect_error(tmp_path / "anim.gif", "unsupported extension", ".png")
    (tmp_path / "README").write_text("x")
    _expect_error(tmp_path / "README", "unsupported extension")

    err = _expect_error(tmp_path / "nowhere.png", "does not exist")
    assert isinstance(err, FileNotFoundError)

    Image.fromarray(_rgb(4, 4)).save(tmp_path / "tiny.png")
    _expect_error(tmp_path / "tiny.png", "absurd size", "4x4")
    Image.fromarray(_rgb(40, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    _expect_error(tmp_path / "big.png", "absurd size")


def test_truncation_detected_even_when_pillow_is_told_to_accept_it(
    tmp_path: Path, monkeypatch
) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(40, 50)).save(buf, "PNG")
    png = buf.getvalue()
    (tmp_path / "cut.png").write_bytes(png[:-12])  # lost the IEND chunk: Pillow alone accepts it
    (tmp_path / "cut.jpg").write_bytes(_jpeg_bytes()[:-300])
    Image.fromarray(_rgb(40, 50)).save(tmp_path / "whole.ppm")
    data = (tmp_path / "whole.ppm").read_bytes()
    (tmp_path / "cut.ppm").write_bytes(data[:-100])
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    for flag in (False, True):  # another library may have set the global; we must not care
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", flag)
        for name in ("cut.png", "cut.jpg", "cut.ppm"):
            _expect_error(tmp_path / name, "truncated")
        assert ImageFile.LOAD_TRUNCATED_IMAGES is flag  # load_image did not touch it
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", before)


# ----------------------------------------------------------------------------------------------
# report


def test_data_report_add_bump_merge_and_summary() -> None:
    rep = DataReport()
    rep.add("missing_image", Path("/x/pairs.txt"), "image not found", line=7)
    rep.add("not_an_image", "/x/a/notes.txt", "bad extension")
    rep.bump("images", 5)
    other = DataReport()
    other.add("missing_image", "/y/pairs.txt", "gone", line=2)
    other.bump("images")
    rep.merge(other)
    assert rep.counts == {"missing_image": 2, "not_an_image": 1, "images": 6}
    assert rep.problems[0] == {
        "kind": "missing_image", "path": "/x/pairs.txt", "line": 7, "reason": "image not found"
    }
    assert "line" not in rep.problems[1]
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["counts"]["images"] == 6 and len(d["problems"]) == 3
    lines = rep.summary_lines(max_problems=2)
    assert lines[0].startswith("counts:") and "images=6" in lines[0]
    assert any("/x/pairs.txt:7" in ln for ln in lines)
    assert lines[-1].strip() == "... and 1 more"
    assert DataReport().summary_lines()[-1] == "no problems"


# ----------------------------------------------------------------------------------------------
# LFW-style protocol files on a small generated tree


def _make_lfw_tree(root: Path, names: dict[str, int], ext: str = ".jpg") -> Path:
    images_root = root / "lfw-deepfunneled"
    for name, n in names.items():
        (images_root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            (images_root / name / f"{name}_{i:04d}{ext}").write_bytes(_jpeg_bytes(16, 16))
    return images_root


_NAMES = {"Ann_A": 3, "Bob_B": 2, "Cid_C": 1, "Dee_D": 2}


def test_read_pairs_folds_and_labels(tmp_path: Path) -> None:
    _make_lfw_tree(tmp_path, _NAMES)
    pf = tmp_path / "pairs.txt"
    pf.write_text(
        "2\t2\n"
        "Ann_A\t1\t2\nBob_B\t1\t2\nAnn_A\t1\tCid_C\t1\nBob_B 2 Dee_D 1\n"
        "Ann_A 2 3\nDee_D 1 2\nCid_C 1 Ann_A 3\nDee_D\t2\tBob_B\t1\n\n"
    )
    rep = DataReport()
    pairs = read_pairs(pf, tmp_path, report=rep)  # the LFW root: lfw-deepfunneled/ is found
    assert len(pairs) == 8
    assert [p.fold for p in pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [p.same for p in pairs] == [True, True, False, False] * 2
    assert pairs[0] == Pair(
        tmp_path / "lfw-deepfunneled/Ann_A/Ann_A_0001.jpg",
        tmp_path / "lfw-deepfunneled/Ann_A/Ann_A_0002.jpg", True, 0,
    )
    assert rep.counts == {"pairs_same": 4, "pairs_different": 4}
    assert read_pairs(pf, tmp_path / "lfw-deepfunneled", strict=True) == pairs


def test_read_pairs_dev_format_and_png_autodetect(tmp_path: Path) -> None:
    root = _make_lfw_tree(tmp_path, _NAMES, ext=".png")
    pf = tmp_path / "pairsDevTest.txt"
    pf.write_text("2\nAnn_A 1 3\nDee_D 1 2\nAnn_A 1 Bob_B 2\nCid_C 1 Dee_D 2\n")
    pairs = read_pairs(pf, root)
    assert len(pairs) == 4 and {p.fold for p in pairs} == {0}
    assert all(p.a.suffix == ".png" and p.a.is_file() and p.b.is_file() for p in pairs)


def test_malformed_pair_line_reports_file_and_line(tmp_path: Path) -> None:
    root = _make_lfw_tree(tmp_path, _NAMES)
    pf = tmp_path / "pairsDevTrain.txt"
    pf.write_text(
        "2\nAnn_A 1 2\nBob_B one 2\n"  # line 3: not a number
        "Ann_A 1 Cid_C 1\nBob_B 1 Dee_D 2 extra\n"  # line 5: five fields
    )
    rep = DataReport()
    pairs = read_pairs(pf, root, report=rep)
    assert len(pairs) == 2
    bad = rep.problems_of("malformed_pair_line")
    assert [p["line"] for p in bad] == [3, 5]
    assert all(p["path"] == str(pf) for p in bad)
    assert rep.count("malformed_pair_line") == 2
    assert any(f"{pf}:3" in line for line in rep.summary_lines())
    with pytest.raises(PairFileError, match=rf"{pf.name}:3: .*positive integers"):
        read_pairs(pf, root, strict=True)
    (tmp_path / "bad_header.txt").write_text("ten 300\nAnn_A 1 2\n")
    with pytest.raises(PairFileError, match=r"bad_header.txt:1: bad header"):
        read_pairs(tmp_path / "bad_header.txt", root)
    with pytest.raises(FileNotFoundError, match="pairs file"):
        read_pairs(tmp_path / "nope.txt", root)


def test_pair_with_missing_image_is_reported_and_skipped(tmp_path: Path) -> None:
    root = _make_lfw_tree(tmp_path, _NAMES)
    pf = tmp_path / "pairsDevTest.txt"
    pf.write_text("2\nAnn_A 1 2\nAnn_A 1 9\nZed_Z 1 Ann_A 1\nCid_C 1 Dee_D 2\n")
    rep = DataReport()
    pairs = read_pairs(pf, root, report=rep)
    assert len(pairs) == 2
    missing = rep.problems_of("missing_image")
    assert [p["line"] for p in missing] == [3, 4]
    assert "Ann_A_0009.jpg" in missing[0]["reason"]
    assert rep.counts["missing_image"] == 2 and rep.counts["pairs_same"] == 1


def test_pair_count_mismatch_is_reported(tmp_path: Path) -> None:
    root = _make_lfw_tree(tmp_path, _NAMES)
    pf = tmp_path / "pairs.txt"
    pf.write_text("1 2\nAnn_A 1 2\nBob_B 1 2\nAnn_A 1 Cid_C 1\n")  # one mismatched line short
    rep = DataReport()
    assert len(read_pairs(pf, root, report=rep)) == 3
    assert rep.problems_of("pair_count_mismatch")[0]["line"] == 4
    with pytest.raises(PairFileError, match="truncated"):
        read_pairs(pf, root, strict=True)


def test_read_people_single_and_multi_fold(tmp_path: Path) -> None:
    single = tmp_path / "peopleDevTrain.txt"
    single.write_text("3\nAnn_A\t3\nBob_B\t2\nCid_C\t1\n")
    assert read_people(single) == {"Ann_A": 3, "Bob_B": 2, "Cid_C": 1}
    multi = tmp_path / "people.txt"
    multi.write_text("2\n2\nAnn_A 3\nBob_B 2\n1\nCid_C 1\n")
    assert read_people_folds(multi) == [{"Ann_A": 3, "Bob_B": 2}, {"Cid_C": 1}]
    assert read_people(multi) == {"Ann_A": 3, "Bob_B": 2, "Cid_C": 1}

    broken = tmp_path / "peopleDevTest.txt"
    broken.write_text("3\nAnn_A 3\nBob_B\nAnn_A 1\n")  # line 3 malformed, line 4 a duplicate
    rep = DataReport()
    assert read_people(broken, report=rep) == {"Ann_A": 3}
    assert rep.problems_of("malformed_people_line")[0]["line"] == 3
    assert rep.problems_of("duplicate_identity")[0]["line"] == 4
    assert rep.problems_of("people_count_mismatch")[0]["line"] == 1
    with pytest.raises(PairFileError, match=r"peopleDevTest.txt:3:"):
        read_people(broken, strict=True)


# ----------------------------------------------------------------------------------------------
# identity folders and datasets


def _make_identity_tree(root: Path) -> None:
    for name, n in {"alice": 3, "bob": 0, "carol": 1, "dave": 2}.items():
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            (root / name / f"{i}.jpg").write_bytes(_jpeg_bytes(16, 16))
    (root / "alice" / "notes.txt").write_text("junk")
    (root / "alice" / ".DS_Store").write_bytes(b"\0\0")
    (root / "dave" / "zero.png").write_bytes(b"")
    (root / "stray.jpg").write_bytes(_jpeg_bytes(16, 16))  # root-level files are ignored
    (root / ".hidden_dir").mkdir()


def test_scan_identity_folder_reports_and_counts(tmp_path: Path) -> None:
    _make_identity_tree(tmp_path)
    rep = DataReport()
    ds = scan_identity_folder(tmp_path, report=rep)
    assert ds.identities == ["alice", "carol", "dave"]
    assert ds.num_identities == 3 and len(ds) == 6
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert [p.name for p in ds.paths[:3]] == ["1.jpg", "2.jpg", "3.jpg"]
    assert rep.counts["empty_identity"] == 1
    assert rep.problems_of("empty_identity")[0]["path"].endswith("bob")
    assert rep.counts["not_an_image"] == 2  # notes.txt and .DS_Store
    assert rep.counts["empty_file"] == 1
    assert rep.counts["images"] == 6 and rep.counts["identities"] == 3
    assert scan_identity_folder(tmp_path).paths == ds.paths  # deterministic

    rep2 = DataReport()
    ds2 = scan_identity_folder(tmp_path, report=rep2, identities=["dave", "alice", "zoe"],
                               min_images=3)
    assert ds2.identities == ["alice"]
    assert rep2.counts["missing_identity"] == 1 and rep2.counts["below_min_images"] == 1


def test_scan_identity_folder_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"root/<identity>/\*\.jpg"):
        scan_identity_folder(tmp_path / "missing")
    (tmp_path / "a.jpg").write_bytes(_jpeg_bytes(16, 16))
    with pytest.raises(ValueError, match=r"no identity folders.*root/<identity>/\*\.jpg"):
        scan_identity_folder(tmp_path)
    (tmp_path / "empty_person").mkdir()
    with pytest.raises(ValueError, match="no usable identity"):
        scan_identity_folder(tmp_path)


def test_face_dataset_helpers(tmp_path: Path) -> None:
    _make_identity_tree(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.layout == "folder" and detect_layout(tmp_path) == "folder"
    groups = ds.by_identity()
    assert {k: v.tolist() for k, v in groups.items()} == {0: [0, 1, 2], 1: [3], 2: [4, 5]}
    sub = ds.subset([4, 5, 0])
    assert sub.labels.tolist() == [2, 2, 0] and sub.identities == ds.identities
    assert ds.subset(ds.labels == 2).paths == ds.paths[4:]
    big = ds.filter_min_images(2)
    assert big.identities == ["alice", "dave"] and big.labels.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="labels"):
        FaceDataset(tmp_path, [tmp_path / "x.jpg"], np.array([3]), ["a"], "folder")


def test_detect_layout_and_images_root(tmp_path: Path) -> None:
    lfw = tmp_path / "lfw"
    _make_lfw_tree(lfw, _NAMES)
    assert detect_layout(lfw) == "lfw"
    assert find_images_root(lfw) == lfw / "lfw-deepfunneled"
    (lfw / "peopleDevTrain.txt").write_text("2\nAnn_A 3\nBob_B 5\n")
    rep = DataReport()
    ds = load_dataset(lfw, people_file="peopleDevTrain.txt", report=rep)
    assert ds.identities == ["Ann_A", "Bob_B"] and len(ds) == 5 and ds.layout == "lfw"
    assert rep.problems_of("people_count_mismatch")[0]["path"].endswith("Bob_B")
    orl = tmp_path / "orl"
    for k in (1, 2, 10):
        (orl / f"s{k}").mkdir(parents=True)
        for i in (1, 2, 10):
            Image.fromarray(_rgb(112, 92)[:, :, 0]).save(orl / f"s{k}" / f"{i}.pgm")
    assert detect_layout(orl) == "orl"
    ds = load_dataset(orl)
    assert ds.identities == ["s1", "s2", "s10"]
    assert [p.name for p in ds.paths[:3]] == ["1.pgm", "2.pgm", "10.pgm"]
    with pytest.raises(FileNotFoundError):
        detect_layout(tmp_path / "nothing")


def _write_pairs(path: Path, same: list[tuple[str, int, int]], diff: list[tuple[str, int, str, int]]):
    """A one-fold LFW pairs file (header ``1 <n>``: n same pairs, then n different ones)."""
    assert len(same) == len(diff)
    lines = [f"1 {len(same)}"] + [f"{n}\t{i}\t{j}" for n, i, j in same]
    path.write_text("\n".join(lines + [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in diff]) + "\n")


def test_resolve_source_describes_a_folder_once(tmp_path: Path) -> None:
    lfw = tmp_path / "lfw"
    _make_lfw_tree(lfw, _NAMES)
    (lfw / "peopleDevTrain.txt").write_text("2\nAnn_A 3\nBob_B 2\n")
    _write_pairs(lfw / "pairsDevTest.txt", [("Dee_D", 1, 2)], [("Cid_C", 1, "Dee_D", 1)])
    src = resolve_source(lfw)  # LFW's development protocol by default
    assert src == DataSource(lfw, "lfw", lfw / "lfw-deepfunneled", (lfw / "pairsDevTest.txt",),
                             lfw / "peopleDevTrain.txt", prealigned=False)
    assert src.pairs_images_root == lfw / "lfw-deepfunneled"
    with pytest.raises(AttributeError):
        src.layout = "orl"  # frozen: handed down, never changed on the way
    bare = resolve_source(lfw, protocol_defaults=False)
    assert bare.pair_files == () and bare.people_file is None
    # Names that do not exist as given are looked up in the root.
    (lfw / "mine.txt").write_text((lfw / "pairsDevTest.txt").read_text())
    mine = resolve_source(lfw, ["mine.txt"], "peopleDevTrain.txt")
    assert mine.pair_files == (lfw / "mine.txt",) and mine.people_file == lfw / "peopleDevTrain.txt"
    with pytest.raises(FileNotFoundError, match=r"Pair file .*nope.txt does not exist$"):
        resolve_source(lfw, ["nope.txt"])
    with pytest.raises(FileNotFoundError, match=r"nope.txt does not exist \(from --pairs\)$"):
        resolve_source(lfw, ["nope.txt"], pairs_from="--pairs")
    # Loading from the resolved source is loading from the folder.
    a, b = load_dataset(src), load_dataset(lfw, people_file="peopleDevTrain.txt")
    assert (a.root, a.paths, a.identities, a.layout) == (b.root, b.paths, b.identities, b.layout)
    (lfw / "ann.txt").write_text("1\nAnn_A 3\n")
    assert load_dataset(src, people_file="ann.txt").identities == ["Ann_A"]  # over the source's
    folder = resolve_source(lfw / "lfw-deepfunneled")
    assert (folder.layout, folder.images_root, folder.pair_files) == (
        "folder", lfw / "lfw-deepfunneled", ())
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "pairs.txt").write_text("1 1\n")
    with pytest.raises(FileNotFoundError, match="has LFW protocol files but no image folder"):
        resolve_source(tmp_path / "broken")


def test_prepare_resolves_its_source_once(tmp_path: Path, monkeypatch) -> None:
    """One run's preparation looks at the data folder once and hands the description down."""
    from fedface.config import RunConfig
    from fedface.data import datasets
    from fedface.data.prepare import prepare

    names = {f"Per_{k:02d}": 3 for k in range(10)}
    lfw = tmp_path / "lfw"
    _make_lfw_tree(lfw, names)
    test = list(names)[6:]
    _write_pairs(lfw / "pairsDevTest.txt", [(n, 1, 2) for n in test],
                 [(a, 1, b, 2) for a, b in zip(test, test[1:] + test[:1])])
    calls = []
    for name in ("detect_layout", "find_images_root"):
        real = getattr(datasets, name)
        monkeypatch.setattr(datasets, name, lambda root, _f=real, _n=name: calls.append(_n) or _f(root))
    cfg = RunConfig(data=str(lfw), image_size=32, num_clients=2, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg)
    assert calls == ["detect_layout"]
    assert data.summary["layout"] == "lfw" and data.summary["root"] == str(lfw)
    assert data.summary["pair_sets"] == ["pairsDevTest"]
    assert data.summary["train_identities"] == 6  # the pair identities left training


# ----------------------------------------------------------------------------------------------
# dlib model files


def test_dlib_model_paths() -> None:
    for name in ("shape_predictor_5", "shape_predictor_68", "resnet_recognition", "mmod_detector"):
        path = dlib_models.model_path(name)
        assert path.is_file() and path.suffix == ".dat"
    with pytest.raises(ValueError, match="unknown dlib model"):
        dlib_models.model_path("nope")


def test_dlib_models_missing_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.delenv("FEDFACE_DLIB_MODELS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install face-recognition-models"):
        dlib_models.model_path("shape_predictor_5")


def test_dlib_models_env_override(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDFACE_DLIB_MODELS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="shape_predictor_5_face_landmarks.dat is missing"):
        dlib_models.model_path("shape_predictor_5")


# ----------------------------------------------------------------------------------------------
# alignment on synthetic images


def test_align_no_face_fallback_and_skip() -> None:
    img = _gradient()
    chip, status = FaceAligner(AlignConfig(size=64)).align(img)
    assert status in ("fallback", "fallback_landmarks")
    assert chip is not None and chip.shape == (64, 64, 3) and chip.dtype == np.uint8
    plain, status = FaceAligner(AlignConfig(size=48, fallback_landmarks=False)).align(img[:, :, 0])
    assert status == "fallback" and plain is not None and plain.shape == (48, 48, 3)
    chip, status = FaceAligner(AlignConfig(policy="skip")).align(img)
    assert chip is None and status == "skipped"
    with pytest.raises(ValueError, match="policy"):
        AlignConfig(policy="maybe")


def test_align_large_image_is_downscaled_for_detection() -> None:
    aligner = FaceAligner(AlignConfig(size=32, max_side=128, fallback_landmarks=False))
    chip, status = aligner.align(_gradient(900, 700))
    assert status == "fallback" and chip is not None and chip.shape == (32, 32, 3)
    assert aligner.detector_calls == 1


def test_align_files_reports_unreadable_and_uses_cache(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.roll(_gradient(), 7 * i, axis=1)).save(p)
        paths.append(p)
    (tmp_path / "broken.jpg").write_bytes(_jpeg_bytes()[:200])
    paths.insert(1, tmp_path / "broken.jpg")
    cache = tmp_path / "cache"
    cfg = AlignConfig(size=40)
    done: list[int] = []

    rep = DataReport()
    first = FaceAligner(cfg, cache_dir=cache)
    chips, keep, statuses = first.align_files(paths, report=rep, progress=done.append)
    assert chips.shape == (4, 40, 40, 3) and chips.dtype == np.uint8
    assert keep.tolist() == [True, False, True, True]
    assert statuses[1] == "unreadable" and not chips[1].any()
    assert done == [1, 2, 3, 4]
    bad = rep.problems_of("unreadable_image")
    assert len(bad) == 1 and bad[0]["path"] == str(paths[1]) and "truncated" in bad[0]["reason"]
    assert sum(rep.counts.get(s, 0) for s in ("fallback", "fallback_landmarks")) == 3
    assert first.detector_calls == 3 and first.cache_misses == 4  # the broken file too
    entries = sorted((cache / "align").glob("*/*.npy"))
    assert len(entries) == 3
    assert all(e.parent.name == e.stem[:2] and e.with_suffix(".json").is_file() for e in entries)
    assert not list(cache.rglob("*.tmp"))

    rep2 = DataReport()
    second = FaceAligner(cfg, cache_dir=cache)
    chips2, keep2, statuses2 = second.align_files(paths, report=rep2)
    assert second.detector_calls == 0 and second._detector is None  # dlib never touched
    assert rep2.counts["cache_hit"] == 3 and rep2.counts["unreadable_image"] == 1
    assert np.array_equal(chips, chips2) and keep2.tolist() == keep.tolist()
    assert statuses2 == statuses

    other = FaceAligner(AlignConfig(size=40, padding=0.3), cache_dir=cache)
    other.align_files(paths[:1])
    assert other.detector_calls == 1  # a config change is a different cache key

    skip = FaceAligner(AlignConfig(size=40, policy="skip"), cache_dir=cache)
    _, _, statuses3 = skip.align_files(paths[:1])
    again = FaceAligner(AlignConfig(size=40, policy="skip"), cache_dir=cache)
    _, keep4, statuses4 = again.align_files(paths[:1])
    assert statuses3 == statuses4 == ["skipped"] and not keep4.any()
    assert again.detector_calls == 0


# ----------------------------------------------------------------------------------------------
# real data (skipped when ../shared/data is absent)


def test_real_lfw_pairs(lfw_dir: Path) -> None:
    rep = DataReport()
    pairs = read_pairs(lfw_dir / "pairs.txt", lfw_dir, report=rep, strict=True)
    assert len(pairs) == 6000
    assert sorted({p.fold for p in pairs}) == list(range(10))
    assert sum(p.same for p in pairs) == 3000
    assert all(sum(1 for p in pairs if p.fold == f) == 600 for f in range(10))
    assert rep.num_problems == 0
    dev_test = read_pairs(lfw_dir / "pairsDevTest.txt", lfw_dir, strict=True)
    assert len(dev_test) == 1000 and sum(p.same for p in dev_test) == 500
    assert len(read_pairs(lfw_dir / "pairsDevTrain.txt", lfw_dir, strict=True)) == 2200


def test_real_lfw_people(lfw_dir: Path) -> None:
    train = read_people(lfw_dir / "peopleDevTrain.txt", strict=True)
    test = read_people(lfw_dir / "peopleDevTest.txt", strict=True)
    assert len(train) == 4038 and len(test) == 1711
    assert not set(train) & set(test)
    folds = read_people_folds(lfw_dir / "people.txt", strict=True)
    assert len(folds) == 10 and sum(len(f) for f in folds) == 5749
    assert sum(sum(f.values()) for f in folds) == 13233


def test_real_orl_dataset(orl_dir: Path) -> None:
    rep = DataReport()
    ds = load_dataset(orl_dir, report=rep)
    assert ds.layout == "orl" and ds.num_identities == 40 and len(ds) == 400
    assert np.bincount(ds.labels).tolist() == [10] * 40
    assert ds.identities[:3] == ["s1", "s2", "s3"]
    assert rep.num_problems == 0
    assert load_image(ds.paths[0]).shape == (112, 92, 3)


def test_real_align_lfw_and_orl(lfw_dir: Path, orl_dir: Path, tmp_path: Path) -> None:
    lfw_paths = [p.a for p in read_pairs(lfw_dir / "pairsDevTest.txt", lfw_dir)[:24:2]]
    rep = DataReport()
    chips, keep, statuses = FaceAligner(AlignConfig(size=112)).align_files(lfw_paths, rep)
    assert chips.shape == (12, 112, 112, 3) and keep.all()
    assert statuses.count("detected") >= 10, statuses

    orl_paths = [orl_dir / f"s{k}" / "1.pgm" for k in (1, 7, 13, 25, 40)]
    aligner = FaceAligner(AlignConfig.for_layout("orl", size=96), cache_dir=tmp_path)
    chips, keep, statuses = aligner.align_files(orl_paths)
    assert chips.shape == (5, 96, 96, 3) and keep.all()
    assert statuses.count("detected") >= 4, statuses
