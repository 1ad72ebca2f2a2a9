"""Error-minimizing noise: the budget holds, the stop conditions are the reference's, and the
adversary (whoever trains a recognizer on the published images) learns far less."""

import numpy as np
import pytest

from fedface.data.synthetic import SyntheticConfig, generate
from fedface.unlearnable.evaluate import TrainSettings, top1, train_identifier
from fedface.unlearnable.noise import MinMin, NoiseConfig, parse_eps

S = 32


def _faces(people=8, per=10, seed=0):
    """Generated faces (``size`` S): chips, labels."""
    images, labels = generate(SyntheticConfig(num_identities=people, images_per_identity=per,
                                              size=S, seed=seed))
    return np.asarray(images, np.uint8), np.asarray(labels)


@pytest.mark.parametrize("text, value", [("8/255", 8 / 255), ("0.0313", 0.0313),
                                         (" 4 / 255 ", 4 / 255), (16 / 255, 16 / 255)])
def test_budgets_parse(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text, why", [("abc", "not a number"), ("1/0", "not a number"),
                                       ("0", "out of range"), ("-8/255", "out of range"),
                                       ("64/255", "out of range"), ("nan", "out of range")])
def test_bad_budgets_are_refused_with_the_reason(text, why):
    with pytest.raises(ValueError, match=why):
        parse_eps(text)


def test_bad_settings_are_refused_together():
    with pytest.raises(ValueError) as err:
        NoiseConfig(mode="pixel", surrogate="resnet1000", max_iterations=0)
    for part in ("mode 'pixel'", "resnet1000", "max_iterations 0"):
        assert part in str(err.value)


def test_one_identity_is_refused_for_both_modes():
    x, _ = _faces(2, 4)
    for mode, why in (("class", "class-wise noise"), ("sample", "tells identities apart")):
        with pytest.raises(ValueError, match=f"only one identity.*{why}"):
            MinMin(x, np.zeros(len(x), int), NoiseConfig(mode=mode, image_size=S))


def test_chips_of_another_size_are_refused():
    x, y = _faces(2, 4)
    with pytest.raises(ValueError, match="align them at image_size=48"):
        MinMin(x, y, NoiseConfig(image_size=48))


@pytest.mark.parametrize("mode", ["sample", "class"])
def test_noise_stays_in_budget_and_the_stop_condition_is_the_reference(mode):
    x, y = _faces()
    cfg = NoiseConfig(mode=mode, image_size=S, max_iterations=8, eps=4 / 255)
    mm = MinMin(x, y, cfg)
    stop = mm.run()
    noise = mm.noise_pixels()
    assert np.abs(noise).max() <= 4 + 1e-4
    moved = np.abs(mm.protected().astype(int) - x)
    assert moved.max() <= 4 and moved.mean() > 1  # the budget is used, and kept
    assert stop.iterations == len(stop.history) <= 8
    last = stop.history[-1]
    assert stop.reached == (last > 0.99 if mode == "sample" else last > 0.9)
    if stop.reached:  # it stopped at the first iteration that met the condition
        assert all(not cfg.reached(a) for a in stop.history[:-1])
    if mode == "class":  # one pattern per person
        for label in np.unique(y):
            rows = noise[y == label]
            assert np.array_equal(rows[0], rows[-1])
        assert not np.array_equal(noise[y == 0][0], noise[y == 1][0])


def test_the_cap_ends_a_run_that_does_not_converge():
    x, y = _faces()
    stop = MinMin(x, y, NoiseConfig(image_size=S, max_iterations=1, noise_steps=1)).run()
    assert stop.iterations == 1 and not stop.reached


def test_a_resumed_run_is_the_uninterrupted_run():
    x, y = _faces(4, 6)
    cfg = NoiseConfig(image_size=S, max_iterations=3, noise_steps=2, model_steps=3)
    whole = MinMin(x, y, NoiseConfig(**{**cfg.to_dict(), "max_iterations": 3}))
    whole.run()
    first = MinMin(x, y, NoiseConfig(**{**cfg.to_dict(), "max_iterations": 3}))
    saved = {}

    class Stop(Exception):
        pass

    def interrupt(m):
        saved.update(m.state_dict())
        raise Stop

    with pytest.raises(Stop):
        first.run(on_iteration=interrupt)
    again = MinMin(x, y, cfg)
    again.load_state_dict(saved)
    assert again.iteration == 1
    again.run()
    assert np.array_equal(again.protected(), whole.protected())
    assert again.history == whole.history
    with pytest.raises(ValueError, match="other settings"):
        MinMin(x, y, NoiseConfig(**{**cfg.to_dict(), "seed": 1})).load_state_dict(saved)


def test_the_adversary_learns_the_noise_not_the_people(lfw_root):
    """Adversary: whoever trains a recognizer on the published (protected) images. Trained on
    clean images of 20 LFW people it identifies their held-out images; trained on the
    protected ones (class-wise noise), at most half as well (the benchmark measures the
    full-size figures). Generated faces are no test of this: their identities are learnt
    within the first iterations, so the stop condition is met by the faces, not the noise."""
    from fedface.data.align import AlignConfig, FaceAligner
    from fedface.data.datasets import load_dataset
    from fedface.unlearnable.bench import _split

    ds = load_dataset(lfw_root).filter_min_images(10)
    train, test = _split(ds, 20, 14)
    aligner = FaceAligner(AlignConfig.for_layout("lfw", size=48))
    x, _, _ = aligner.align_files([ds.paths[i] for i in train])
    xt, _, _ = aligner.align_files([ds.paths[i] for i in test])
    y, yt = ds.labels[train], ds.labels[test]
    mm = MinMin(x, y, NoiseConfig(mode="class", image_size=48, max_iterations=10))
    assert mm.run().reached
    settings = TrainSettings(epochs=30)
    clean = top1(*train_identifier("tinyface", x, y, 20, settings), xt, yt)
    protected = top1(*train_identifier("tinyface", mm.protected(), y, 20, settings), xt, yt)
    assert clean >= 0.3
    assert protected <= 0.5 * clean


def test_a_batchnorm_surrogate_is_attacked_with_batch_statistics_and_left_as_it_was():
    """MobileFaceNet (BatchNorm): the noise steps see the surrogate as training does, and
    leave its running averages and its mode untouched."""
    import torch

    x, y = _faces(4, 4)
    mm = MinMin(x, y, NoiseConfig(image_size=S, surrogate="mobilefacenet", noise_steps=1,
                                  model_steps=1, batch_size=8))
    mm._train_model()
    before = {k: v.clone() for k, v in mm.backbone.state_dict().items() if "running" in k}
    mm.backbone.eval()
    mm._noise_pass(None)
    after = mm.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not mm.backbone.training


def test_a_budget_under_one_grey_level_is_refused():
    """An 8-bit image cannot carry it: the output would be the input, called protected."""
    with pytest.raises(ValueError, match="less than one grey level"):
        parse_eps("0.0035")
    assert parse_eps("1/255") == pytest.approx(1 / 255)
