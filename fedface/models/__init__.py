"""Face-recognition backbones and margin heads, built by name.

Backbones: ``tinyface`` (default, DP-compatible), ``mobilefacenet``,
``iresnet18``, ``iresnet50``. Heads: ``softmax``, ``cosface``, ``arcface``.
:func:`initial_backbone` is a run's public starting point (federated and centralized).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import heads, iresnet, mobilefacenet, tinyface  # noqa: F401  (register)
from .registry import (
    build_backbone,
    build_head,
    count_parameters,
    list_backbones,
    list_heads,
    register_backbone,
    register_head,
)

if TYPE_CHECKING:
    from fedface.config import RunConfig


def initial_backbone(cfg: RunConfig) -> torch.nn.Module:
    """The run's initial backbone, from its public ``seed``: the same model for the
    server, every institution and the centralized baseline."""
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.backbone, embedding_size=cfg.embedding_size,
                          input_size=cfg.image_size)


__all__ = [
    "build_backbone",
    "build_head",
    "count_parameters",
    "initial_backbone",
    "list_backbones",
    "list_heads",
    "register_backbone",
    "register_head",
]
