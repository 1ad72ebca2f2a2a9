"""Book-keeping DP-SGD: per-sample clipping in one backward pass, no per-sample gradients
of the wide layers.

Opacus' ``hooks`` mode materializes every parameter's gradient for every sample
(batch x parameters floats) and then clips; on TinyFace at 64px that made a DP step 2.5x
a plain one. Book-keeping (Bu et al., "Differentially private optimization on large
model at small cost", ICML 2023) keeps, per layer, the input activation ``a`` and the
output gradient ``b`` of the one backward pass, and from them:

1. **per-sample gradient norms.** For a convolution with ``L`` output positions the
   per-sample gradient is ``G_i = B_i A_i^T`` (``A_i`` the unfolded input). Its squared
   norm is either ``sum((A_i^T A_i) * (B_i^T B_i))``, the "ghost norm": ``L x L``
   matrices, cheap at low resolution; or, when the gradient is smaller than those,
   ``||G_i||^2`` of the materialized ``G_i``. For Linear it is ``||a_i||^2 ||b_i||^2``;
   GroupNorm, depthwise convolutions and the global depthwise convolution have small
   per-sample gradients that are formed directly;
2. **clip factors** ``c_i = min(1, C / ||g_i||)`` over all layers together;
3. **the clipped sum** ``sum_i c_i G_i``: the ordinary weight gradient of the
   reweighted output gradient ``c_i b_i``, computed by the native convolution
   weight-gradient kernel.

Autograd then never computes the weight gradients itself: parameters do not require
gradients during the step, and the input does, so that output gradients reach every
layer. The clipped sum is exactly Opacus' (tested against it); noise and the
expected-batch normalisation follow (:class:`BookKeepingOptimizer`).

The rules hold for these layers used as written: once per forward pass, on inputs with
the batch first, through their own ``forward`` (a subclass overriding it is not one of
them), each parameter in one layer. :func:`unsupported_layers` checks the structure and,
given an example batch, the usage (:func:`fedface.privacy.make_private` then falls back to
Opacus before any step); the forward hooks refuse a usage that changes later. Padding
modes other than zeros and ``'same'``/``'valid'`` padding are applied to the recorded
input as ``Conv2d`` does; Linear takes ``(batch, ..., features)`` inputs, GroupNorm
``(batch, C, ...)``. Frozen parameters count in no norm and get no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedface.models.layers import GlobalDepthwiseConv

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm, GlobalDepthwiseConv)

# The methods through which a supported layer computes its output: a subclass overriding
# one of them computes something the rules do not describe.
_COMPUTE = {nn.Conv2d: ("forward", "_conv_forward"), nn.Linear: ("forward",),
            nn.GroupNorm: ("forward",), GlobalDepthwiseConv: ("forward",)}


def _rule(m: nn.Module) -> type | None:
    """The supported class whose rule gives ``m``'s gradients, or None."""
    for base, methods in _COMPUTE.items():
        if isinstance(m, base) and all(getattr(type(m), k) is getattr(base, k) for k in methods):
            return base
    return None


def _trainable(m: nn.Module) -> dict[str, nn.Parameter]:
    return {k: p for k, p in m._parameters.items() if p is not None and p.requires_grad}


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _conv_input(a: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input and the zero padding that the weight gradient is taken of.

    Zero padding given as numbers (every fedface backbone) is passed on as it is; other
    padding modes and ``'same'``/``'valid'`` are applied to the input as ``Conv2d`` does,
    which then convolves without padding.
    """
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return a, conv.padding
    if conv.padding == "valid":
        pad = [0, 0, 0, 0]
    elif conv.padding == "same":  # Conv2d's split: the odd pixel goes right/bottom
        pad = []
        for d, k in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = d * (k - 1)
            pad += [total // 2, total - total // 2]
    else:
        (ph, pw) = conv.padding
        pad = [pw, pw, ph, ph]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(a, pad, mode=mode), (0, 0)


def _patches(a: torch.Tensor, conv: nn.Conv2d, padding: tuple[int, int]) -> torch.Tensor:
    """``F.unfold`` of a convolution's input, ``(n, C*kh*kw, L)``.

    Zero padding without dilation (every fedface backbone) is copied out of a strided
    view, two to four times faster on CPU than ``F.unfold``'s im2col.
    """
    if conv.dilation != (1, 1):
        return F.unfold(a, conv.kernel_size, conv.dilation, padding, conv.stride)
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, padding
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    view = a.unfold(2, kh, sh).unfold(3, kw, sw)  # (n, C, H', W', kh, kw)
    n, c, h, w = view.shape[:4]
    return view.permute(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, h * w)


def unsupported_layers(module: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Layers with trainable parameters that book-keeping has no exact rule for.

    Without ``example``, what the module's structure shows: layer types other than
    :data:`SUPPORTED` (a subclass counts as its base only if it computes its output the
    same way), grouped (not depthwise) convolutions, parameters other than ``weight``
    and ``bias`` (e.g. ``weight_norm``'s), parameters shared between layers. With an
    ``example`` input batch (at least two samples), also how the layers are used: it is
    run through the module once with autograd and once with book-keeping, which then
    refuses a layer called twice in a forward pass, on an input without the batch in
    its first dimension (or not 4-D for a convolution), or reached by no gradient, and
    the unclipped sums must equal autograd's gradients (a parameter also used outside
    its layer). Each entry names the layer (or parameter) and why.
    """
    out, owner = [], {}
    for name, m in module.named_modules():
        own, label = _trainable(m), name or type(m).__name__
        for p in own.values():
            if id(p) in owner:
                out.append(f"{label} ({type(m).__name__}: shares a parameter with "
                           f"{owner[id(p)] or 'the model'})")
            owner.setdefault(id(p), name)
        if not own:
            continue
        rule = _rule(m)
        if rule is None:
            extra = ": own forward" if isinstance(m, SUPPORTED) else ""
            out.append(f"{label} ({type(m).__name__}{extra})")
        elif set(own) - {"weight", "bias"}:
            out.append(f"{label} ({type(m).__name__} with parameters "
                       f"{', '.join(sorted(set(own) - {'weight', 'bias'}))})")
        elif rule is nn.Conv2d and m.groups != 1 and not _depthwise(m):
            out.append(f"{label} (grouped Conv2d)")
    if out or example is None:
        return out
    return _probe(module, example)


def _probe(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Book-keeping's unclipped gradient sum on ``example`` against autograd's gradient.

    Leaves the module as it found it: gradients, buffers, train/eval flags and the
    random number generators (dropout draws the same masks in both passes).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return []
    x = example.detach().to(params[0].device)
    if x.is_floating_point():
        x = x.to(params[0].dtype)
    saved = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    modes = [(m, m.training) for m in module.modules()]
    cuda = [x.device.index if x.device.index is not None else torch.cuda.current_device()
            ] if x.is_cuda else []
    keeper, failure = None, None
    try:
        with torch.random.fork_rng(devices=cuda):
            states = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]
            module.train()
            for p in params:
                p.grad = None
            out = module(x)
            weights = torch.randn(out.shape, dtype=out.dtype, device=out.device,
                                  generator=torch.Generator(out.device).manual_seed(0))
            (out * weights).sum().backward()
            want = [p.grad for p in params]
            for p in params:
                p.grad = None
            torch.set_rng_state(states[0])
            for d, state in zip(cuda, states[1]):
                torch.cuda.set_rng_state(state, d)
            keeper = BookKeeping(module, float("inf"))
            try:
                (module(keeper.prepare(x)) * weights).sum().backward()
                keeper.clipped_sum(scale=1.0)
            except Exception as err:  # noqa: BLE001 - any failure means: not book-keeping
                failure = f"{type(module).__name__} (book-keeping fails on an example batch: {err})"
            got = [p.grad for p in params]
    finally:
        if keeper is not None:
            keeper.remove()
        for p, g in zip(params, saved):
            p.grad = g
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        for m, training in modes:
            m.training = training
    if failure:
        return [failure]
    names = {id(p): name for name, p in module.named_parameters()}
    want = [torch.zeros_like(p) if w is None else w for p, w in zip(params, want)]
    got = [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]
    total = float(torch.sqrt(sum(w.double().pow(2).sum() for w in want)))
    return [f"{names[id(p)]} (book-keeping's gradient differs from autograd's on an example "
            "batch: is the parameter also used outside its layer?)"
            for p, w, g in zip(params, want, got)
            if float((g - w).double().norm()) > 1e-3 * float(w.double().norm()) + 1e-6 * total]


class BookKeeping:
    """Hooks that record ``(a, b)`` per layer and turn them into clipped gradient sums.

    Parameters
    ----------
    module : nn.Module
        The model (backbone and head); every trainable parameter must sit in a supported
        layer (:func:`unsupported_layers`). Frozen parameters (``requires_grad=False``)
        count in no norm and get no gradient.
    max_grad_norm : float
        Per-sample clipping norm C (over all parameters together).
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        bad = unsupported_layers(module)
        if bad:
            raise ValueError(f"book-keeping DP-SGD has no rule for {', '.join(bad[:5])}: use "
                             "dp-grad-sample-mode=hooks (Opacus) for this model")
        self.module = module
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [m for m in module.modules() if _rule(m) is not None and _trainable(m)]
        self.rules = {m: _rule(m) for m in self.layers}
        # (weight, bias) trainable: a frozen one counts in no norm and gets no gradient.
        self.trains = {m: ("weight" in _trainable(m), "bias" in _trainable(m)) for m in self.layers}
        self.names = {m: name for name, m in module.named_modules()}
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.records: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_norms: torch.Tensor | None = None
        self._batch: int | None = None  # between prepare() and release(): the batch size
        self._called: set[nn.Module] = set()
        self._handles = [m.register_forward_hook(self._forward) for m in self.layers]

    def _forward(self, layer: nn.Module, inputs, output: torch.Tensor) -> None:
        if self._batch is None:  # not a book-keeping step (e.g. evaluation)
            return
        a = inputs[0].detach()
        problem = self._misuse(layer, a)
        if problem:
            name = self.names.get(layer) or type(layer).__name__
            raise RuntimeError(f"book-keeping DP-SGD cannot clip {name} ({type(layer).__name__}):"
                               f" it {problem}; use dp-grad-sample-mode=hooks (Opacus)")
        self._called.add(layer)
        if output.requires_grad:
            output.register_hook(lambda b, layer=layer, a=a: self._record(layer, a, b))

    def _misuse(self, layer: nn.Module, a: torch.Tensor) -> str | None:
        """Why ``layer`` applied to ``a`` now is outside its rule, or None."""
        if layer in self._called:
            return "is called more than once in a forward pass"
        spatial = self.rules[layer] in (nn.Conv2d, GlobalDepthwiseConv)
        if (a.dim() != 4 if spatial else a.dim() < 2) or a.shape[0] != self._batch:
            return (f"gets an input of shape {tuple(a.shape)} in a batch of {self._batch} "
                    f"(the rule needs {'(batch, C, H, W)' if spatial else '(batch, ..., features)'})")
        return None

    def _record(self, layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        self.records[layer] = (a, b.detach())

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Before a forward pass: weights stop requiring gradients, the input starts."""
        now = [p for p in self.module.parameters() if p.requires_grad]
        if self._batch is None and {id(p) for p in now} != {id(p) for p in self.params}:
            raise RuntimeError("parameters were frozen or unfrozen after book-keeping was set "
                               "up: set requires_grad before make_private")
        self.records.clear()
        self._called.clear()
        self._batch = len(x)
        for p in self.params:
            p.requires_grad_(False)
        return x.detach().requires_grad_(True)

    def release(self) -> None:
        self._batch = None
        for p in self.params:
            p.requires_grad_(True)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.release()

    # ------------------------------------------------------------------ the rules
    def _per_sample(self, layer: nn.Module, a: torch.Tensor, b: torch.Tensor):
        """(squared norms, what the clipped sum needs) for one layer's trainable parameters."""
        rule, (dw, db) = self.rules[layer], self.trains[layer]
        n = b.shape[0]
        sq = b.new_zeros(n)
        if rule is nn.Conv2d:
            cout = b.shape[1]
            positions = b.shape[2] * b.shape[3]
            grads = b.reshape(n, cout, positions)
            state = None
            if dw:
                a, padding = _conv_input(a, layer)
                cols = _patches(a, layer, padding)
                din = cols.shape[1]
                if _depthwise(layer):  # one k x k filter per channel: (n, C, k*k) per sample
                    per = torch.einsum("ncl,nckl->nck", grads, cols.view(n, cout, -1, positions))
                    sq, state = per.pow(2).sum((1, 2)), (per, None, None)
                elif positions * (din + cout) < cout * din:  # ghost norm
                    sq = (torch.bmm(cols.transpose(1, 2), cols)
                          * torch.bmm(grads.transpose(1, 2), grads)).sum((1, 2))
                    state = (None, a, padding)
                else:
                    per = torch.bmm(grads, cols.transpose(1, 2))  # (n, cout, din)
                    sq, state = per.pow(2).sum((1, 2)), (per, None, None)
            if db:
                sq = sq + grads.sum(2).pow(2).sum(1)
            return sq, state
        if rule is nn.Linear:
            if a.dim() == 2:
                if dw:
                    sq = a.pow(2).sum(1) * b.pow(2).sum(1)
                if db:
                    sq = sq + b.pow(2).sum(1)
                return sq, None
            # (batch, ..., features): per sample G_i = B_i^T A_i over the T positions.
            acts, grads = a.reshape(n, -1, a.shape[-1]), b.reshape(n, -1, b.shape[-1])
            t, din, dout = acts.shape[1], acts.shape[2], grads.shape[2]
            state = None
            if dw:
                if t * (din + dout) < din * dout:  # ghost norm
                    sq = (torch.bmm(acts, acts.transpose(1, 2))
                          * torch.bmm(grads, grads.transpose(1, 2))).sum((1, 2))
                else:
                    state = torch.bmm(grads.transpose(1, 2), acts)  # (n, dout, din)
                    sq = state.pow(2).sum((1, 2))
            if db:
                sq = sq + grads.sum(1).pow(2).sum(1)
            return sq, state
        if rule is nn.GroupNorm:
            dims = tuple(range(2, b.dim()))  # none for (batch, C): then no sum
            gw = gb = None
            if dw:
                normed = F.group_norm(a, layer.num_groups, eps=layer.eps)
                gw = (normed * b).sum(dims) if dims else normed * b
                sq = gw.pow(2).sum(1)
            if db:
                gb = b.sum(dims) if dims else b
                sq = sq + gb.pow(2).sum(1)
            return sq, (gw, gb)
        per = a * b[:, :, None, None]  # GlobalDepthwiseConv: (n, C, k, k)
        return per.pow(2).sum((1, 2, 3)), per

    def clipped_sum(self, scale: float) -> torch.Tensor:
        """Write ``sum_i c_i g_i`` into every trainable parameter's ``.grad``; returns the
        norms.

        ``scale`` turns the recorded output gradients into per-sample ones (the batch
        size, when the loss was a mean).
        """
        if not self.layers:  # nothing to train
            self.last_norms = torch.zeros(self._batch or 0)
            return self.last_norms
        missing = [m for m in self.layers if m not in self.records]
        if missing:
            names = ", ".join(self.names.get(m) or type(m).__name__ for m in missing[:3])
            raise RuntimeError(f"no gradient reached {len(missing)} layers ({names}): call "
                               "prepare() on the input; layers outside the loss's graph need "
                               "dp-grad-sample-mode=hooks")
        # Norms are linear in the gradient: compute them on the recorded (mean-loss)
        # gradients and scale once, instead of rescaling every layer's tensors.
        states, sq = {}, 0.0
        for layer in self.layers:
            a, b = self.records[layer]
            s, states[layer] = self._per_sample(layer, a, b)
            sq = sq + s
        # The ghost norm of a gradient that cancels to zero can round below zero.
        norms = torch.sqrt(sq.clamp(min=0.0)) * scale
        c = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * scale
        for layer in self.layers:
            a, b = self.records[layer]
            rule, state, (dw, db) = self.rules[layer], states[layer], self.trains[layer]
            if rule is nn.Conv2d:
                if dw:
                    per, a_pad, padding = state
                    if per is None:
                        layer.weight.grad = torch.nn.grad.conv2d_weight(
                            a_pad, layer.weight.shape, b * c.view(-1, 1, 1, 1), layer.stride,
                            padding, layer.dilation, layer.groups)
                    else:
                        layer.weight.grad = (c @ per.flatten(1)).view_as(layer.weight)
                if db:
                    layer.bias.grad = c @ b.sum((2, 3))
            elif rule is nn.Linear:
                if a.dim() == 2:
                    if dw:
                        layer.weight.grad = (b * c[:, None]).t() @ a
                    if db:
                        layer.bias.grad = c @ b
                    continue
                acts, grads = a.reshape(len(a), -1, a.shape[-1]), b.reshape(len(b), -1, b.shape[-1])
                if dw and state is None:
                    layer.weight.grad = ((grads * c[:, None, None]).flatten(0, 1).t()
                                         @ acts.flatten(0, 1))
                elif dw:
                    layer.weight.grad = (c @ state.flatten(1)).view_as(layer.weight)
                if db:
                    layer.bias.grad = c @ grads.sum(1)
            elif rule is nn.GroupNorm:
                gw, gb = state
                if dw:
                    layer.weight.grad = c @ gw
                if db:
                    layer.bias.grad = c @ gb
            else:
                layer.weight.grad = (c @ state.flatten(1)).view_as(layer.weight)
        self.records.clear()
        self.last_norms = norms.detach()
        return self.last_norms


class BookKeepingOptimizer:
    """DP-SGD's step around an ordinary optimizer: clipped sum, Gaussian noise of std
    ``noise_multiplier x C``, division by the expected batch size, then the step.

    Exposes ``param_groups``, ``zero_grad``, ``step`` and ``original_optimizer`` like
    Opacus' ``DPOptimizer``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, keeper: BookKeeping,
                 noise_multiplier: float, expected_batch_size: float,
                 generator: torch.Generator) -> None:
        self.original_optimizer = optimizer
        self.keeper = keeper
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.generator = generator
        self.batch_size = 0

    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        try:
            self.keeper.clipped_sum(scale=float(self.batch_size))
            std = self.noise_multiplier * self.keeper.max_grad_norm
            for p in self.keeper.params:
                noise = torch.normal(0.0, std, size=p.shape, generator=self.generator)
                p.grad = (p.grad + noise) / self.expected_batch_size
        finally:
            self.keeper.release()
        self.original_optimizer.step()

    def noise_only_step(self) -> None:
        """The step of an empty batch: Gaussian noise over the expected batch size."""
        std = self.noise_multiplier * self.keeper.max_grad_norm
        for p in self.keeper.params:
            p.grad = torch.normal(0.0, std, size=p.shape, generator=self.generator) / (
                self.expected_batch_size)
        self.keeper.release()
        self.original_optimizer.step()
