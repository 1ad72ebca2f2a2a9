"""Differential privacy: budgets, ledgers, DP-SGD through Opacus, central DP, the MIA audit."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedface.config import RunConfig
from fedface.models import build_backbone, build_head
from fedface.privacy import (
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    central_epsilon,
    check_dp_compatible,
    clip_and_noise_update,
    epsilon_of,
    make_private,
    plan_dp,
)
from fedface.training import make_optimizer, train_epochs

PLAN = dict(rounds=5, local_epochs=1, batch_size=16)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_plan_spends_exactly_the_budget_over_the_planned_rounds(accountant):
    plan = plan_dp(400, epsilon=3.0, accountant=accountant, **PLAN)
    assert plan.delta == 1e-5 and plan.sample_rate == 16 / 400 and plan.steps_per_round == 25
    history = [[plan.noise_multiplier, plan.sample_rate, plan.steps_per_round]] * 5
    eps = epsilon_of(history, plan.delta, accountant)
    assert 2.95 <= eps <= 3.0 + 1e-3
    # A smaller budget needs more noise; a larger one less.
    assert plan_dp(400, epsilon=1.0, **PLAN).noise_multiplier > plan.noise_multiplier
    assert plan_dp(400, epsilon=8.0, **PLAN).noise_multiplier < plan.noise_multiplier


def test_default_delta_is_below_one_over_n():
    assert plan_dp(50, epsilon=8, rounds=2, local_epochs=1, batch_size=10).delta == 1e-5
    big = plan_dp(200_000, epsilon=8, rounds=1, local_epochs=1, batch_size=2000)
    assert big.delta == pytest.approx(1 / 2_000_000)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(epsilon=8, delta=0.01), "dp-delta=0.01 is not below 1/N"),
    (dict(epsilon=8, batch_size=500), "batch-size=500 is not below N"),
    (dict(epsilon=0.001), "too small for even one round"),
    (dict(epsilon=0.3, max_noise_multiplier=5.0), "dp-max-noise=5"),
    (dict(epsilon=0.0), "dp-epsilon=0.0"),
    (dict(epsilon=8, accountant="gdp2"), "dp-accountant"),
])
def test_impossible_budgets_are_refused_with_what_to_change(kwargs, needle):
    args = {**PLAN, **kwargs}
    with pytest.raises(PrivacyConfigError) as err:
        plan_dp(400, client="client 3", **args)
    assert needle in str(err.value)
    if "delta" in kwargs or "batch_size" in kwargs:
        assert "client 3 (N=400" in str(err.value)


def test_ledger_persists_and_declines_the_round_that_would_overspend(tmp_path):
    plan = plan_dp(400, epsilon=3.0, **PLAN)
    path = tmp_path / "ledger.json"
    spent = []
    for rnd in range(1, 6):
        ledger = PrivacyLedger.load(path)  # a restarted client reads what it spent
        ledger.check_next_round(plan)
        spent.append(ledger.record(rnd, plan, plan.steps_per_round))
    # Each figure is the composition of the rounds recorded so far, computed apart.
    one = [plan.noise_multiplier, plan.sample_rate, plan.steps_per_round]
    for i, eps in enumerate(spent):
        assert eps == pytest.approx(epsilon_of([one] * (i + 1), plan.delta, "prv"), rel=1e-6)
    assert all(a < b for a, b in zip(spent, spent[1:]))
    assert 2.9 <= spent[-1] <= 3.0 + 1e-3
    doc = json.loads(path.read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4, 5]
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted: 5 rounds"):
        PrivacyLedger.load(path).check_next_round(plan)
    # The budget spans the federation: a run with another budget is refused.
    with pytest.raises(PrivacyConfigError, match="keep the same settings"):
        PrivacyLedger.load(path).check_next_round(plan_dp(400, epsilon=8.0, **PLAN))
    # ... and so is the same epsilon spent per person instead of per image.
    assert doc["unit"] == "image"
    per_person = plan_dp(400, epsilon=3.0, unit="person", images_per_unit=2, **PLAN)
    with pytest.raises(PrivacyConfigError, match="per image.*per person"):
        PrivacyLedger.load(path).check_next_round(per_person)
    path.write_text("{not json")
    with pytest.raises(PrivacyConfigError, match="unreadable.*never delete"):
        PrivacyLedger.load(path)


def _tiny(classes=4, size=32, seed=0):
    torch.manual_seed(seed)
    return (build_backbone("tinyface", embedding_size=32, input_size=size),
            build_head("softmax", 32, classes))


def _faces(n=64, classes=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = rng.integers(0, 255, (classes, size, size, 3))
    x = np.clip(base[y] + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return x, y


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_dp_sgd_clips_each_sample_and_adds_the_planned_noise(mode):
    x, y = _faces()
    plan = plan_dp(len(y), epsilon=8.0, rounds=1, local_epochs=1, batch_size=16)
    clip = 0.01
    plan = dataclasses.replace(plan, noise_multiplier=0.0, max_grad_norm=clip)
    backbone, head = _tiny()
    before = [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]
    opt = make_optimizer(backbone, head, lr=1.0, momentum=0.0, weight_decay=0.0)
    private = make_private(backbone, head, opt, plan, seed=1, grad_sample_mode=mode)
    assert private.mode == mode
    sizes = []
    batches = list(private.batches())
    res = train_epochs(backbone, head, x, y, optimizer=private.optimizer,
                       batches=lambda g: iter(batches[:1]), forward=private.forward)
    sizes.append(len(batches[0]))
    after = [p.detach() for p in [*backbone.parameters(), *head.parameters()]]
    step = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(after, before)))
    # Without noise, one step moves by at most clip x actual batch / expected batch.
    assert res.steps == 1 and 0 < step <= clip * sizes[0] / plan.batch_size + 1e-6
    # The same step without DP is far larger: the clipping is what bounds it.
    backbone2, head2 = _tiny()
    train_epochs(backbone2, head2, x, y, lr=1.0, momentum=0.0, weight_decay=0.0,
                 batches=lambda g: iter(batches[:1]))
    plain = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in
                          zip([*backbone2.parameters(), *head2.parameters()], before)))
    assert plain > 20 * step
    # With noise: the step's size matches noise x clip / batch per coordinate.
    backbone3, head3 = _tiny()
    noisy = dataclasses.replace(plan, noise_multiplier=2.0)
    opt3 = make_optimizer(backbone3, head3, lr=1.0, momentum=0.0, weight_decay=0.0)
    p3 = make_private(backbone3, head3, opt3, noisy, seed=1, grad_sample_mode=mode)
    train_epochs(backbone3, head3, x, y, optimizer=p3.optimizer,
                 batches=lambda g: iter(batches[:1]), forward=p3.forward)
    moved = torch.cat([(a.detach() - b).flatten() for a, b in
                       zip([*backbone3.parameters(), *head3.parameters()], before)])
    assert moved.std().item() == pytest.approx(2.0 * clip / plan.batch_size, rel=0.05)


def test_poisson_batches_vary_and_follow_the_sample_rate():
    plan = plan_dp(400, epsilon=8.0, rounds=1, local_epochs=1, batch_size=16)
    backbone, head = _tiny()
    private = make_private(backbone, head, make_optimizer(backbone, head, 0.1, 0.9, 0.0), plan)
    sizes = [len(b) for b in private.batches()]
    assert len(sizes) == plan.steps_per_round == 25
    assert len(set(sizes)) > 3 and 12 < np.mean(sizes) < 20


def test_person_level_plan_counts_people_and_refuses_what_cannot_work():
    plan = plan_dp(40, epsilon=8.0, rounds=2, local_epochs=1, batch_size=8, unit="person",
                   images_per_unit=3)
    assert plan.unit == "person" and plan.num_examples == 40 and plan.sample_rate == 0.2
    assert plan.delta == 1e-5
    with pytest.raises(PrivacyConfigError, match="not below 1/N=0.025"):  # N people, not images
        plan_dp(40, epsilon=8.0, delta=0.03, rounds=2, local_epochs=1, batch_size=8,
                unit="person")
    assert plan.image_clip == pytest.approx(plan.max_grad_norm / 3)
    assert plan.image_noise_multiplier == pytest.approx(3 * plan.noise_multiplier)
    with pytest.raises(PrivacyConfigError, match="N=40 people in training.*batch-size 10 or"):
        plan_dp(40, epsilon=8.0, rounds=2, local_epochs=1, batch_size=40, unit="person")
    with pytest.raises(PrivacyConfigError, match="too few people.*dp-unit=image"):
        plan_dp(2, epsilon=8.0, rounds=2, local_epochs=1, batch_size=2, unit="person")
    with pytest.raises(PrivacyConfigError, match="dp-unit"):
        plan_dp(40, epsilon=8.0, rounds=2, local_epochs=1, batch_size=8, unit="patient")
    with pytest.raises(PrivacyConfigError, match="dp-person-images"):
        plan_dp(40, epsilon=8.0, rounds=2, local_epochs=1, batch_size=8, unit="person",
                images_per_unit=0)
    with pytest.raises(ValueError, match="dp_unit='patient'"):
        RunConfig(dp_unit="patient")


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_person_level_dp_samples_people_and_bounds_each_persons_step(mode):
    """dp-unit=person: people are Poisson-sampled, each brings at most k images, and all
    of a person's images together move the model by at most the clip (without noise)."""
    x, y = _faces(n=96, classes=8)  # 8 people x 12 images
    k, clip = 3, 0.01
    plan = plan_dp(8, epsilon=8.0, rounds=1, local_epochs=1, batch_size=2, unit="person",
                   images_per_unit=k)
    plan = dataclasses.replace(plan, noise_multiplier=0.0, max_grad_norm=clip)
    backbone, head = _tiny(classes=8)
    before = [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]
    private = make_private(backbone, head, make_optimizer(backbone, head, 1.0, 0.0, 0.0),
                           plan, seed=2, grad_sample_mode=mode, people=y)
    batches = [b for _ in range(20) for b in private.batches()]
    assert len(list(private.batches())) == plan.steps_per_round == 4
    per_step = [np.bincount(y[b.numpy()], minlength=8) for b in batches]
    assert max(c.max() for c in per_step) == k  # never more than k images of a person
    drawn = np.mean([np.count_nonzero(c) for c in per_step])
    assert 1.2 < drawn < 2.8  # q x 8 people = 2 people per step on average
    one = next(b for b in batches if len(np.unique(y[b.numpy()])) == 1)  # one person, k images
    train_epochs(backbone, head, x, y, optimizer=private.optimizer,
                 batches=lambda g: iter([one]), forward=private.forward)
    step = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in
                         zip([*backbone.parameters(), *head.parameters()], before)))
    expected = plan.sample_rate * 8 * k  # the public normaliser q x P x k
    assert 0.3 * clip < step * expected <= clip * (1 + 1e-4)  # clipped, not vanished
    # With noise: std sigma x C / (q P k) per coordinate, as for one image at image level.
    noisy = dataclasses.replace(plan, noise_multiplier=2.0)
    backbone2, head2 = _tiny(classes=8)
    p2 = make_private(backbone2, head2, make_optimizer(backbone2, head2, 1.0, 0.0, 0.0),
                      noisy, seed=2, grad_sample_mode=mode, people=y)
    train_epochs(backbone2, head2, x, y, optimizer=p2.optimizer,
                 batches=lambda g: iter([one]), forward=p2.forward)
    moved = torch.cat([(a.detach() - b).flatten() for a, b in
                       zip([*backbone2.parameters(), *head2.parameters()], before)])
    assert moved.std().item() == pytest.approx(2.0 * clip / expected, rel=0.05)
    # An empty slot (a person removed) changes nothing public; labels past the slots do.
    make_private(backbone, head, make_optimizer(backbone, head, 1.0, 0.0, 0.0), plan,
                 people=y[y != 3], grad_sample_mode=mode)
    with pytest.raises(PrivacyConfigError, match="plan is for 8 people"):
        make_private(backbone, head, make_optimizer(backbone, head, 1.0, 0.0, 0.0), plan,
                     people=y + 1)
    with pytest.raises(PrivacyConfigError, match="needs the training labels"):
        make_private(backbone, head, make_optimizer(backbone, head, 1.0, 0.0, 0.0), plan)


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_an_empty_poisson_draw_still_takes_a_noise_step(mode):
    x, y = _faces()
    plan = dataclasses.replace(plan_dp(len(y), epsilon=8.0, rounds=1, local_epochs=1,
                                       batch_size=16), noise_multiplier=2.0, max_grad_norm=0.01)
    backbone, head = _tiny()
    before = [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]
    private = make_private(backbone, head, make_optimizer(backbone, head, 1.0, 0.0, 0.0), plan,
                           seed=4, grad_sample_mode=mode)
    res = train_epochs(backbone, head, x, y, optimizer=private.optimizer, forward=private.forward,
                       batches=lambda g: iter([torch.zeros(0, dtype=torch.long)]),
                       on_empty=private.empty_step)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in
                       zip([*backbone.parameters(), *head.parameters()], before)])
    assert res.steps == 1 and res.num_examples == 0
    assert moved.std().item() == pytest.approx(2.0 * 0.01 / plan.batch_size, rel=0.05)


def test_incompatible_model_is_refused_naming_the_layer_and_the_fix():
    check_dp_compatible(build_backbone("tinyface"))
    check_dp_compatible(build_backbone("mobilefacenet-dp", input_size=64))
    with pytest.raises(PrivacyConfigError, match="BatchNorm.*mobilefacenet-dp") as err:
        check_dp_compatible(build_backbone("mobilefacenet", input_size=64), "backbone")
    assert "ModuleValidator.fix" in str(err.value)
    with pytest.raises(PrivacyConfigError, match="backbone 'iresnet18'.*BatchNorm") as err:
        check_dp_compatible(build_backbone("iresnet18", input_size=64), "backbone 'iresnet18'")
    assert "bn1 (BatchNorm2d)" in str(err.value) and "more." in str(err.value)


def test_client_side_central_dp_clips_and_noises_its_share():
    rng = np.random.default_rng(0)
    before = {"w": np.zeros((200, 100), np.float32), "b": np.zeros(50, np.float32)}
    after = {"w": rng.normal(0, 1, (200, 100)).astype(np.float32),
             "b": rng.normal(0, 1, 50).astype(np.float32)}
    clipped, norm = clip_and_noise_update(before, after, clip=1.0, noise_multiplier=0.0,
                                          num_sampled_clients=4, rng=rng)
    assert norm > 100
    assert math.sqrt(sum(float((v ** 2).sum()) for v in clipped.values())) == pytest.approx(1.0, rel=1e-4)
    # Each of m=4 clients adds std noise*clip/sqrt(m): the sum carries noise*clip.
    small = {"w": np.full((200, 100), 1e-4, np.float32), "b": np.zeros(50, np.float32)}
    noisy, _ = clip_and_noise_update(before, small, clip=1.0, noise_multiplier=2.0,
                                     num_sampled_clients=4, rng=rng)
    assert noisy["w"].std() == pytest.approx(2.0 / 2, rel=0.03)
    assert noisy["w"].dtype == np.float32


def test_central_epsilon_shrinks_with_noise():
    e1 = central_epsilon(1.0, 1.0, 10, 1e-5)
    e2 = central_epsilon(2.0, 1.0, 10, 1e-5)
    assert e2 < e1 and central_epsilon(2.0, 0.5, 10, 1e-5) < e2
    assert central_epsilon(0.0, 1.0, 10, 1e-5) == math.inf


@pytest.mark.parametrize("changes,needle", [
    (dict(central_dp="server-fixed", fv=True), "central_dp with fv is refused"),
    (dict(dp_epsilon=8, mode="centralized"), "apply to federated clients"),
    (dict(central_dp="sometimes"), "central_dp='sometimes'"),
    (dict(dp_accountant="moments"), "dp_accountant='moments'"),
    (dict(dp_epsilon=-1.0), "dp_epsilon=-1.0"),
    (dict(strategy="pfm", central_dp="server-adaptive"), "use central_dp=client-fixed with pfm"),
    (dict(dp_person_images=0), "dp_person_images=0"),
])
def test_invalid_privacy_combinations_are_refused_at_start(changes, needle):
    with pytest.raises(ValueError, match="Invalid run configuration") as err:
        RunConfig(**changes)
    assert needle in str(err.value)


# ----------------------------------------------------------------- federated, end to end


def test_gdc_per_sample_gradients_match_autograd():
    from opacus import GradSampleModule

    from fedface.models.layers import GlobalDepthwiseConv

    torch.manual_seed(0)
    layer = GlobalDepthwiseConv(6, 4)
    conv = torch.nn.Conv2d(6, 6, 4, groups=6, bias=False)
    conv.weight.data.copy_(layer.weight.data)
    x = torch.randn(5, 6, 4, 4)
    torch.testing.assert_close(layer(x), conv(x).flatten(1))
    gsm = GradSampleModule(torch.nn.Sequential(layer), loss_reduction="sum")
    (gsm(x) ** 2).sum().backward()
    for i in range(5):
        conv.weight.grad = None
        (conv(x[i : i + 1]) ** 2).sum().backward()
        torch.testing.assert_close(layer.weight.grad_sample[i], conv.weight.grad)


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_pfm_seeded_momentum_survives_the_private_wrapper(mode):
    """PFM's global momentum (public) is seeded before make_private and still drives the
    step: the buffer then meets only clipped, noised gradients."""
    from fedface.momentum import seed_momentum

    x, y = _faces()
    plan = plan_dp(len(y), epsilon=8.0, rounds=1, local_epochs=1, batch_size=16)
    moved = []
    for seeded in (False, True):
        backbone, head = _tiny()
        before = {k: v.detach().clone() for k, v in backbone.named_parameters()}
        opt = make_optimizer(backbone, head, lr=1.0, momentum=0.0, weight_decay=0.0,
                             backbone_momentum=0.5)
        if seeded:
            seed_momentum(opt, backbone,
                          {k: np.full(v.shape, 0.01, np.float32) for k, v in before.items()})
        private = make_private(backbone, head, opt, plan, seed=3, grad_sample_mode=mode)
        batch = next(iter(private.batches()))
        train_epochs(backbone, head, x, y, optimizer=private.optimizer,
                     batches=lambda g, b=batch: iter([b]), forward=private.forward, seed=1)
        moved.append({k: v.detach() - before[k] for k, v in backbone.named_parameters()})
    for k in moved[0]:  # same batch, same noise: the buffer adds exactly -lr * beta * m
        torch.testing.assert_close(moved[1][k] - moved[0][k],
                                   torch.full_like(moved[0][k], -0.005), atol=1e-5, rtol=0)


def test_book_keeping_clips_exactly_like_per_sample_gradients():
    """The one-backward clipped sum equals clipping every sample's own gradient, for the
    ghost-norm and the materialized convolution rules, depthwise convolutions, biases,
    GroupNorm, GDC and Linear."""
    from torch import nn

    from fedface.models.layers import GlobalDepthwiseConv
    from fedface.privacy.bookkeeping import BookKeeping

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=True),           # 16x16: materialized
        nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 32, 3, stride=4, padding=1, bias=True),  # 4x4: ghost norm
        nn.GroupNorm(4, 32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=True),  # depthwise
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False),  # dilated: F.unfold
        nn.ReLU(),
        GlobalDepthwiseConv(32, 4), nn.Linear(32, 5, bias=True))
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 5, (12,))
    params = list(model.parameters())
    grads, norms = [], []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append([p.grad.clone() for p in params])
        norms.append(float(torch.sqrt(sum((t ** 2).sum() for t in grads[-1]))))
    clip = float(np.median(norms))  # half the samples are clipped, half are not
    expected = [sum(min(1.0, clip / (n + 1e-6)) * g[j] for g, n in zip(grads, norms))
                for j in range(len(params))]
    keeper = BookKeeping(model, clip)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(keeper.prepare(x)), y).backward()
    assert all(p.grad is None for p in params)  # autograd computed no weight gradient
    got = keeper.clipped_sum(scale=len(x))
    keeper.release()
    np.testing.assert_allclose(got.numpy(), norms, rtol=1e-4)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)


def test_book_keeping_falls_back_to_opacus_for_layers_it_does_not_know():
    x, y = _faces()
    plan = plan_dp(len(y), epsilon=8.0, rounds=1, local_epochs=1, batch_size=16)
    backbone, _ = _tiny()
    head = build_head("cosface", 32, 4)
    private = make_private(backbone, head, make_optimizer(backbone, head, 0.1, 0.9, 0.0), plan)
    assert private.mode == "hooks"
