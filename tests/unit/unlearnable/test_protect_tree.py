"""``fedface unlearnable``: a folder of faces in, the same tree of protected PNGs out, with a
manifest; bad input refused with the reason; the input never modified; resumable."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedface.cli import app
from fedface.data.synthetic import SyntheticConfig, write_identity_folder
from fedface.errors import UserError
from fedface.unlearnable.files import MANIFEST, protect_tree
from fedface.unlearnable.noise import NoiseConfig

runner = CliRunner()
S = 32
FAST = dict(image_size=S, max_iterations=2, noise_steps=2, model_steps=2)


def _tree(root, people=3, per=4, size=40):
    """A generated identity folder (faces fill the frame: no detection needed)."""
    write_identity_folder(root, SyntheticConfig(num_identities=people, images_per_identity=per,
                                                size=size, seed=1))
    return root


class _Stop(Exception):
    """Stands for a run killed after its first iteration."""


def _interrupt(what, done, total):
    if what == "min-min iterations" and done == 1:
        raise _Stop


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_a_tree_is_protected_at_its_own_resolution_with_a_manifest(tmp_path):
    src = _tree(tmp_path / "in")
    (src / "id_00001" / "broken.png").write_bytes(b"not a png")
    (src / "nobody").mkdir()
    before = _digest(src)
    doc = protect_tree(src, tmp_path / "out", NoiseConfig(**FAST))
    assert _digest(src) == before  # the input is never modified
    assert doc["complete"] and doc["images_protected"] == 12 and doc["identities"] == 3
    kinds = {(p["kind"], p["path"]) for p in doc["skipped"]}
    assert ("unreadable_image", "id_00001/broken.png") in kinds
    assert ("empty_identity", "nobody") in kinds
    assert doc["stop"]["iterations"] <= 2 and "condition" in doc["stop"]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == doc
    for name, entry in doc["images"].items():
        out = np.asarray(Image.open(tmp_path / "out" / name))
        clean = np.asarray(Image.open(src / entry["source"]).convert("RGB"))
        assert out.shape == clean.shape == (40, 40, 3)  # the input's resolution, not the chip's
        moved = np.abs(out.astype(int) - clean).max()
        assert moved == round(entry["max_perturbation"] * 255) and 1 <= moved <= 8
        assert name.endswith(".png") and entry["alignment"] == "prealigned"
    assert all(not p["path"].startswith(("/", "..")) for p in doc["skipped"])  # input-relative


def test_a_finished_output_is_left_as_it_is_and_other_settings_are_refused(tmp_path):
    src, dst = _tree(tmp_path / "in"), tmp_path / "out"
    protect_tree(src, dst, NoiseConfig(**FAST))
    stamp = (dst / MANIFEST).stat().st_mtime_ns
    protect_tree(src, dst, NoiseConfig(**FAST))
    assert (dst / MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match=r"other settings \(eps .*: choose another output"):
        protect_tree(src, dst, NoiseConfig(**{**FAST, "eps": 4 / 255}))


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path):
    src = _tree(tmp_path / "in")
    cfg = NoiseConfig(**{**FAST, "max_iterations": 3})
    whole = protect_tree(src, tmp_path / "whole", cfg, cache_dir=tmp_path / "c1")

    with pytest.raises(_Stop):
        protect_tree(src, tmp_path / "out", cfg, cache_dir=tmp_path / "c2", progress=_interrupt)
    partial = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert partial["complete"] is False
    state = list((tmp_path / "c2").rglob("state.pt"))
    assert len(state) == 1  # the surrogate and noise live in the cache, not in the output
    assert not list((tmp_path / "out").rglob("*.pt"))
    seen = []
    doc = protect_tree(src, tmp_path / "out", cfg, cache_dir=tmp_path / "c2",
                       progress=lambda w, d, t: seen.append((w, d)))
    assert ("min-min iterations", 1) not in seen  # iteration 1 was not run again
    assert doc["stop"]["history"] == whole["stop"]["history"]
    for name in whole["images"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not list((tmp_path / "c2").rglob("state.pt"))  # deleted once written


@pytest.mark.parametrize("case, why", [
    ("inside", "lies inside the input"),
    ("missing", "does not exist"),
    ("empty", "has no identity folders"),
    ("one", "only one identity"),
    ("nonempty", "not empty and holds no unlearnable manifest"),
])
def test_bad_input_is_refused_with_the_reason(tmp_path, case, why):
    src = _tree(tmp_path / "in")
    dst = tmp_path / "out"
    if case == "inside":
        dst = src / "protected"
    elif case == "missing":
        src = tmp_path / "nothing"
    elif case == "empty":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "one":
        src = tmp_path / "single"
        (src / "alice").mkdir(parents=True)
        for f in sorted((tmp_path / "in" / "id_00000").glob("*.png")):
            (src / "alice" / f.name).write_bytes(f.read_bytes())
    elif case == "nonempty":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    before = _digest(tmp_path / "in")
    with pytest.raises((UserError, ValueError), match=why):
        protect_tree(src, dst, NoiseConfig(**FAST))
    assert _digest(tmp_path / "in") == before
    if case == "nonempty":
        assert (dst / "keep.txt").read_text() == "mine"


def test_mixed_sizes_are_aligned_to_the_configured_size(tmp_path):
    src = _tree(tmp_path / "in", size=40)
    big = _tree(tmp_path / "big", people=3, per=1, size=64)
    for f in big.rglob("*.png"):  # one larger image per person
        (src / f.parent.name / ("big_" + f.name)).write_bytes(f.read_bytes())
    doc = protect_tree(src, tmp_path / "out", NoiseConfig(**FAST))
    assert doc["images_protected"] == 15
    sizes = {np.asarray(Image.open(tmp_path / "out" / n)).shape[0] for n in doc["images"]}
    assert sizes == {40, 64}


def test_faces_found_in_real_photos_get_the_noise_mapped_back(lfw_root, tmp_path):
    """LFW: the noise is made on the aligned chip and carried into the 250 x 250 image;
    pixels away from the face do not change, and aligning the protected image again gives
    back the chip noise (what a recognizer trained on it sees)."""
    from fedface.data.align import AlignConfig, FaceAligner
    from fedface.unlearnable.noise import MinMin  # noqa: F401 - imported for the reader

    src = tmp_path / "in"
    for name in ("Aaron_Peirsol", "Abdullah_Gul", "Adrien_Brody"):
        (src / name).mkdir(parents=True)
        for f in sorted((lfw_root / "lfw-deepfunneled" / name).glob("*.jpg"))[:3]:
            (src / name / f.name).symlink_to(f)
    doc = protect_tree(src, tmp_path / "out", NoiseConfig(image_size=48, max_iterations=2))
    assert doc["images_protected"] == 9
    aligner = FaceAligner(AlignConfig.for_layout("lfw", size=48))
    agree = []
    for name, entry in doc["images"].items():
        clean = np.asarray(Image.open(src / entry["source"]).convert("RGB"))
        out = np.asarray(Image.open(tmp_path / "out" / name))
        assert out.shape == clean.shape == (250, 250, 3)
        diff = out.astype(int) - clean
        assert np.abs(diff).max() <= 8 and entry["alignment"] == "detected"
        assert not diff[:20].any() and not diff[-20:].any()  # image borders: no face there
        chip_clean, affine, _ = aligner.align_with_geometry(clean)
        chip_prot, _, _ = aligner.align_with_geometry(out)
        agree.append(np.abs(chip_prot.astype(int) - chip_clean).mean())
    assert np.mean(agree) > 2  # the noise survives re-detection and re-alignment


def test_the_cli_protects_a_folder_and_refuses_bad_budgets(tmp_path):
    src = _tree(tmp_path / "in")
    res = runner.invoke(app, ["unlearnable", str(src), str(tmp_path / "out"), "--eps", "9/0"])
    assert res.exit_code == 2 and "not a number" in res.output
    res = runner.invoke(app, ["unlearnable", str(src), str(tmp_path / "out"), "--eps", "40/255"])
    assert res.exit_code == 2 and "out of range" in res.output
    res = runner.invoke(app, ["unlearnable", str(src), str(tmp_path / "out"), "--mode", "class",
                              "--image-size", "32", "--max-iterations", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert doc["settings"]["noise"]["mode"] == "class" and doc["images_protected"] == 12
    assert "images protected" in res.output


def test_a_budget_between_grey_levels_is_kept_on_the_written_pixels(tmp_path):
    """0.031 is 7.9 grey levels: a written 8-bit pixel may move by 7, never 8."""
    src = _tree(tmp_path / "in")
    doc = protect_tree(src, tmp_path / "out", NoiseConfig(**{**FAST, "eps": 0.031}))
    assert doc["max_perturbation"] * 255 == pytest.approx(7)


def test_changed_input_is_never_resumed_or_passed_off_as_done(tmp_path):
    src, dst = _tree(tmp_path / "in"), tmp_path / "out"
    cfg = NoiseConfig(**{**FAST, "max_iterations": 3})

    with pytest.raises(_Stop):
        protect_tree(src, dst, cfg, progress=_interrupt)
    extra = next((src / "id_00002").glob("*.png"))
    (src / "id_00002" / "added.png").write_bytes(extra.read_bytes())
    seen = []
    doc = protect_tree(src, dst, cfg, progress=lambda w, d, t: seen.append((w, d)))
    assert ("min-min iterations", 1) in seen  # started afresh: the old state was not used
    assert doc["images_protected"] == 13 and "id_00002/added.png" in doc["images"]
    (src / "id_00002" / "added.png").unlink()
    with pytest.raises(UserError, match="other input images"):
        protect_tree(src, dst, cfg)


def test_inputs_that_would_share_an_output_are_refused_before_any_work(tmp_path):
    src = _tree(tmp_path / "in")
    first = sorted((src / "id_00000").glob("*.png"))[0]
    Image.open(first).save(first.with_suffix(".jpg"))
    with pytest.raises(UserError, match=r"would both be written as id_00000/.*\.png"):
        protect_tree(src, tmp_path / "out", NoiseConfig(**FAST))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["out", "in"])
def test_the_state_never_lives_in_the_output_or_the_input(tmp_path, where):
    src, dst = _tree(tmp_path / "in"), tmp_path / "out"
    before = _digest(src)
    with pytest.raises(UserError, match="cache folder .* lies inside the"):
        protect_tree(src, dst, NoiseConfig(**FAST), cache_dir=tmp_path / where / "cache")
    assert _digest(src) == before and not (tmp_path / "out").exists()


def test_an_output_that_contains_the_input_is_refused(tmp_path):
    src = _tree(tmp_path / "data" / "in")
    with pytest.raises(UserError, match="contains the input"):
        protect_tree(src, tmp_path / "data", NoiseConfig(**FAST))


def test_a_refused_input_leaves_no_manifest_behind(tmp_path):
    src = tmp_path / "single"
    (src / "alice").mkdir(parents=True)
    for f in sorted(_tree(tmp_path / "in").joinpath("id_00000").glob("*.png")):
        (src / "alice" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="only one identity"):
        protect_tree(src, tmp_path / "out", NoiseConfig(**FAST))
    assert not (tmp_path / "out" / MANIFEST).exists()
