"""Tests for fedface.models: registry, backbones, margin heads, Opacus compatibility."""

import math
import warnings

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedface.models import (
    build_backbone,
    build_head,
    count_parameters,
    list_backbones,
    list_heads,
)

torch.set_num_threads(2)

EMB = 32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_contents():
    assert {"tinyface", "mobilefacenet", "iresnet18", "iresnet50"} <= set(list_backbones())
    assert {"softmax", "cosface", "arcface"} <= set(list_heads())
    assert list_backbones() == sorted(list_backbones())


SHAPE_CASES = [
    (name, size)
    for name in ("tinyface", "mobilefacenet", "iresnet18", "iresnet50")
    for size in (112, 64)
    if not (name == "iresnet50" and size == 112)  # keep the suite fast
]


@pytest.mark.parametrize("name,size", SHAPE_CASES)
def test_backbone_output_shape(name, size):
    model = build_backbone(name, embedding_size=EMB, input_size=size)
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, EMB)
    assert torch.isfinite(out).all()


def test_every_registered_backbone_builds():
    for name in list_backbones():
        assert isinstance(build_backbone(name, embedding_size=EMB, input_size=64), nn.Module)


@pytest.mark.parametrize("size", [48, 80, 100])
def test_tinyface_any_input_size(size):
    for pool in ("avg", "gdc"):
        model = build_backbone("tinyface", embedding_size=EMB, input_size=size, pool=pool)
        assert model(torch.randn(2, 3, size, size)).shape == (2, EMB)


def test_parameter_counts():
    assert count_parameters(build_backbone("tinyface")) < 1_000_000
    n_mfn = count_parameters(build_backbone("mobilefacenet", input_size=112))
    assert 800_000 <= n_mfn <= 1_300_000
    lin = nn.Linear(3, 2)
    assert count_parameters(lin) == 8
    lin.bias.requires_grad = False
    assert count_parameters(lin, trainable_only=True) == 6


def test_mobilefacenet_gdc_kernel_follows_input_size():
    assert build_backbone("mobilefacenet", input_size=112).gdc[0].kernel_size == (7, 7)
    assert build_backbone("mobilefacenet", input_size=64).gdc[0].kernel_size == (4, 4)


def test_dp_validation():
    assert ModuleValidator.validate(build_backbone("tinyface"), strict=True) == []
    errors = ModuleValidator.validate(build_backbone("mobilefacenet", input_size=64))
    assert errors and any("BatchNorm" in str(e) for e in errors)
    dp_mfn = build_backbone("mobilefacenet", input_size=64, norm="group", act="relu")
    assert ModuleValidator.validate(dp_mfn, strict=True) == []
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.PReLU)) for m in dp_mfn.modules())
    for name in list_heads():
        assert ModuleValidator.validate(build_head(name, EMB, 5), strict=True) == []


@pytest.mark.parametrize("name,s,m", [("cosface", 30.0, 0.35), ("arcface", 64.0, 0.5)])
def test_margin_heads(name, s, m):
    head = build_head(name, embedding_size=EMB, num_classes=7)
    assert head.weight.shape == (7, EMB)
    assert (head.s, head.m) == (s, m)
    x = torch.randn(5, EMB)
    labels = torch.tensor([0, 3, 6, 3, 1])
    plain = head(x)
    cos = nn.functional.normalize(x) @ nn.functional.normalize(head.weight).T
    torch.testing.assert_close(plain, s * cos)
    with_margin = head(x, labels)
    mask = nn.functional.one_hot(labels, 7).bool()
    torch.testing.assert_close(with_margin[~mask], plain[~mask])
    assert (with_margin[mask] < plain[mask]).all()  # margin lowers the target logit
    target = cos[mask]
    if name == "cosface":
        expected = s * (target - m)
    else:
        theta = torch.acos(target.clamp(-1, 1))
        expected = torch.where(
            target > math.cos(math.pi - m),
            s * torch.cos(theta + m),
            s * (target - math.sin(math.pi - m) * m),
        )
    torch.testing.assert_close(with_margin[mask], expected, atol=1e-4, rtol=1e-4)
    # label -1: no margin for that row
    ignored = head(x, torch.tensor([-1, 3, 6, 3, 1]))
    torch.testing.assert_close(ignored[0], plain[0])


def test_arcface_gradients_finite_at_cos_one():
    head = build_head("arcface", EMB, 3)
    x = head.weight.detach()[[0, 1]].clone().requires_grad_(True)  # cos == 1 at target
    loss = nn.functional.cross_entropy(head(x, torch.tensor([0, 1])), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_softmax_head_is_linear():
    head = build_head("softmax", embedding_size=EMB, num_classes=4)
    assert head.weight.shape == (4, EMB)
    x, y = torch.randn(3, EMB), torch.randn(3, EMB)
    torch.testing.assert_close(head(2 * x - y), 2 * head(x) - head(y))
    torch.testing.assert_close(head(x, torch.tensor([0, 1, 2])), x @ head.weight.T)


def test_unknown_names_raise_helpful_error():
    with pytest.raises(ValueError, match="nope") as exc:
        build_backbone("nope")
    assert "tinyface" in str(exc.value) and "mobilefacenet" in str(exc.value)
    with pytest.raises(ValueError, match="nohead") as exc:
        build_head("nohead", EMB, 3)
    assert "cosface" in str(exc.value) and "arcface" in str(exc.value)


def test_opacus_make_private_step():
    """Our backbone and margin head through Opacus: without noise, one DP step moves the
    weights by exactly -lr x the mean of the per-sample clipped gradients (computed here
    one sample at a time), so clipping and per-sample gradients, not noise, made it."""
    import copy

    from opacus import PrivacyEngine

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone("tinyface", embedding_size=EMB, input_size=48)
            self.head = build_head("cosface", EMB, 4)

        def forward(self, x, y):
            return self.head(self.backbone(x), y)

    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 48, 48), torch.arange(8) % 4)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    clip, lr = 0.05, 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=clip, poisson_sampling=False)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    x, y = next(iter(loader))
    expected = {n: torch.zeros_like(p) for n, p in before.items()}
    for i in range(len(x)):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x[i:i + 1], y[i:i + 1]), y[i:i + 1]).backward()
        grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
        assert norm > clip  # every sample is clipped: the test sees the clipping
        for n, g in grads.items():
            expected[n] += g * min(1.0, clip / (norm + 1e-6)) / len(x)
    loss = nn.functional.cross_entropy(model(x, y), y)
    with warnings.catch_warnings():  # "full backward hook ... no inputs require gradients"
        warnings.simplefilter("ignore", UserWarning)
        loss.backward()
    assert model._module.head.weight.grad_sample.shape == (len(x), 4, EMB)
    optimizer.step()
    for n, p in model._module.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - lr * expected[n], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["softmax", "cosface", "arcface"])
def test_head_per_sample_gradients_are_exact(name):
    from opacus import GradSampleModule

    head = build_head(name, 16, 5)
    x, y = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    expected = []
    for i in range(len(x)):
        head.weight.grad = None
        out = head(x[i : i + 1], y[i : i + 1])
        nn.functional.cross_entropy(out, y[i : i + 1], reduction="sum").backward()
        expected.append(head.weight.grad.clone())
    gsm = GradSampleModule(head, loss_reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nn.functional.cross_entropy(gsm(x, y), y, reduction="sum").backward()
    torch.testing.assert_close(head.weight.grad_sample, torch.stack(expected), atol=1e-3, rtol=1e-4)
