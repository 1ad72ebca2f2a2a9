"""fedface/anonymize/scramble.py: exact restore with the key, noise without it, and the files."""

import json

import numpy as np
import pytest
from PIL import Image

from crypto.scramble import key_id, new_key
from fedface.anonymize.boxes import Box
from fedface.anonymize.scramble import (
    META_KEY,
    ScrambleError,
    WrongKeyError,
    png_info,
    read_meta,
    requires_lossless,
    restore,
    restore_file,
    save_scrambled,
    scramble,
)
from fedface.errors import UserError

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def _face_image(h=96, w=128, seed=0) -> np.ndarray:
    """A smooth, structured image (gradients and a bright ellipse: strongly self-correlated)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx / w * 200, yy / h * 200, (xx + yy) / (w + h) * 255], axis=-1)
    ellipse = ((xx - 64) / 22) ** 2 + ((yy - 48) / 30) ** 2 < 1
    img[ellipse] = [230, 180, 150]
    img += np.random.default_rng(seed).normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


FACE = Box(40.3, 16.7, 88.2, 80.0)  # pixels (40, 16, 89, 80)


def test_scramble_hides_the_face_and_restores_it_exactly():
    img = _face_image()
    before = img.copy()
    out, meta = scramble(img, [FACE], KEY)
    assert np.array_equal(img, before)  # the input is not modified
    x0, y0, x1, y1 = meta["boxes"][0]
    assert (x0, y0, x1, y1) == FACE.pixels(128, 96) == (40, 16, 89, 80)
    orig, scr = img[y0:y1, x0:x1], out[y0:y1, x0:x1]
    assert abs(_corr(orig, scr)) < 0.05
    assert (orig != scr).mean() > 0.95
    # noise: close to uniform bytes, no spatial structure left
    assert abs(float(scr.mean()) - 127.5) < 5
    assert abs(_corr(scr[:, :-1], scr[:, 1:])) < 0.05
    # outside the box nothing changes
    mask = np.ones(img.shape[:2], bool)
    mask[y0:y1, x0:x1] = False
    assert np.array_equal(out[mask], img[mask])
    json.dumps(meta)
    assert meta["size"] == [128, 96] and meta["channels"] == 3 and meta["key_id"] == key_id(KEY)
    assert np.array_equal(restore(out, meta, KEY), img)


def test_exact_restore_through_a_png_file(tmp_path):
    img = _face_image()
    key_path = tmp_path / "scramble.key"
    key = new_key(key_path)
    out, meta = scramble(img, [FACE, Box(0, 0, 20, 20)], key)
    scrambled = save_scrambled(tmp_path / "face.png", out, meta)
    assert read_meta(scrambled) == meta
    with Image.open(scrambled) as im:
        assert np.array_equal(np.asarray(im), out)
    restored = restore_file(scrambled, tmp_path / "restored.png", key_path)
    with Image.open(restored) as im:
        assert np.array_equal(np.asarray(im), img)  # bit for bit
    assert read_meta(restored) is None  # the restored file does not claim to be scrambled


def test_exact_restore_through_a_tiff_file(tmp_path):
    img = _face_image()
    key_path = tmp_path / "scramble.key"
    key = new_key(key_path)
    out, meta = scramble(img, [FACE], key)
    scrambled = save_scrambled(tmp_path / "face.tiff", out, meta)
    assert read_meta(scrambled) == meta
    restored = restore_file(scrambled, tmp_path / "restored.tif", key_path)
    with Image.open(restored) as im:
        assert np.array_equal(np.asarray(im), img)


def test_callers_saving_their_own_png_keep_the_metadata(tmp_path):
    img = _face_image()
    out, meta = scramble(img, [FACE], KEY)
    path = tmp_path / "own.png"
    Image.fromarray(out).save(path, pnginfo=png_info(meta))
    assert read_meta(path) == meta


def test_wrong_key_is_refused_with_both_key_ids():
    img = _face_image()
    out, meta = scramble(img, [FACE], KEY)
    with pytest.raises(WrongKeyError, match=f"scrambled with key {key_id(KEY)}; the given key is key "
                                            f"{key_id(OTHER)}") as err:
        restore(out, meta, OTHER)
    assert isinstance(err.value, UserError)


def test_wrong_key_file_is_named(tmp_path):
    img = _face_image()
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    out, meta = scramble(img, [FACE], new_key(right))
    wrong_key = new_key(wrong)
    path = save_scrambled(tmp_path / "s.png", out, meta)
    with pytest.raises(WrongKeyError, match=f"{path} was scrambled with key {meta['key_id']}; the key "
                                            f"file {wrong} is key {key_id(wrong_key)}"):
        restore_file(path, tmp_path / "r.png", wrong)
    assert not (tmp_path / "r.png").exists()


def test_wrong_key_unchecked_gives_noise():
    img = _face_image()
    out, meta = scramble(img, [FACE], KEY)
    bad = restore(out, meta, OTHER, check=False)
    x0, y0, x1, y1 = meta["boxes"][0]
    orig, got, scr = img[y0:y1, x0:x1], bad[y0:y1, x0:x1], out[y0:y1, x0:x1]
    assert abs(_corr(orig, got)) < 0.1
    assert (got != orig).mean() > 0.95 and (got != scr).mean() > 0.95
    assert abs(_corr(got[:, :-1], got[:, 1:])) < 0.05  # no structure: not a face


def test_right_key_unchecked_restores_too():
    img = _face_image()
    out, meta = scramble(img, [FACE], KEY)
    assert np.array_equal(restore(out, meta, KEY, check=False), img)


def test_overlapping_boxes_restore_exactly():
    img = _face_image()
    faces = [Box(10, 10, 70, 70), Box(40, 30, 110, 90), Box(50, 40, 60, 50), Box(10, 10, 70, 70)]
    out, meta = scramble(img, faces, KEY)
    assert meta["boxes"] == [[10, 10, 70, 70], [40, 30, 110, 90], [50, 40, 60, 50], [10, 10, 70, 70]]
    assert np.array_equal(restore(out, meta, KEY), img)
    # undoing in the wrong order does not restore: the order matters and is recorded
    shuffled = dict(meta, boxes=meta["boxes"][::-1])
    with pytest.raises(ScrambleError):
        restore(out, shuffled, KEY)


def test_boxes_are_clipped_and_empty_ones_dropped():
    img = _face_image()
    out, meta = scramble(img, [Box(-20, -5, 30.5, 10), Box(200, 200, 300, 300), Box(5, 5, 5, 9)], KEY)
    assert meta["boxes"] == [[0, 0, 31, 10]]
    assert np.array_equal(restore(out, meta, KEY), img)
    out, meta = scramble(img, [], KEY)
    assert np.array_equal(out, img) and meta["boxes"] == []
    assert np.array_equal(restore(out, meta, KEY), img)


def test_two_scrambles_of_one_image_share_nothing():
    img = _face_image()
    a, meta_a = scramble(img, [FACE], KEY)
    b, meta_b = scramble(img, [FACE], KEY)
    assert meta_a["nonce"] != meta_b["nonce"] and meta_a["check"] != meta_b["check"]
    x0, y0, x1, y1 = meta_a["boxes"][0]
    assert (a[y0:y1, x0:x1] != b[y0:y1, x0:x1]).mean() > 0.95
    assert abs(_corr(a[y0:y1, x0:x1], b[y0:y1, x0:x1])) < 0.05


def test_resized_or_cropped_image_is_refused():
    img = _face_image()
    out, meta = scramble(img, [FACE], KEY)
    with pytest.raises(ScrambleError, match="is 64x48 pixels but was scrambled at 128x96.*resized"):
        restore(out[::2, ::2], meta, KEY)
    with pytest.raises(ScrambleError, match="1 channel.*scrambled with 3.*converted"):
        restore(out[:, :, 0], meta, KEY)


def test_resized_file_is_refused(tmp_path):
    key_path = tmp_path / "k.key"
    out, meta = scramble(_face_image(), [FACE], new_key(key_path))
    small = Image.fromarray(out).resize((64, 48))
    small.save(tmp_path / "small.png", pnginfo=png_info(meta))
    with pytest.raises(ScrambleError, match="small.png is 64x48 pixels but was scrambled at 128x96"):
        restore_file(tmp_path / "small.png", tmp_path / "r.png", key_path)


def test_edited_or_reencoded_pixels_are_detected():
    img = _face_image()
    out, meta = scramble(img, [FACE], KEY)
    edited = out.copy()
    edited[30, 50, 1] ^= 1
    with pytest.raises(ScrambleError, match="did not reproduce the original faces exactly"):
        restore(edited, meta, KEY)
    # unchecked, the damage stays local: one pixel differs
    assert (restore(edited, meta, KEY, check=False) != img).sum() == 1


def test_stripped_metadata_is_a_clear_error(tmp_path):
    key_path = tmp_path / "k.key"
    out, _ = scramble(_face_image(), [FACE], new_key(key_path))
    Image.fromarray(out).save(tmp_path / "stripped.png")
    assert read_meta(tmp_path / "stripped.png") is None
    with pytest.raises(UserError, match="stripped.png was not scrambled by fedface or its metadata "
                                        "was stripped"):
        restore_file(tmp_path / "stripped.png", tmp_path / "r.png", key_path)


def test_garbled_metadata_is_a_clear_error(tmp_path):
    img = _face_image()
    out, meta = scramble(img, [FACE], KEY)
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text(META_KEY, '{"format": "fedface-scr')
    Image.fromarray(out).save(tmp_path / "g.png", pnginfo=info)
    with pytest.raises(ScrambleError, match="metadata is not readable"):
        read_meta(tmp_path / "g.png")
    for bad, match in [(dict(meta, version=2), "version 2"),
                       (dict(meta, boxes=[[0, 0, 500, 10]]), "malformed.*box"),
                       (dict(meta, nonce="00"), "malformed.*nonce"),
                       (dict(meta, format="other"), "no fedface scramble metadata")]:
        with pytest.raises(ScrambleError, match=match):
            restore(out, bad, KEY)


def test_missing_key_file_is_a_user_error(tmp_path):
    out, meta = scramble(_face_image(), [FACE], KEY)
    path = save_scrambled(tmp_path / "s.png", out, meta)
    with pytest.raises(UserError, match="absent.key does not exist"):
        restore_file(path, tmp_path / "r.png", tmp_path / "absent.key")


@pytest.mark.parametrize("suffix", [".jpg", "JPEG", ".webp", ".avif"])
def test_lossy_outputs_are_refused(suffix, tmp_path):
    with pytest.raises(UserError, match="scramble needs a lossless output.*use --format png"):
        requires_lossless(suffix)
    out, meta = scramble(_face_image(), [FACE], KEY)
    with pytest.raises(UserError, match="lossless"):
        save_scrambled(tmp_path / f"s.{suffix.lstrip('.')}", out, meta)


def test_lossless_outputs():
    assert requires_lossless(".png") == requires_lossless("PNG") == "PNG"
    assert requires_lossless(".tif") == requires_lossless("tiff") == "TIFF"
    with pytest.raises(UserError, match="PNG or TIFF.*use --format png"):
        requires_lossless(".bmp")


def test_bad_input_arrays_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        scramble(_face_image().astype(np.float32), [FACE], KEY)
    with pytest.raises(ValueError, match="HxWxC"):
        scramble(_face_image()[:, :, 0], [FACE], KEY)


def test_rgba_images_restore_exactly(tmp_path):
    img = np.dstack([_face_image(), np.full((96, 128), 255, np.uint8)])
    key_path = tmp_path / "k.key"
    out, meta = scramble(img, [FACE], new_key(key_path))
    path = save_scrambled(tmp_path / "rgba.png", out, meta)
    restored = restore_file(path, tmp_path / "r.png", key_path)
    with Image.open(restored) as im:
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im), img)
