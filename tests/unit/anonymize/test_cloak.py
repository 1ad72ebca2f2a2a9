"""Tests for fedface.anonymize.cloak: budgets, region, determinism, alignment, targets."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedface.anonymize.boxes import Box
from fedface.anonymize.cloak import (
    FAWKES_BUDGETS,
    Cloak,
    CloakConfig,
    chip_transform,
    cloak_chips,
    dssim,
)
from fedface.errors import UserError
from fedface.models import build_backbone
from tests.conftest import SHARED_DATA

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[3]
LFW_MODEL = ROOT / "experiments/results/dp/none-eps-inf-s0/model.pt"
LFW_IMAGE = SHARED_DATA / "lfw" / "lfw-deepfunneled" / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg"
SIZE = 32
# dlib 5-point order: outer/inner corner of the image-right eye, outer/inner of the left, nose.
LANDMARKS = np.array([[88.0, 62.0], [74.0, 63.0], [40.0, 62.0], [54.0, 63.0], [64.0, 84.0]])


class _Centered(torch.nn.Module):
    """A backbone minus its mean embedding over some images.

    A random network maps every input to nearly the same direction (cosine ~0.9 between
    unrelated images for a random TinyFace); removing that common part leaves the
    input-dependent part, as training would, so the cosines below mean something.
    """

    def __init__(self, net: torch.nn.Module, images: np.ndarray):
        super().__init__()
        self.net = net
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            self.register_buffer("mu", net(x).mean(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) - self.mu


def _backbone(seed: int = 0) -> torch.nn.Module:
    """A tiny random backbone from the registry (TinyFace, 32 px, 32-d), centred."""
    torch.manual_seed(seed)
    net = build_backbone("tinyface", embedding_size=32, input_size=SIZE).eval()
    images = np.stack([_image(SIZE, SIZE, seed=100 + s) for s in range(8)])
    return _Centered(net, images).eval()


def _image(h: int = 128, w: int = 136, seed: int = 0) -> np.ndarray:
    """A smooth random image with a face-like blob (texture for SSIM to measure)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(40, 215, (h // 8 + 1, w // 8 + 1, 3))
    img = np.kron(low, np.ones((8, 8, 1)))[:h, :w]
    img += rng.normal(0, 12, img.shape)
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((xx - 64) / 30) ** 2 + ((yy - 70) / 38) ** 2))
    img = img * (1 - blob[..., None]) + np.array([200, 160, 130]) * blob[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _box() -> Box:
    return Box(30.0, 40.0, 98.0, 108.0, 1.0, LANDMARKS)


FAST = dict(steps=30, lr=1.0, target_pool=4)


@pytest.fixture(scope="module")
def cloaked():
    """One cloaked image (shared by the checks that only read it)."""
    image = _image()
    before = image.copy()
    cloak = Cloak(_backbone(), {"image_size": SIZE}, CloakConfig(budget=0.012, linf=8, **FAST))
    out = cloak.apply(image, [_box()])
    return image, before, out, cloak.last_report


def test_output_is_a_uint8_copy_and_the_input_is_untouched(cloaked):
    image, before, out, _ = cloaked
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(image, before)
    assert not np.shares_memory(out, image)
    assert not np.array_equal(out, image)


def test_budget_and_linf_hold_and_only_the_face_region_changes(cloaked):
    image, _, out, (rep,) = cloaked
    assert rep.status == "cloaked" and rep.landmarks == "given"
    x0, y0, x1, y1 = rep.region
    diff = np.abs(out.astype(int) - image.astype(int))
    assert diff.max() <= 8 and rep.linf <= 8
    region_dssim = dssim(out[y0:y1, x0:x1], image[y0:y1, x0:x1])
    assert region_dssim <= 0.012 + 1e-9
    assert abs(region_dssim - rep.dssim) < 1e-6
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert outside.any() and diff[outside].max() == 0
    # the region holds the face box with its margin and the chip's footprint
    assert x0 <= 30 - 6 and y0 <= 40 - 6 and x1 >= 98 + 6 and y1 >= 108 + 6


def test_surrogate_embedding_moves_away_and_towards_the_target(cloaked):
    *_, (rep,) = cloaked
    # measured with this random backbone: cos(original, cloaked) 0.17 after 30 steps
    assert rep.cos_original < 0.5
    assert rep.cos_target > rep.cos_target_before + 0.2
    assert rep.target.startswith("synthetic:")


def test_the_final_check_keeps_a_tight_budget():
    image = _image(seed=1)
    cfg = CloakConfig(budget=FAWKES_BUDGETS["low"], linf=16, penalty=0.0, **FAST)
    cloak = Cloak(_backbone(), {"image_size": SIZE}, cfg)
    out = cloak.apply(image, [_box()])
    (rep,) = cloak.last_report
    x0, y0, x1, y1 = rep.region
    assert dssim(out[y0:y1, x0:x1], image[y0:y1, x0:x1]) <= FAWKES_BUDGETS["low"] + 1e-9
    assert rep.scale < 1.0  # without the penalty the optimiser overshoots; scaling fixes it
    assert rep.cos_original < 0.98  # measured 0.92: the scaled-down cloak still moves it


def test_seeded_runs_are_identical_and_seeds_differ():
    image = _image(seed=2)
    cfg = CloakConfig(steps=8, target_pool=4, seed=3)
    a = Cloak(_backbone(), {"image_size": SIZE}, cfg).apply(image, [_box()])
    b = Cloak(_backbone(), {"image_size": SIZE}, cfg).apply(image, [_box()])
    c = Cloak(_backbone(), {"image_size": SIZE},
              CloakConfig(steps=8, target_pool=4, seed=4)).apply(image, [_box()])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_farthest_target_from_a_given_pool():
    from fedface.anonymize.cloak import _pyramid_depth, _Sampler, _to_tensor

    pool = np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32)
    image = _image()
    backbone = _backbone()
    cloak = Cloak(backbone, {"image_size": SIZE}, CloakConfig(steps=10), targets=pool)
    cloak.apply(image, [_box()])
    (rep,) = cloak.last_report
    affine = chip_transform(LANDMARKS, SIZE)
    sampler = _Sampler(affine[None], SIZE, image.shape[:2], _pyramid_depth(affine, SIZE))
    with torch.no_grad():
        e0 = torch.nn.functional.normalize(backbone(sampler(_to_tensor(image[None]))), dim=1)
    cos = (e0 @ torch.nn.functional.normalize(torch.from_numpy(pool), dim=1).T)[0]
    assert rep.target == f"pool:{int(cos.argmin())}"
    assert rep.cos_target_before == pytest.approx(float(cos.min()), abs=1e-5)
    assert rep.cos_target > rep.cos_target_before


def test_a_face_outside_the_image_is_skipped():
    image = _image()
    cloak = Cloak(_backbone(), {"image_size": SIZE}, CloakConfig(steps=2, target_pool=2))
    out = cloak.apply(image, [Box(500, 500, 600, 600, 1.0, LANDMARKS + 500)])
    assert np.array_equal(out, image)
    assert [r.status for r in cloak.last_report] == ["skipped"]
    assert np.array_equal(cloak.apply(image, []), image)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Cloak.load(tmp_path / "missing" / "model.pt")
    junk = tmp_path / "junk.pt"
    torch.save({"not": "a model"}, junk)
    with pytest.raises(UserError, match="not a fedface model file"):
        Cloak.load(junk)
    with pytest.raises(ValueError, match="budget"):
        CloakConfig(budget=0.0)
    with pytest.raises(ValueError, match="target"):
        CloakConfig(target="nearest")
    with pytest.raises(ValueError, match="uint8"):
        Cloak(_backbone(), {"image_size": SIZE}).apply(np.zeros((8, 8, 3), np.float32), [])
    with pytest.raises(ValueError, match="farthest"):
        Cloak(_backbone(), {"image_size": SIZE}, CloakConfig(target="synthetic"),
              targets=np.ones((2, 32), np.float32)).apply(_image(), [_box()])
    assert CloakConfig.preset("high").budget == 0.017


def test_chip_transform_reproduces_dlibs_face_chip():
    dlib = pytest.importorskip("dlib")
    from fedface.anonymize.cloak import _pyramid_depth, _Sampler, _to_tensor

    image = _image(200, 200, seed=3)
    lm = LANDMARKS + 30
    shape = dlib.full_object_detection(dlib.rectangle(60, 70, 127, 137),
                                       [dlib.point(int(x), int(y)) for x, y in lm])

    def chip(size: int, depth: int) -> np.ndarray:
        sampler = _Sampler(chip_transform(lm, size)[None], size, image.shape[:2], depth)
        return (sampler(_to_tensor(image[None])) * 127.5 + 127.5)[0].permute(1, 2, 0).numpy()

    for size in (48, 64):  # the face is at most twice the chip: plain bilinear, as dlib
        assert _pyramid_depth(chip_transform(lm, size), size) == 0
        err = np.abs(chip(size, 0) - np.asarray(dlib.get_face_chip(image, shape, size, 0.25)))
        assert err.mean() < 0.6 and err.max() <= 1.01  # dlib truncates to integers
    size = 32  # a larger face: dlib samples a pyramid level; ours approximates it
    depth = _pyramid_depth(chip_transform(lm, size), size)
    ref = np.asarray(dlib.get_face_chip(image, shape, size, 0.25), float)
    assert depth == 1
    assert np.abs(chip(size, depth) - ref).mean() < 0.6 * np.abs(chip(size, 0) - ref).mean()


def test_cloak_chips_budget_and_movement():
    chips = np.stack([_image(SIZE, SIZE, seed=s) for s in range(4)])
    before = chips.copy()
    report: list = []
    cfg = CloakConfig(budget=0.012, linf=8, **FAST)
    out = cloak_chips(_backbone(), chips, cfg, labels=np.array([0, 0, 1, 1]), report=report)
    assert np.array_equal(chips, before)
    assert out.dtype == np.uint8 and out.shape == chips.shape
    assert np.abs(out.astype(int) - chips.astype(int)).max() <= 8
    assert len(report) == 4
    for k in range(4):
        assert dssim(out[k], chips[k]) <= 0.012 + 1e-9
        assert report[k].cos_original < 0.8
    # one target per identity (Fawkes: one target per user)
    assert report[0].target == report[1].target and report[2].target == report[3].target


@pytest.mark.skipif(not LFW_MODEL.exists() or not LFW_IMAGE.exists(),
                    reason=f"needs the LFW-trained model {LFW_MODEL} and the LFW image "
                           f"{LFW_IMAGE} (made by the dp experiment and `fedface data lfw`)")
def test_lfw_model_on_a_real_photo():
    pytest.importorskip("dlib")
    from fedface.data.dlib_models import load_detector
    from fedface.data.images import load_image

    image = load_image(LFW_IMAGE)
    rect = load_detector()(image, 0)[0]
    box = Box(rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)  # no landmarks
    cloak = Cloak.load(LFW_MODEL, CloakConfig(budget=0.012, target_pool=8))
    out = cloak.apply(image, [box])
    (rep,) = cloak.last_report
    assert rep.landmarks == "dlib"
    assert rep.dssim <= 0.012 and rep.linf <= 12
    assert rep.cos_original < 0.7  # measured 0.51 (100 steps)
    assert len(load_detector()(out, 0)) == 1  # still a detectable face
