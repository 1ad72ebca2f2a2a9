"""``fedface anonymize`` on files and folders: mirroring, fail-closed reports, bad input
named with what to do, inputs never modified, atomic outputs."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedface.anonymize.detect import DetectConfig
from fedface.anonymize.files import AnonymizeOptions, anonymize_path, plan_outputs
from fedface.cli import app
from fedface.errors import UserError

runner = CliRunner()


def _tree(root):
    """Three images without a face (the fail-closed cases), a sub-folder, a text file, and
    bad images."""
    (root / "sub").mkdir(parents=True)
    for k, name in enumerate(("a.jpg", "b.png", "sub/c.jpg")):
        Image.fromarray(_scene(k)).save(root / name, quality=95)
    (root / "notes.txt").write_text("hello")
    (root / "empty.jpg").write_bytes(b"")
    good = (root / "a.jpg").read_bytes()
    (root / "sub" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "sub" / "text.png").write_text("not an image")
    return root


def _scene(seed):
    """A smooth colourful 96x128 texture: nothing a detector takes for a face."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((128, 96), Image.BILINEAR))


def _digests(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_folder_run_mirrors_reports_and_never_touches_the_input(tmp_path):
    src = _tree(tmp_path / "in")
    before = _digests(src)
    rep = anonymize_path(src, tmp_path / "out", AnonymizeOptions(method="mosaic"))
    assert _digests(src) == before
    out = tmp_path / "out"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["a.jpg", "b.png", "sub/c.jpg"]
    by_name = {f["input"].split("/in/")[1]: f for f in rep.files}
    assert by_name["notes.txt"]["status"] == "skipped"
    for bad, words in (("empty.jpg", "empty"), ("sub/cut.jpg", "truncated"),
                       ("sub/text.png", "not")):
        assert by_name[bad]["status"] == "error" and words in by_name[bad]["error"]
        assert bad.split("/")[-1] in by_name[bad]["error"]
    # No face is found on cartoon faces: fail closed, every image covered whole.
    assert rep.totals["whole_frame"] == 3 and rep.totals["passed_unprotected"] == 0
    a_in, a_out = np.asarray(Image.open(src / "a.jpg")), np.asarray(Image.open(out / "a.jpg"))
    assert np.abs(a_in.astype(int) - a_out).mean() > 5
    assert Image.open(out / "b.png").format == "PNG"
    # No temporary file is left anywhere.
    assert not [p for p in out.rglob(".*")]


def test_policies_pass_and_refuse_are_reported(tmp_path):
    src = _tree(tmp_path / "in")
    rep = anonymize_path(src, tmp_path / "p", AnonymizeOptions(on_miss="pass"))
    assert rep.totals["passed_unprotected"] == 3
    assert np.array_equal(np.asarray(Image.open(src / "b.png")),
                          np.asarray(Image.open(tmp_path / "p" / "b.png")))
    rep = anonymize_path(src, tmp_path / "r", AnonymizeOptions(on_miss="refuse"))
    refused = [f for f in rep.files if f["status"] == "refused"]
    assert len(refused) == 3 and all("no face found" in f["error"] for f in refused)
    assert not (tmp_path / "r" / "a.jpg").exists()


def test_outputs_refused_inside_or_equal_to_the_input_and_existing_kept(tmp_path):
    src = _tree(tmp_path / "in")
    with pytest.raises(UserError, match="inside the input folder"):
        plan_outputs(src, src / "anon")
    with pytest.raises(UserError, match="input itself"):
        plan_outputs(src / "a.jpg", src / "a.jpg")
    with pytest.raises(UserError, match="no such file"):
        plan_outputs(tmp_path / "missing", tmp_path / "o")
    anonymize_path(src / "a.jpg", tmp_path / "o.jpg", AnonymizeOptions())
    first = (tmp_path / "o.jpg").read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        anonymize_path(src / "a.jpg", tmp_path / "o.jpg", AnonymizeOptions(method="mask"))
    assert (tmp_path / "o.jpg").read_bytes() == first
    anonymize_path(src / "a.jpg", tmp_path / "o.jpg", AnonymizeOptions(method="mask", overwrite=True))
    assert (tmp_path / "o.jpg").read_bytes() != first


def test_format_option_and_single_bad_file(tmp_path):
    src = _tree(tmp_path / "in")
    anonymize_path(src, tmp_path / "png", AnonymizeOptions(fmt="png"))
    assert (tmp_path / "png" / "sub" / "c.png").exists()
    with pytest.raises(UserError, match="empty"):
        anonymize_path(src / "empty.jpg", tmp_path / "e.jpg", AnonymizeOptions())
    with pytest.raises(UserError, match="not an image"):
        anonymize_path(src / "notes.txt", tmp_path / "n.txt", AnonymizeOptions())
    assert not (tmp_path / "e.jpg").exists()


def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    src = _tree(tmp_path / "in")
    import fedface.anonymize.files as files

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        anonymize_path(src / "a.jpg", tmp_path / "o.jpg", AnonymizeOptions())
    assert list(tmp_path.glob("*o.jpg*")) == []


def test_cli_runs_writes_the_report_and_exits_nonzero_on_bad_files(tmp_path):
    src = _tree(tmp_path / "in")
    rep = tmp_path / "report.json"
    res = runner.invoke(app, ["anonymize", str(src), str(tmp_path / "out"), "--method", "blur",
                              "--preset", "high", "--boxes", "--report", str(rep)])
    assert res.exit_code == 1, res.output  # bad files listed
    assert "empty" in res.output
    doc = json.loads(rep.read_text())
    assert doc["settings"]["options"] == {"strength": 0.2} and doc["settings"]["shape"] == "box"
    assert doc["totals"]["ok"] == 3 and doc["totals"]["error"] == 3
    res = runner.invoke(app, ["anonymize", str(src / "a.jpg"), str(tmp_path / "x.jpg"),
                              "--method", "smudge"])
    assert res.exit_code == 2 and "unknown method" in res.output
    res = runner.invoke(app, ["anonymize", str(src / "a.jpg"), str(tmp_path / "x.jpg"),
                              "--replacewith", "solid", "--color", "255,0,0", "--on-miss", "frame"])
    assert res.exit_code == 0, res.output
    assert (np.asarray(Image.open(tmp_path / "x.jpg")).astype(int) - [255, 0, 0]).__abs__().mean() < 8
    res = runner.invoke(app, ["anonymize", str(src), str(src / "o")])
    assert res.exit_code == 2 and "inside the input folder" in res.output


def test_detector_settings_are_checked():
    with pytest.raises(ValueError, match="scale"):
        DetectConfig(scale="640by360")
    with pytest.raises(ValueError, match="detector"):
        DetectConfig(detector="yolo")


def test_scramble_through_the_cli_restores_exactly(tmp_path):
    from fedface.anonymize.detect import FaceDetector  # noqa: F401  (the CLI loads dlib)

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_scene(5)).save(src / "a.png")
    Image.fromarray(_scene(6)).save(src / "b.jpg", quality=95)
    key, other = tmp_path / "k.key", tmp_path / "other.key"
    assert runner.invoke(app, ["keys", "scramble", str(key)]).exit_code == 0
    assert runner.invoke(app, ["keys", "scramble", str(other)]).exit_code == 0
    res = runner.invoke(app, ["keys", "scramble", str(key)])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(app, ["anonymize", str(src), str(tmp_path / "s"), "-m", "scramble"])
    assert res.exit_code == 2 and "--key" in res.output
    res = runner.invoke(app, ["anonymize", str(src), str(tmp_path / "s"), "-m", "scramble",
                              "--key", str(key)])
    assert res.exit_code == 1 and "--format png" in res.output  # b.jpg: lossy, refused
    assert not (tmp_path / "s" / "b.jpg").exists()
    scrambled = np.asarray(Image.open(tmp_path / "s" / "a.png"))
    assert np.abs(scrambled.astype(int) - _scene(5)).mean() > 40  # no face: whole frame
    res = runner.invoke(app, ["anonymize", "--restore", "--key", str(other),
                              str(tmp_path / "s" / "a.png"), str(tmp_path / "bad.png")])
    assert res.exit_code == 2 and "key" in res.output and not (tmp_path / "bad.png").exists()
    res = runner.invoke(app, ["anonymize", "--restore", "--key", str(key),
                              str(tmp_path / "s"), str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r" / "a.png")), _scene(5))
    res = runner.invoke(app, ["anonymize", "--restore", "--key", str(key),
                              str(src / "a.png"), str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "not scrambled" in res.output
