"""Book-keeping DP-SGD takes only the usages it has an exact rule for.

Every test compares against true per-sample clipping: each sample's own gradient from
autograd, clipped to ``C`` and summed. Usages book-keeping has no rule for must fall back
to Opacus (``mode == "hooks"``) when :func:`make_private` wraps the model, before any step.
"""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedface.models import build_head
from fedface.models.layers import GlobalDepthwiseConv
from fedface.privacy import make_private, plan_dp
from fedface.privacy.bookkeeping import BookKeeping, unsupported_layers

N, SIZE, CLASSES = 6, 6, 3


def _data(channels=3, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, channels, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (N,), generator=g))


def _named(backbone, head):
    return [(f"backbone.{k}", p) for k, p in backbone.named_parameters()] + [
        (f"head.{k}", p) for k, p in head.named_parameters()]


def _true_clipped(backbone, head, x, y):
    """Per-sample gradients by a loop: the clip (their median norm) and the clipped sum."""
    named = [(k, p) for k, p in _named(backbone, head) if p.requires_grad]
    grads, norms = [], []
    for i in range(len(x)):
        for _, p in named:
            p.grad = None
        F.cross_entropy(head(backbone(x[i:i + 1]), y[i:i + 1]), y[i:i + 1]).backward()
        grads.append({k: p.grad.clone() for k, p in named})
        norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads[-1].values()))))
    for _, p in named:
        p.grad = None
    clip = sorted(norms)[len(norms) // 2]  # some samples are clipped, some are not
    want = {k: sum(min(1.0, clip / (n + 1e-6)) * g[k] for g, n in zip(grads, norms))
            for k, _ in named}
    return clip, want


def _private_step(backbone, head, x, y, clip, example=None, lr=0.0):
    """One noise-free step through make_private: its mode and clipped gradient sums."""
    plan = plan_dp(64, epsilon=8.0, rounds=1, local_epochs=1, batch_size=8)
    plan = dataclasses.replace(plan, noise_multiplier=0.0, max_grad_norm=clip)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=lr)
    if example is None:
        example = x[:2].float()
    private = make_private(backbone, head, opt, plan, example=example)
    private.optimizer.zero_grad()
    F.cross_entropy(private.forward(x, y), y).backward()
    private.optimizer.step()
    scale = private.optimizer.expected_batch_size
    return private.mode, {k: p.grad * scale for k, p in _named(backbone, head)
                          if p.grad is not None}


def _check(backbone, head, mode, channels=3, size=SIZE):
    backbone, head = backbone.double(), head.double()
    x, y = _data(channels, size)
    clip, want = _true_clipped(backbone, head, x, y)
    got_mode, got = _private_step(backbone, head, x, y, clip)
    assert got_mode == mode
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)


def _head(features):
    torch.manual_seed(1)
    return build_head("softmax", features, CLASSES)


class _Convs(nn.Module):
    """conv -> GroupNorm -> ReLU -> [block] -> pool -> Linear: ``block`` is under test."""

    def __init__(self, block=None, first=None, width=4):
        super().__init__()
        torch.manual_seed(0)
        self.first = first or nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.block = block or nn.Identity()
        self.fc = nn.Linear(width, 5)

    def forward(self, x):
        x = self.block(F.relu(self.norm(self.first(x))))
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------ supported layer, other use
class _FlippedConv(nn.Conv2d):
    """A Conv2d subclass with its own forward: the layer sees a flipped input."""

    def forward(self, x):
        return super().forward(x.flip(-1))


class _PlainConv(nn.Conv2d):
    """A Conv2d subclass that computes exactly what Conv2d does."""


def test_a_subclass_with_its_own_forward_falls_back_to_opacus():
    _check(_Convs(first=_FlippedConv(3, 4, 3, padding=1)), _head(5), "hooks")
    assert unsupported_layers(_Convs(first=_FlippedConv(3, 4, 3))) == [
        "first (_FlippedConv: own forward)"]


def test_a_subclass_without_its_own_forward_keeps_book_keeping():
    _check(_Convs(first=_PlainConv(3, 4, 3, padding=1)), _head(5), "bk")


class _Twice(nn.Module):
    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1) if kind == "conv" else None
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = F.relu(self.first(x))
        if self.kind == "conv":
            x = self.conv(F.relu(self.conv(x)))
        x = x.mean((2, 3))
        return self.fc(torch.tanh(self.fc(x))) if self.kind == "linear" else self.fc(x)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_layer_called_twice_falls_back_to_opacus(kind):
    _check(_Twice(kind), _head(4), "hooks")
    x, _ = _data()
    assert "called more than once" in " ".join(unsupported_layers(_Twice(kind), x[:2].float()))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_are_clipped_exactly(mode):
    """Padded as Conv2d pads (Opacus' own rule would treat them as zero padding)."""
    _check(_Convs(first=nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=mode)), _head(5), "bk")


@pytest.mark.parametrize("padding,kernel,dilation,mode", [
    ("same", 3, 1, "zeros"), ("same", 4, 1, "zeros"), ("same", 2, 2, "zeros"),
    ("same", 4, 1, "reflect"), ("valid", 3, 1, "zeros"), ("valid", 2, 2, "circular")])
def test_string_padding_is_clipped_exactly(padding, kernel, dilation, mode):
    first = nn.Conv2d(3, 4, kernel, padding=padding, dilation=dilation, padding_mode=mode)
    _check(_Convs(first=first), _head(5), "bk")


class _Tokens(nn.Module):
    """Linear layers on (batch, tokens, features) and (batch, C, H, W) inputs."""

    def __init__(self, dim, width):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Conv2d(3, dim, 3, stride=2 if dim > 8 else 1, padding=1)
        self.tokens = nn.Linear(dim, width)  # on (n, H*W, dim)
        self.rows = nn.Linear(width, 3, bias=False)  # on (n, 1, H*W, width): 4-D
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        t = F.relu(self.first(x)).flatten(2).transpose(1, 2)
        t = torch.tanh(self.tokens(t))
        return self.fc(self.rows(t[:, None]).mean((1, 2)))


@pytest.mark.parametrize("dim,width", [(4, 8), (16, 16)])  # materialized, ghost norm
def test_linear_on_3d_and_4d_inputs_is_clipped_exactly(dim, width):
    _check(_Tokens(dim, width), _head(4), "bk")


class _NormedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 8)
        self.norm = nn.GroupNorm(2, 8)  # on (n, 8)

    def forward(self, x):
        return F.relu(self.norm(self.fc(F.relu(self.first(x)).mean((2, 3)))))


def test_group_norm_on_2d_input_is_clipped_exactly():
    _check(_NormedEmbedding(), _head(8), "bk")


# ------------------------------------------------------------------- frozen parameters
def test_frozen_parameters_count_in_no_norm_and_never_move():
    backbone, head = _Convs(block=nn.Conv2d(4, 4, 3, padding=1)).double(), _head(5).double()
    frozen = [backbone.first.weight, backbone.norm.bias, backbone.block.weight,
              backbone.block.bias, backbone.fc.bias]
    for p in frozen:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    x, y = _data()
    clip, want = _true_clipped(backbone, head, x, y)
    mode, got = _private_step(backbone, head, x, y, clip, lr=1.0)  # the optimizer holds all
    assert mode == "bk"
    assert got.keys() == want.keys()  # no gradient written into a frozen parameter
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=k)
    for p, b in zip(frozen, before):
        assert p.grad is None and not p.requires_grad and torch.equal(p, b)


def test_freezing_after_the_set_up_is_refused_at_the_next_step():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    keeper = BookKeeping(model, 1.0)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="set requires_grad before make_private"):
        keeper.prepare(torch.randn(2, 3))


# ---------------------------------------------------------------------- ghost-norm NaN
def test_a_sample_whose_gradient_cancels_gets_no_nan():
    """Three equal patches whose output gradients sum to zero: the ghost norm of that
    sample's (zero) gradient rounds below zero in float32."""
    conv = nn.Conv2d(16, 16, 1, bias=False)  # 3 positions, 16 x 16: the ghost-norm route
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 1, 3, generator=g)
    x[0, :, 0, 1:] = x[0, :, 0, :1]
    w = torch.randn(3, 16, 1, 3, generator=g)
    w[0, :, 0, 2] = -(w[0, :, 0, 0] + w[0, :, 0, 1])
    grads = []
    for i in range(3):
        conv.weight.grad = None
        (conv(x[i:i + 1]) * w[i:i + 1]).sum().backward()
        grads.append(conv.weight.grad.clone())
    norms = [float(gr.norm()) for gr in grads]
    assert norms[0] < 1e-5 < min(norms[1:])
    clip = min(norms[1:]) / 2
    keeper = BookKeeping(conv, clip)
    conv.weight.grad = None
    (conv(keeper.prepare(x)) * w).sum().backward()
    got = keeper.clipped_sum(scale=1.0)
    keeper.release()
    assert torch.isfinite(got).all() and torch.isfinite(conv.weight.grad).all()
    assert float(got[0]) < 1e-2
    want = sum(min(1.0, clip / (n + 1e-6)) * gr for gr, n in zip(grads, norms))
    torch.testing.assert_close(conv.weight.grad, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- what is refused, and why
def test_parameters_used_outside_their_layer_are_found_by_the_probe():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            e = self.fc(self.first(x).mean((2, 3)))
            return e + F.linear(e, self.fc.weight)  # the weight, once more, outside fc

    x, _ = _data()
    assert unsupported_layers(Tied()) == []  # nothing in the structure shows it
    assert unsupported_layers(Tied(), x[:2].float()) == [
        "fc.weight (book-keeping's gradient differs from autograd's on an example batch: "
        "is the parameter also used outside its layer?)"]


def test_structural_refusals_name_the_layer_and_the_reason():
    conv = nn.Conv2d(3, 4, 3)
    nn.utils.weight_norm(conv)
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = shared[0].weight
    assert unsupported_layers(conv) == ["Conv2d (Conv2d with parameters weight_g, weight_v)"]
    assert unsupported_layers(shared) == ["1 (Linear: shares a parameter with 0)"]
    assert unsupported_layers(nn.Conv2d(4, 8, 3, groups=2)) == ["Conv2d (grouped Conv2d)"]


class _Merged(nn.Module):
    """A Linear on (batch x tokens, features): the batch is no longer the first axis."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        t = self.first(x).flatten(2).transpose(1, 2).reshape(-1, 4)
        return self.fc(t).view(len(x), -1, 4).mean(1)


def test_inputs_without_the_batch_first_are_refused():
    x, _ = _data()
    (why,) = unsupported_layers(_Merged(), x[:2].float())
    assert "fc (Linear): it gets an input of shape (72, 4) in a batch of 2" in why


def test_without_an_example_input_make_private_falls_back_to_opacus():
    backbone, head = _Convs().double(), _head(5).double()
    x, y = _data()
    clip, _ = _true_clipped(backbone, head, x, y)
    plan = dataclasses.replace(plan_dp(64, epsilon=8.0, rounds=1, local_epochs=1, batch_size=8),
                               max_grad_norm=clip)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.0)
    assert make_private(backbone, head, opt, plan).mode == "hooks"  # nothing to probe with


def test_the_probe_leaves_the_model_and_the_random_state_as_it_found_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 2))
    model.eval()
    model[3].weight.grad = torch.ones_like(model[3].weight)
    x, _ = _data()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert unsupported_layers(model, x[:2].float()) == []
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(m.training for m in model.modules())
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert model[0].weight.grad is None and all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ the exactness grid
def _conv_cases():
    """Conv2d over Opacus' test ranges: kernel, stride, padding (and its mode), dilation,
    groups (dense, depthwise), bias."""
    cases = []
    for k, s, p, d, depthwise, bias, mode in itertools.product(
            (1, 2, 3), (1, 2), (0, 2, "same", "valid"), (1, 2), (False, True), (False, True),
            ("zeros", "reflect", "circular")):
        if p == "same" and s != 1:
            continue  # refused by Conv2d itself
        cases.append(dict(kernel_size=k, stride=s, padding=p, dilation=d, bias=bias,
                          groups=3 if depthwise else 1, padding_mode=mode))
    return cases[::11]  # a spread of the combinations, to keep the grid fast


def _single(layer, shape):
    """BookKeeping against a per-sample loop, one layer, random output gradients."""
    layer = layer.double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(layer(x).shape, generator=g, dtype=torch.float64)
    assert unsupported_layers(layer, x[:2]) == []
    params = [p for p in layer.parameters() if p.requires_grad]
    grads, norms = [], []
    for i in range(len(x)):
        layer.zero_grad(set_to_none=True)
        (layer(x[i:i + 1]) * w[i:i + 1]).sum().backward()
        grads.append([p.grad.clone() for p in params])
        norms.append(float(torch.sqrt(sum((t ** 2).sum() for t in grads[-1]))))
    clip = sorted(norms)[len(norms) // 2]
    keeper = BookKeeping(layer, clip)
    layer.zero_grad(set_to_none=True)
    (layer(keeper.prepare(x)) * w).sum().backward()
    got = keeper.clipped_sum(scale=1.0)
    keeper.release()
    torch.testing.assert_close(got, torch.tensor(norms, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    for j, p in enumerate(params):
        want = sum(min(1.0, clip / (n + 1e-6)) * gr[j] for gr, n in zip(grads, norms))
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", _conv_cases(), ids=lambda kw: "-".join(map(str, kw.values())))
def test_conv2d_grid(kw):
    torch.manual_seed(0)
    out = 3 if kw["groups"] == 3 else 4
    _single(nn.Conv2d(3, out, **kw), (5, 3, 7, 6))


@pytest.mark.parametrize("cin,cout,size,stride", [(8, 16, 4, 2), (16, 16, 3, 1)])
def test_conv2d_grid_ghost_norm(cin, cout, size, stride):
    torch.manual_seed(0)
    _single(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), (5, cin, size, size))


@pytest.mark.parametrize("shape", [(5, 6), (5, 4, 6), (5, 2, 3, 6), (5, 30, 6)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_grid(shape, bias):
    torch.manual_seed(0)
    _single(nn.Linear(6, 7, bias=bias), shape)


@pytest.mark.parametrize("groups,shape", [(1, (5, 4)), (2, (5, 4)), (4, (5, 4, 3)),
                                          (2, (5, 4, 3, 2)), (1, (5, 4, 2, 2, 2))])
def test_group_norm_grid(groups, shape):
    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, 4)
    with torch.no_grad():  # not the initial ones and zeros
        norm.weight.normal_()
        norm.bias.normal_()
    _single(norm, shape)


def test_global_depthwise_conv_grid():
    torch.manual_seed(0)
    _single(GlobalDepthwiseConv(4, 3), (5, 4, 3, 3))
