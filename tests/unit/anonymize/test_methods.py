"""The box methods (blur, mosaic, mask, dppix), the registry, the fail-closed pipeline and
the chip preprocessing: behaviour and numbers."""

import numpy as np
import pytest

from fedface.anonymize.boxes import Box, iou
from fedface.anonymize.chips import anonymize_chips, chip_face_box
from fedface.anonymize.classic import Blur, Mask, Mosaic, parse_color, region_mask
from fedface.anonymize.dppix import DPPix, laplace_scale
from fedface.anonymize.pipeline import Anonymizer, MissedFace
from fedface.anonymize.registry import METHODS, build_method, resolve_options
from fedface.config import RunConfig


def _image(h=120, w=160, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


BOX = Box(40, 20, 100, 90)


@pytest.mark.parametrize("method", [Blur(), Mosaic(), Mask(), DPPix(seed=3)])
def test_methods_change_only_the_face_and_never_the_input(method):
    img = _image()
    before = img.copy()
    out = method.apply(img, [BOX])
    assert np.array_equal(img, before)  # input untouched
    assert out.dtype == np.uint8 and out.shape == img.shape
    outside = np.ones(img.shape[:2], bool)
    outside[20:90, 40:100] = False
    assert np.array_equal(out[outside], img[outside])
    # The inscribed ellipse's centre changed substantially (random pixels have std ~74).
    diff = np.abs(out[45:65, 60:80].astype(int) - img[45:65, 60:80].astype(int)).mean()
    assert diff > 20


def test_ellipse_leaves_the_corners_and_box_covers_them():
    img = _image()
    ell = Mask(shape="ellipse").apply(img, [BOX])
    box = Mask(shape="box").apply(img, [BOX])
    assert np.array_equal(ell[20, 40], img[20, 40]) and (box[20, 40] == 0).all()
    assert (ell[55, 70] == 0).all()
    m = region_mask(BOX, 40, 20, 100, 90, "ellipse")
    assert abs(m.mean() - np.pi / 4) < 0.03  # an inscribed ellipse covers pi/4 of its box


def test_face_cut_by_the_border_keeps_its_ellipse():
    edge = Box(-30, 10, 30, 70)  # half outside on the left
    m = region_mask(edge, 0, 10, 30, 70, "ellipse")
    assert m[30, 0] and not m[0, 29]  # centre row at the border is inside, corner is not


def test_blur_strength_orders_the_smoothing_and_mosaic_blocks_are_flat():
    img = _image()
    weak, strong = Blur(0.02, "box").apply(img, [BOX]), Blur(0.3, "box").apply(img, [BOX])
    face = (slice(20, 90), slice(40, 100))
    assert strong[face].astype(float).std() < weak[face].astype(float).std() < img[face].std()
    out = Mosaic(blocks=6, shape="box").apply(img, [Box(0, 0, 60, 60)])
    assert len(np.unique(out[:60, :60].reshape(-1, 3), axis=0)) <= 36


def test_dppix_noise_has_fan_scale_and_fresh_draws():
    assert laplace_scale(16, 16, 0.5) == pytest.approx(255 * 16 / (256 * 0.5))
    flat = np.full((160, 160, 3), 100, np.uint8)
    big = Box(0, 0, 160, 160)
    out = DPPix(b=4, epsilon=1.0, m=4, seed=0).apply(flat, [big]).astype(float)
    blocks = out[::4, ::4, 0] - 100  # one value per block
    # Laplace(b) has mean absolute deviation b (here 255*4/16 = 63.75), before clipping.
    assert np.median(np.abs(blocks)) == pytest.approx(63.75 * np.log(2), rel=0.25)
    a = DPPix().apply(flat, [big])
    b = DPPix().apply(flat, [big])
    assert not np.array_equal(a, b)  # the CSPRNG draws anew for every image
    with pytest.raises(ValueError, match="epsilon"):
        DPPix(epsilon=0)


def test_registry_presets_options_and_refusals():
    assert set(METHODS) == {"blur", "mosaic", "mask", "ksame", "dppix", "cloak", "scramble"}
    assert resolve_options("blur", "high") == {"strength": 0.2}
    assert resolve_options("blur", "low", "strength=0.3") == {"strength": 0.3}
    assert resolve_options("mosaic", "medium", {"blocks": "4"}) == {"blocks": 4}
    with pytest.raises(ValueError, match="no option 'k'"):
        resolve_options("blur", "medium", "k=3")
    with pytest.raises(ValueError, match="unknown method"):
        resolve_options("smudge")
    with pytest.raises(ValueError, match="preset"):
        resolve_options("blur", "extreme")
    with pytest.raises(ValueError, match="not a number"):
        resolve_options("blur", "medium", "strength=lots")
    assert build_method("mask", options="color=#ff0000").color == (255, 0, 0)
    assert parse_color("grey") == (128, 128, 128)
    with pytest.raises(ValueError, match="colour"):
        parse_color("12,300,0")


def test_fail_closed_policies():
    from fedface.anonymize.detect import FaceDetector

    img = _image()
    for policy in ("frame", "refuse", "pass"):
        a = Anonymizer(Mask(shape="box"), _as_detector(FaceDetector, []), 1.0, policy)
        if policy == "refuse":
            with pytest.raises(MissedFace, match="no face found"):
                a.anonymize(img, "x.jpg")
            continue
        out, frame = a.anonymize(img, "x.jpg")
        assert frame.policy == policy
        if policy == "frame":
            assert (out == 0).all()  # every pixel covered, corners included
        else:
            assert np.array_equal(out, img)
    a = Anonymizer(Blur(), _as_detector(FaceDetector, []), 1.0, "frame")
    out, _ = a.anonymize(img)
    assert np.abs(out.astype(int) - img).mean() > 30  # whole-frame ellipse reaches corners
    assert not np.array_equal(out[0, 0], img[0, 0])


def _as_detector(cls, boxes):
    d = cls.__new__(cls)
    d.detect = lambda image: list(boxes)
    d.landmarks = lambda image, b: b
    return d


def test_mask_scale_grows_the_box_about_its_centre():
    b = Box(10, 10, 30, 50).expand(1.5)
    assert (b.x0, b.y0, b.x1, b.y1) == (5, 0, 35, 60)
    assert iou(Box(0, 0, 10, 10), Box(5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_real_faces_are_found_and_covered(tmp_path):
    from pathlib import Path

    from fedface.anonymize.detect import DetectConfig, FaceDetector
    from fedface.data.images import load_image
    photo = Path(__file__).resolve().parents[4] / "shared" / "data" / "faces-multi" / "friends_t1.jpg"
    if not photo.exists():
        pytest.skip(f"{photo} not found: real-face tests need the shared data folder")
    img = load_image(photo)
    det = FaceDetector(DetectConfig(upsample=1))
    faces = det.detect(img)
    assert len(faces) == 6  # the six people of the photo
    small = FaceDetector(DetectConfig(upsample=1, scale="640x480")).detect(img)
    assert len(small) >= 5 and all(f.x1 <= img.shape[1] + 1 for f in small)
    out, frame = Anonymizer(Blur(0.2), det).anonymize(img)
    assert len(frame.faces) == 6
    assert det.detect(out) == []  # no face is left to find


def test_chip_preprocessing_covers_the_face_and_keeps_the_border():
    chips = np.stack([_image(64, 64, s) for s in range(3)])
    box = chip_face_box(64)
    assert box.width == pytest.approx(64 / 1.5 * 1.3)
    out = anonymize_chips(chips, "mask", options="color=white", mask_scale=1.0)
    assert (out[:, 32, 32] == 255).all() and np.array_equal(out[:, 0, 0], chips[:, 0, 0])


def test_run_config_refuses_unusable_anonymization():
    assert RunConfig(anonymize="blur", anonymize_preset="high").anonymize == "blur"
    with pytest.raises(ValueError, match="noise until restored"):
        RunConfig(anonymize="scramble")
    with pytest.raises(ValueError, match="surrogate"):
        RunConfig(anonymize="cloak")
    with pytest.raises(ValueError, match="no option"):
        RunConfig(anonymize="blur", anonymize_options="blocks=3")
