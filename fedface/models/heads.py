"""Classification heads for face-recognition training.

All heads map ``(N, embedding_size)`` embeddings to ``(N, num_classes)``
logits via ``forward(embeddings, labels=None)``; the caller applies
cross-entropy. Margins are applied only when ``labels`` is given, and only at
each row's label column (rows with label ``-1`` get no margin).

Opacus compatibility
--------------------
The only parametrized submodule of each head is either an ``nn.Linear``
(softmax head; Opacus' built-in grad sampler) or :class:`CosineLinear`, a
single-input module without buffers whose per-sample gradients Opacus
computes with ``torch.func`` (vmap). The margin is applied *outside* that
submodule, so per-sample gradients stay exact. The class-weight matrix
(``num_classes x embedding_size``) is exposed as ``head.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_head

__all__ = ["ArcFace", "CosFace", "CosineLinear", "MarginHead", "SoftmaxHead"]


class CosineLinear(nn.Module):
    """Cosine similarity between L2-normalized inputs and class weights.

    Parameters
    ----------
    in_features : int
        Embedding dimension.
    out_features : int
        Number of classes.

    Notes
    -----
    ``forward(x)`` returns ``normalize(x) @ normalize(W).T`` of shape
    ``(N, out_features)``, clamped to ``[-1, 1]``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=in_features**-0.5)  # unit-norm rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))
        return cos.clamp(-1.0, 1.0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SoftmaxHead(nn.Module):
    """Plain linear classifier (``labels`` is accepted and ignored).

    Parameters
    ----------
    embedding_size : int
        Input embedding dimension.
    num_classes : int
        Number of classes.
    bias : bool, default False
        Add a per-class bias.
    """

    def __init__(self, embedding_size: int, num_classes: int, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(embedding_size, num_classes, bias=bias)

    @property
    def weight(self) -> nn.Parameter:
        """Class-weight matrix, ``(num_classes, embedding_size)``."""
        return self.fc.weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(embeddings)


class MarginHead(nn.Module):
    """Base class for normalized-softmax heads with an additive target margin.

    Parameters
    ----------
    embedding_size : int
        Input embedding dimension.
    num_classes : int
        Number of classes.
    s : float
        Logit scale.
    m : float
        Margin.

    Notes
    -----
    Subclasses implement :meth:`target_logit`, mapping the label-column
    cosines ``(K,)`` to margin-adjusted cosines.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float, m: float):
        super().__init__()
        self.s = float(s)
        self.m = float(m)
        self.fc = CosineLinear(embedding_size, num_classes)

    @property
    def weight(self) -> nn.Parameter:
        """Class-weight matrix, ``(num_classes, embedding_size)``."""
        return self.fc.weight

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Return scaled cosine logits, with the margin at the label columns.

        Parameters
        ----------
        embeddings : torch.Tensor
            ``(N, embedding_size)``, unnormalized.
        labels : torch.Tensor, optional
            ``(N,)`` integer class indices; ``-1`` means "no margin for this row".

        Returns
        -------
        torch.Tensor
            ``(N, num_classes)`` logits, ``s * cos`` except at label columns.
        """
        cos = self.fc(embeddings)
        if labels is not None:
            labels = labels.reshape(-1, 1).long()
            valid = labels >= 0
            index = labels.clamp_min(0)
            target = cos.gather(1, index)
            target = torch.where(valid, self.target_logit(target), target)
            cos = cos.scatter(1, index, target)
        return cos * self.s

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


class CosFace(MarginHead):
    """CosFace / AM-Softmax (Wang et al., 2018): target logit ``s * (cos - m)``.

    Parameters
    ----------
    embedding_size, num_classes : int
        See :class:`MarginHead`.
    s : float, default 30.0
        Logit scale.
    m : float, default 0.35
        Additive cosine margin.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 30.0, m: float = 0.35):
        super().__init__(embedding_size, num_classes, s, m)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        return cos - self.m


class ArcFace(MarginHead):
    """ArcFace (Deng et al., 2019): target logit ``s * cos(theta + m)``.

    Parameters
    ----------
    embedding_size, num_classes : int
        See :class:`MarginHead`.
    s : float, default 64.0
        Logit scale.
    m : float, default 0.5
        Additive angular margin (radians).
    easy_margin : bool, default False
        If True, apply the margin only where ``cos > 0``. Otherwise (insightface
        default) use ``cos - sin(pi - m) * m`` where ``theta + m > pi`` (i.e.
        ``cos <= cos(pi - m)``), keeping the target logit monotonic in theta.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
    ):
        super().__init__(embedding_size, num_classes, s, m)
        self.easy_margin = easy_margin
        self.cos_m = math.cos(m)
        self.sin_m = math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        # clamp keeps the sqrt gradient finite at |cos| == 1
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-7))
        phi = cos * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            return torch.where(cos > 0, phi, cos)
        return torch.where(cos > self.th, phi, cos - self.mm)


@register_head("softmax")
def softmax(embedding_size: int, num_classes: int, **kwargs) -> SoftmaxHead:
    """Plain linear softmax head."""
    return SoftmaxHead(embedding_size, num_classes, **kwargs)


@register_head("cosface")
def cosface(embedding_size: int, num_classes: int, **kwargs) -> CosFace:
    """CosFace head (``s=30``, ``m=0.35`` by default)."""
    return CosFace(embedding_size, num_classes, **kwargs)


@register_head("arcface")
def arcface(embedding_size: int, num_classes: int, **kwargs) -> ArcFace:
    """ArcFace head (``s=64``, ``m=0.5`` by default)."""
    return ArcFace(embedding_size, num_classes, **kwargs)
