"""Face-recognition backbones and margin heads, built by name.

Backbones: ``tinyface`` (default, DP-compatible), ``mobilefacenet``,
``iresnet18``, ``iresnet50``. Heads: ``softmax``, ``cosface``, ``arcface``.
"""

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

__all__ = [
    "build_backbone",
    "build_head",
    "count_parameters",
    "list_backbones",
    "list_heads",
    "register_backbone",
    "register_head",
]
