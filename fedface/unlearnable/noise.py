"""Error-minimizing noise (Huang et al., "Unlearnable Examples", ICLR 2021): min-min.

A surrogate model and a bounded noise are optimised *together* to make the training loss
small: the model takes ``model_steps`` SGD steps on the noisy images, then the noise takes
``noise_steps`` signed-gradient steps of ``step_size`` that *lower* the same loss, each
projected onto the L-infinity ball of radius ``eps`` and onto valid pixels. The noise becomes
a shortcut, easier to learn than the faces, so a model trained on the protected images learns
the shortcut and not the people.

* ``mode="sample"``: one noise per image. Stop when the surrogate classifies more than 99 % of
  the protected training images correctly (the reference's condition).
* ``mode="class"``: one noise per identity, shared by all of that person's images. Stop when
  the training error falls below 0.1.

Either way the run stops after ``max_iterations`` outer iterations; the report says whether
the condition was reached. The accuracy that decides it is measured on the images as they
will be published: chips plus noise, rounded to 8-bit pixels.

Everything works on aligned chips (``(N, S, S, 3)`` uint8, the chips
:mod:`fedface.data.align` makes); :mod:`fedface.unlearnable.files` carries the noise back into
the full images. The surrogate is any registered backbone (:mod:`fedface.models`) with a
softmax head, trained by the one training loop, :func:`fedface.training.train_epochs`.

Threat model
------------
The adversary obtains the published images (a scraper, a data broker, a partner the data was
handed to) and trains a face recognizer on them, with any architecture and training recipe it
likes. The noise is made against our surrogate only; how far it transfers to other
architectures, and which recipes break it (grayscale, JPEG, augmentation, adversarial
training, mixing in clean images of the same people), is measured by
``fedface bench unlearnable``, never assumed.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.eval.embed import to_tensor
from fedface.models import build_backbone, build_head, list_backbones
from fedface.progress import ProgressFn
from fedface.training import augment, make_optimizer, train_epochs

__all__ = ["MODES", "MinMin", "NoiseConfig", "StopReport", "budget_levels", "check_inputs",
           "parse_eps", "quantize"]

MODES = ("sample", "class")
#: Largest budget accepted: beyond 32/255 the noise is plainly visible, the images are no
#: longer "visually intact".
MAX_EPS = 32 / 255
#: Stop conditions of the reference implementation.
SAMPLE_STOP_ACCURACY = 0.99
CLASS_STOP_ERROR = 0.1


def parse_eps(text: str | float) -> float:
    """An L-infinity budget as a fraction of the pixel range: ``"8/255"``, ``"0.031"`` or a
    number. Refused with the reason when unparsable or outside ``[1/255, 32/255]``."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).replace(" ", "")
        try:
            value = float(Fraction(raw)) if "/" in raw else float(raw)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"--eps {text!r} is not a number: write it as a fraction of the "
                             "pixel range, e.g. 8/255 or 0.031") from None
    if not math.isfinite(value) or not 0 < value <= MAX_EPS + 1e-12:
        raise ValueError(
            f"--eps {text!r} = {value:.4g} is out of range: the budget must lie in "
            f"[1/255, 32/255] (= {MAX_EPS:.4f}); 8/255 is the reference, larger budgets make "
            "the noise visible")
    if budget_levels(value) < 1:
        raise ValueError(
            f"--eps {text!r} = {value * 255:.2f} grey levels is out of range: an 8-bit image "
            "cannot carry less than one grey level of noise; use at least 1/255")
    return value


@dataclass(frozen=True)
class NoiseConfig:
    """Settings of one min-min run (all part of the manifest).

    Parameters
    ----------
    mode : str
        ``"sample"`` (one noise per image) or ``"class"`` (one per identity).
    eps : float
        L-infinity budget as a fraction of the pixel range (8/255: at most 8 grey levels).
    step_size : float
        Each noise step's size, same units (the reference's 0.8/255).
    model_steps, noise_steps : int
        Per outer iteration: surrogate SGD steps, then noise steps per batch.
    max_iterations : int
        Outer iterations at most, whether or not the stop condition is reached.
    surrogate : str
        A registered backbone (``fedface models``) trained with a softmax head.
    image_size : int
        Chip side the noise is made at.
    batch_size : int
        Images per surrogate step and per noise batch.
    lr : float
        The surrogate's SGD learning rate (momentum 0.9, weight decay 5e-4; 0.1 diverges on
        faces once the noise has made the loss small).
    seed : int
        Seeds the noise's start, the surrogate and the batch order.
    """

    mode: str = "sample"
    eps: float = 8 / 255
    step_size: float = 0.8 / 255
    model_steps: int = 10
    noise_steps: int = 20
    max_iterations: int = 30
    surrogate: str = "tinyface"
    image_size: int = 64
    batch_size: int = 64
    lr: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r}: use sample or class")
        try:
            parse_eps(self.eps)
        except ValueError as err:
            problems.append(str(err))
        if not 0 < self.step_size <= self.eps:
            problems.append(f"step_size {self.step_size:.4g}: use a value in (0, eps]")
        for name in ("model_steps", "noise_steps", "max_iterations"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} {getattr(self, name)}: use at least 1")
        if int(self.batch_size) < 2:
            problems.append(f"batch_size {self.batch_size}: use at least 2")
        if self.surrogate.lower() not in list_backbones():
            problems.append(f"surrogate {self.surrogate!r} is not a registered backbone; "
                            f"available: {', '.join(list_backbones())}")
        if not 32 <= int(self.image_size) <= 224:
            problems.append(f"image_size {self.image_size}: use 32..224")
        if not self.lr > 0:
            problems.append(f"lr {self.lr}: use a positive learning rate")
        if problems:
            raise ValueError("unlearnable settings refused: " + "; ".join(problems))

    @property
    def condition(self) -> str:
        """The stop condition in words."""
        if self.mode == "sample":
            return f"accuracy on the protected training images > {SAMPLE_STOP_ACCURACY:.0%}"
        return f"training error on the protected images < {CLASS_STOP_ERROR}"

    def reached(self, accuracy: float) -> bool:
        if self.mode == "sample":
            return accuracy > SAMPLE_STOP_ACCURACY
        return 1.0 - accuracy < CLASS_STOP_ERROR

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StopReport:
    """How a min-min run ended."""

    reached: bool
    condition: str
    iterations: int
    train_accuracy: float
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_inputs(chips: np.ndarray, labels: np.ndarray, config: NoiseConfig) -> tuple:
    chips = np.asarray(chips)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    s = int(config.image_size)
    if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[1:] != (s, s, 3):
        raise ValueError(f"chips must be uint8 (N, {s}, {s}, 3) aligned faces, got "
                         f"{chips.dtype} {chips.shape}: align them at image_size={s} first")
    if len(chips) == 0:
        raise ValueError("no images to protect: the identity folders hold no readable image")
    if len(labels) != len(chips):
        raise ValueError(f"{len(chips)} chips but {len(labels)} labels")
    classes, local = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        why = ("class-wise noise is one pattern per identity that tells identities apart"
               if config.mode == "class" else
               "error-minimizing noise is made against a model that tells identities apart")
        raise ValueError(f"only one identity in the data: {why}, so it needs two or more "
                         "identity folders")
    return chips, local.astype(np.int64), len(classes)


def budget_levels(eps: float) -> int:
    """The budget in whole grey levels: what a written 8-bit pixel may move by."""
    return int(math.floor(eps * 255 + 1e-9))


def quantize(noise: np.ndarray, eps: float) -> np.ndarray:
    """Noise in grey levels rounded to whole levels and clipped to the budget, so that an
    8-bit pixel plus it moves by at most :func:`budget_levels` (``rint`` alone would round
    7.9 up to 8 under a budget of 0.031 = 7.9 levels)."""
    limit = budget_levels(eps)
    return np.clip(np.rint(noise), -limit, limit)


@contextmanager
def _batch_statistics(*modules: nn.Module):
    """Train mode with every BatchNorm's running averages frozen (momentum 0); restored after."""
    norms = [m for mod in modules for m in mod.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    modes = [mod.training for mod in modules]
    for m in norms:
        m.momentum = 0.0
    for mod in modules:
        mod.train()
    try:
        yield
    finally:
        for m, mom in zip(norms, saved, strict=True):
            m.momentum = mom
        for mod, mode in zip(modules, modes, strict=True):
            mod.train(mode)


class MinMin:
    """One min-min run over aligned chips; resumable through :meth:`state_dict`.

    Parameters
    ----------
    chips : np.ndarray
        uint8 ``(N, S, S, 3)`` aligned faces, ``S = config.image_size``.
    labels : np.ndarray
        Identity of each chip (any integers; at least two distinct).
    config : NoiseConfig
    """

    def __init__(self, chips: np.ndarray, labels: np.ndarray, config: NoiseConfig):
        chips, self.labels, self.num_classes = check_inputs(chips, labels, config)
        self.config = config
        torch.manual_seed(config.seed)
        self.backbone = build_backbone(config.surrogate, embedding_size=128,
                                       input_size=config.image_size)
        self.head = build_head("softmax", embedding_size=128, num_classes=self.num_classes)
        self.optimizer = make_optimizer(self.backbone, self.head, config.lr, 0.9, 5e-4)
        self.x = to_tensor(chips)  # model units: pixel p -> (p - 127.5) / 127.5
        self.y = torch.as_tensor(self.labels)
        self.eps = 2.0 * config.eps  # one pixel range = 2 model units
        self.step = 2.0 * config.step_size
        gen = torch.Generator().manual_seed(config.seed)
        rows = len(chips) if config.mode == "sample" else self.num_classes
        shape = (rows, 3, config.image_size, config.image_size)
        self.noise = (torch.rand(shape, generator=gen) * 2 - 1) * self.eps
        self.gen = gen
        self.order = torch.randperm(len(chips), generator=gen)
        self.cursor = 0
        self.iteration = 0
        self.history: list[float] = []
        self.seconds = 0.0

    # -- the pieces ------------------------------------------------------------------------------
    def _per_image(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.mode == "sample":
            return self.noise if idx is None else self.noise[idx]
        return self.noise[self.y if idx is None else self.y[idx]]

    def _inputs(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if idx is None else self.x[idx]
        return (x + self._per_image(idx)).clamp(-1.0, 1.0)

    def _model_batches(self, _gen: torch.Generator):
        """``model_steps`` batches, cycling through a shuffled order across iterations."""
        n, bs = len(self.x), min(self.config.batch_size, len(self.x))
        for _ in range(self.config.model_steps):
            if self.cursor + bs > n:
                self.order = torch.randperm(n, generator=self.gen)
                self.cursor = 0
            yield self.order[self.cursor:self.cursor + bs]
            self.cursor += bs

    def _train_model(self) -> None:
        train_epochs(self.backbone, self.head, self._inputs(), self.labels, epochs=1,
                     batch_size=self.config.batch_size, optimizer=self.optimizer,
                     seed=self.config.seed + self.iteration, batches=self._model_batches)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.backbone(x), y), y)

    def _noise_pass(self, progress: ProgressFn | None) -> None:
        """``noise_steps`` signed steps on each batch's noise, lowering the loss.

        The surrogate is seen as training sees it: BatchNorm layers normalise with the batch's
        statistics (their running averages lag far behind a surrogate this young, and noise
        made against them does not fool the model being trained), and the running averages
        are left as they were."""
        with _batch_statistics(self.backbone, self.head):
            self._noise_batches(progress)

    def _noise_batches(self, progress: ProgressFn | None) -> None:
        n, bs = len(self.x), self.config.batch_size
        what = f"noise, iteration {self.iteration + 1}"
        order = torch.randperm(n, generator=self.gen)  # mixed people, as training batches are
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            if len(idx) < 2:  # batch statistics need two images: take the last full batch's
                idx = order[max(0, n - bs):]
            x, y = self.x[idx], self.y[idx]
            if self.config.mode == "sample":
                delta = self.noise[idx].clone()
                for _ in range(self.config.noise_steps):
                    delta.requires_grad_(True)
                    grad, = torch.autograd.grad(self._loss(self._view(x + delta), y), delta)
                    delta = self._project(x, delta.detach() - self.step * grad.sign())
                self.noise[idx] = delta
            else:
                for _ in range(self.config.noise_steps):
                    leaf = self.noise.clone().requires_grad_(True)
                    grad, = torch.autograd.grad(self._loss(self._view(x + leaf[y]), y), leaf)
                    self.noise = (self.noise - self.step * grad.sign()).clamp(-self.eps, self.eps)
            if progress is not None:
                progress(what, min(start + bs, n), n)

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        """A random view of noisy inputs, as the adversary will see them: a trainer's flip and
        shift, and the resampling of a face aligned again from the full image (a random
        similarity of up to half a pixel, 3 % scale and 3 degrees, bilinear). Noise made
        through such views survives them (expectation over transformation); made on fixed
        views, a one-pixel shift or the round trip through the full image undoes much of it."""
        x = augment(x.clamp(-1.0, 1.0), self.gen)
        n, _, h, _w = x.shape
        r = torch.rand(n, 4, generator=self.gen) * 2 - 1
        scale, angle = 1 + 0.03 * r[:, 0], math.radians(3) * r[:, 1]
        shift = r[:, 2:] * (1.0 / h)  # half a pixel in affine_grid's [-1, 1] units
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        delta = delta.clamp(-self.eps, self.eps)
        return (x + delta).clamp(-1.0, 1.0) - x

    @torch.no_grad()
    def accuracy(self) -> float:
        """The surrogate's accuracy on the protected chips as published (8-bit pixels)."""
        self.backbone.eval()
        self.head.eval()
        x = to_tensor(self.protected())
        hits = 0
        for start in range(0, len(x), 256):
            logits = self.head(self.backbone(x[start:start + 256]))
            hits += int((logits.argmax(1) == self.y[start:start + 256]).sum())
        return hits / len(x)

    # -- results ---------------------------------------------------------------------------------
    def noise_pixels(self) -> np.ndarray:
        """Each chip's noise in grey levels, float32 ``(N, S, S, 3)`` within ``eps * 255``."""
        return (self._per_image() * 127.5).permute(0, 2, 3, 1).contiguous().numpy()

    def protected(self) -> np.ndarray:
        """The protected chips, uint8: chips plus the noise in whole grey levels
        (:func:`quantize`)."""
        pix = np.rint(self.x.permute(0, 2, 3, 1).numpy() * 127.5 + 127.5)
        return np.clip(pix + quantize(self.noise_pixels(), self.config.eps), 0, 255
                       ).astype(np.uint8)

    # -- the loop --------------------------------------------------------------------------------
    def run(self, on_iteration=None, progress: ProgressFn | None = None) -> StopReport:
        """Iterate until the stop condition or ``max_iterations``; ``on_iteration(self)`` after
        each iteration (a checkpoint). A resumed run continues from its iteration count."""
        cfg = self.config
        while (self.iteration < cfg.max_iterations
               and not (self.history and cfg.reached(self.history[-1]))):
            t0 = time.time()
            self._train_model()
            self._noise_pass(progress)
            self.history.append(self.accuracy())
            self.iteration += 1
            self.seconds += time.time() - t0
            if on_iteration is not None:
                on_iteration(self)
            if progress is not None:
                progress("min-min iterations", self.iteration, cfg.max_iterations)
        last = self.history[-1] if self.history else 0.0
        return StopReport(bool(self.history) and cfg.reached(last), cfg.condition,
                          self.iteration, last, list(self.history), self.seconds)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": self.config.to_dict(), "noise": self.noise,
                "backbone": self.backbone.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "gen": self.gen.get_state(),
                "order": self.order, "cursor": self.cursor, "iteration": self.iteration,
                "history": list(self.history), "seconds": self.seconds,
                "n": len(self.x)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") != self.config.to_dict() or state.get("n") != len(self.x):
            raise ValueError("the saved min-min state was made with other settings or other "
                             "images: resume with the same settings and images, or delete the "
                             "state to start afresh")
        self.noise = state["noise"]
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        self.order, self.cursor = state["order"], int(state["cursor"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.seconds = float(state["seconds"])
