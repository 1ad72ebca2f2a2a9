"""DP-SGD for a client's backbone and head through Opacus' ``PrivacyEngine``.

:func:`make_private` is the one entry point: it checks the model, wraps backbone and
head (both are trained privately: the backbone update carries information about every
sample, and the head is fitted to the same samples), the optimizer (per-sample
clipping, Gaussian noise) and the sampler (Poisson sampling at ``plan.sample_rate``).
The result plugs into :func:`fedface.training.train_epochs` through its ``optimizer``
and ``batches`` arguments, so private and non-private training share one loop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedface.config import GRAD_SAMPLE_MODES
from fedface.privacy.bookkeeping import BookKeeping, BookKeepingOptimizer, unsupported_layers
from fedface.privacy.budget import DPPlan, PrivacyConfigError

# Opacus' hooks fire on the first layer although the input needs no gradient: expected.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


class _Joint(nn.Module):
    """Backbone and head as one module, so Opacus sees every trainable layer."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.backbone(x), labels)


def check_dp_compatible(module: nn.Module, name: str = "model") -> None:
    """Refuse a module Opacus cannot train privately, naming the layers and the fix."""
    from opacus.validators import ModuleValidator  # (opacus loads in ~1 s: when used)

    bad = []
    for layer_name, layer in module.named_modules():
        validate = ModuleValidator.VALIDATORS.get(type(layer))
        if validate is not None and validate(layer):
            bad.append(f"{layer_name} ({type(layer).__name__})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PrivacyConfigError(
            f"{name} cannot be trained with DP-SGD: Opacus does not support its layers "
            f"{', '.join(bad[:5])}{more}. BatchNorm mixes the samples of a batch, so "
            "per-sample gradients do not exist: use --backbone tinyface or "
            "mobilefacenet-dp (GroupNorm), or convert your own model with "
            "opacus.validators.ModuleValidator.fix(model)")


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns: pass ``optimizer``, ``batches`` and ``forward``
    to :func:`fedface.training.train_epochs`.

    Every path (book-keeping and Opacus) samples with :meth:`batches`, and counts what it
    ran: :meth:`accounted` gives the ``(noise multiplier, sample rate, steps)`` of the
    steps actually taken, which is what the ledger records.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    plan: DPPlan
    mode: str = "hooks"
    keeper: BookKeeping | None = None
    sampler: torch.Generator | None = None
    people: list[torch.Tensor] | None = None
    steps_taken: int = 0

    @property
    def sample_rate(self) -> float:
        """The Poisson rate :meth:`batches` draws every unit with."""
        return self.plan.sample_rate

    @property
    def steps_per_epoch(self) -> int:
        """Steps :meth:`batches` yields per epoch (the plan's ``int(1/q)``)."""
        return int(1.0 / self.sample_rate)

    @property
    def noise_multiplier(self) -> float:
        """Noise std over the unit clipping norm, as the optimizer applies it."""
        opt = self.optimizer
        std = float(opt.noise_multiplier) * float(opt.max_grad_norm
                                                  if not isinstance(opt, BookKeepingOptimizer)
                                                  else self.keeper.max_grad_norm)
        return std / self.plan.max_grad_norm

    def accounted(self) -> list:
        """``[noise_multiplier, sample_rate, steps]`` of what ran (for the ledger)."""
        return [self.noise_multiplier, self.sample_rate, int(self.steps_taken)]

    def batches(self, _generator: torch.Generator | None = None):
        """One epoch of Poisson-sampled index batches (sizes vary around the plan's).

        Every unit is drawn independently with probability ``sample_rate``, from this
        object's own generator (seeded from the institution's secret), ``steps_per_epoch``
        times. ``unit="person"``: each person drawn contributes at most
        ``images_per_unit`` of their images, drawn at random, to the step."""
        n, q = self.plan.num_examples, self.sample_rate
        for _ in range(self.steps_per_epoch):
            drawn = torch.nonzero(torch.rand(n, generator=self.sampler) < q).flatten()
            self.steps_taken += 1  # an empty draw is still a (noise-only) step
            if self.people is None:
                yield drawn
                continue
            k = self.plan.images_per_unit
            picks = [self.people[p][torch.randperm(len(self.people[p]),
                                                   generator=self.sampler)[:k]]
                     for p in drawn.tolist()]
            yield torch.cat(picks) if picks else drawn

    def empty_step(self) -> None:
        """A step whose Poisson draw was empty: noise alone, as the accountant assumes
        every step adds it (skipping it would release a noiseless "nobody drawn")."""
        opt = self.optimizer
        if isinstance(opt, BookKeepingOptimizer):
            opt.noise_only_step()
            return
        std = opt.noise_multiplier * opt.max_grad_norm
        for p in opt.params:
            p.grad = torch.normal(0.0, std, size=p.shape, generator=opt.generator) / float(
                opt.expected_batch_size)
        opt.original_optimizer.step()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits through the wrapped module (per-sample norms or gradients are recorded)."""
        if self.keeper is not None:
            x = self.keeper.prepare(x)
            self.optimizer.batch_size = len(x)
        return self.module(x, labels)


def person_groups(people, plan: DPPlan) -> tuple[list[torch.Tensor], float]:
    """Image indices of every person slot (labels ``0..P-1``, ``P = plan.num_examples``)
    and the normaliser ``q x P x k``.

    The P slots (the head's rows) are public, like N in record-level DP-SGD: removing a
    person empties their slot and leaves the model's shape, the sampling rate and the
    normaliser as they were, so a step differs only by that person's own images, whose
    clipped gradients sum to at most the clip. (A normaliser counting the images drawn
    on average, ``q x sum_p min(k, n_p)``, would depend on the private image counts.)
    """
    labels = torch.as_tensor(np.asarray(people), dtype=torch.long)
    slots = plan.num_examples
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= slots):
        raise PrivacyConfigError(
            f"dp-unit=person: the plan is for {slots} people but the training labels run "
            f"from {int(labels.min())} to {int(labels.max())}; plan with the client's number "
            "of identities (labels 0..P-1)")
    groups = [torch.nonzero(labels == p).flatten() for p in range(slots)]
    return groups, plan.sample_rate * slots * plan.images_per_unit


def make_private(backbone: nn.Module, head: nn.Module, optimizer: torch.optim.Optimizer,
                 plan: DPPlan, *, seed: int = 0, noise_seed: int | None = None,
                 grad_sample_mode: str = "bk", people=None,
                 example: torch.Tensor | None = None) -> PrivateTraining:
    """Wrap a client's backbone, head and optimizer for DP-SGD under ``plan``.

    Parameters
    ----------
    backbone, head : nn.Module
        Trained in place; both must pass Opacus' ``ModuleValidator``.
    optimizer : torch.optim.Optimizer
        Over the parameters of both (e.g. SGD with momentum).
    plan : DPPlan
        Noise multiplier, clipping norm and sampling rate (see :func:`plan_dp`).
    seed, noise_seed : int
        Seed Poisson sampling and the Gaussian noise (``noise_seed`` defaults to
        ``seed + 1``). A client derives both from its private secret
        (:mod:`crypto.seeds`): anyone who knows them can recompute the noise and
        subtract it, so they must never come from public values such as the run config.
    grad_sample_mode : str
        ``"bk"`` (default): book-keeping clipping in one backward pass
        (:mod:`fedface.privacy.bookkeeping`), falling back to ``"hooks"`` for models with
        layers it has no rule for (cosface/arcface heads); ``"hooks"``, ``"ew"`` or
        ``"functorch"``: Opacus' per-sample gradients.
    people : array, optional
        Training labels (person ``0..P-1`` of each image): needed when
        ``plan.unit == "person"``. Each image is then clipped to ``plan.image_clip``,
        so a person's images in a step sum to at most ``plan.max_grad_norm``, and the
        noise is ``plan.noise_multiplier x plan.max_grad_norm``, as for one image at the
        image level.
    example : torch.Tensor, optional
        A small input batch for book-keeping's probe (default: two random chips of the
        backbone's ``input_size``): a layer used in a way book-keeping has no exact rule
        for (called twice, shared parameters, ...) sends the model to Opacus' hooks
        before any step (:func:`fedface.privacy.bookkeeping.unsupported_layers`).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise PrivacyConfigError(f"dp-grad-sample-mode={grad_sample_mode!r}: use one of "
                                 f"{GRAD_SAMPLE_MODES}")
    check_dp_compatible(backbone, "backbone")
    check_dp_compatible(head, "head")
    joint = _Joint(backbone, head)
    groups, expected = None, plan.sample_rate * plan.num_examples
    if plan.unit == "person":
        if people is None:
            raise PrivacyConfigError("dp-unit=person needs the training labels (people=...) "
                                     "to sample people")
        groups, expected = person_groups(people, plan)
    sampler = torch.Generator().manual_seed(int(seed))
    noise_seed = int(seed) + 1 if noise_seed is None else int(noise_seed)
    if grad_sample_mode == "bk":
        # Book-keeping needs an example batch to check how the layers are used (layers
        # called twice, inputs of other shapes): two chips, unless given; none: hooks.
        size = getattr(backbone, "input_size", None)
        if example is None and isinstance(size, int):
            example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        if example is not None and not unsupported_layers(joint, example):
            keeper = BookKeeping(joint, plan.image_clip)
            opt = BookKeepingOptimizer(
                optimizer, keeper, plan.image_noise_multiplier, expected_batch_size=expected,
                generator=torch.Generator().manual_seed(noise_seed))
            return PrivateTraining(module=joint, optimizer=opt, plan=plan,
                                   mode="bk", keeper=keeper, sampler=sampler, people=groups)
        grad_sample_mode = "hooks"
    # Opacus' per-sample gradients with our sampler, as on the book-keeping path: the
    # steps and the rate that run are the plan's (Opacus' own Poisson loader would run
    # ceil(N/B) steps at rate 1/ceil(N/B), which the plan does not account). Its loader
    # is only needed by make_private's signature and never iterated; the optimizer
    # normalises by the expected units per step.
    index = torch.utils.data.TensorDataset(torch.arange(plan.num_examples))
    loader = torch.utils.data.DataLoader(index, batch_size=plan.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG and optimizer-state notices
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant=plan.accountant)
        module, dp_opt, _ = engine.make_private(
            module=joint, optimizer=optimizer, data_loader=loader,
            noise_multiplier=plan.image_noise_multiplier, max_grad_norm=plan.image_clip,
            poisson_sampling=False, grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator().manual_seed(noise_seed))
    dp_opt.expected_batch_size = expected
    return PrivateTraining(module=module, optimizer=dp_opt, plan=plan, mode=grad_sample_mode,
                           sampler=sampler, people=groups)
