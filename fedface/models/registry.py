"""Name-based registries for face-recognition backbones and margin heads.

Backbone and head families register factory callables under a string name
with :func:`register_backbone` / :func:`register_head`; the rest of the code
base builds modules by name with :func:`build_backbone` / :func:`build_head`.

Examples
--------
>>> from fedface.models import build_backbone, build_head
>>> net = build_backbone("tinyface", embedding_size=128, input_size=64)
>>> head = build_head("cosface", embedding_size=128, num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = [
    "BACKBONES",
    "HEADS",
    "build_backbone",
    "build_head",
    "count_parameters",
    "list_backbones",
    "list_heads",
    "register_backbone",
    "register_head",
]

F = TypeVar("F", bound=Callable[..., nn.Module])

#: Backbone factories by name. Each is called as
#: ``factory(embedding_size=..., input_size=..., **kwargs)``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {}

#: Head factories by name. Each is called as
#: ``factory(embedding_size=..., num_classes=..., **kwargs)``.
HEADS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict[str, Callable[..., nn.Module]], kind: str, name: str):
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    key = name.lower()

    def decorator(fn: F) -> F:
        if key in table:
            raise ValueError(f"{kind} {key!r} is already registered")
        table[key] = fn
        return fn

    return decorator


def _lookup(table: dict[str, Callable[..., nn.Module]], kind: str, name: str):
    key = name.lower() if isinstance(name, str) else name
    if key not in table:
        available = ", ".join(sorted(table)) or "<none>"
        raise ValueError(f"Unknown {kind} {name!r}; available {kind}s: {available}")
    return table[key]


def register_backbone(name: str) -> Callable[[F], F]:
    """Register a backbone factory under ``name`` (decorator).

    Parameters
    ----------
    name : str
        Registry key (case-insensitive).

    Returns
    -------
    callable
        Decorator that stores the factory in :data:`BACKBONES` and returns it
        unchanged.

    Raises
    ------
    ValueError
        If ``name`` is already registered.
    """
    return _register(BACKBONES, "backbone", name)


def register_head(name: str) -> Callable[[F], F]:
    """Register a classification / margin head factory under ``name`` (decorator).

    Parameters
    ----------
    name : str
        Registry key (case-insensitive).

    Returns
    -------
    callable
        Decorator that stores the factory in :data:`HEADS` and returns it unchanged.
    """
    return _register(HEADS, "head", name)


def build_backbone(
    name: str, embedding_size: int = 128, input_size: int = 112, **kwargs
) -> nn.Module:
    """Build a backbone by name.

    Parameters
    ----------
    name : str
        A name from :func:`list_backbones`.
    embedding_size : int, default 128
        Dimension of the (unnormalized) output embedding.
    input_size : int, default 112
        Side of the square input images.
    **kwargs
        Family-specific options (e.g. ``norm``/``act`` for ``"mobilefacenet"``).

    Returns
    -------
    torch.nn.Module
        Maps ``(N, 3, input_size, input_size)`` to ``(N, embedding_size)``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the available names.
    """
    factory = _lookup(BACKBONES, "backbone", name)
    return factory(embedding_size=embedding_size, input_size=input_size, **kwargs)


def build_head(name: str, embedding_size: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a classification / margin head by name.

    Parameters
    ----------
    name : str
        A name from :func:`list_heads`.
    embedding_size : int
        Input embedding dimension.
    num_classes : int
        Number of identities (rows of the head's weight matrix).
    **kwargs
        Head-specific options (e.g. ``s`` and ``m``).

    Returns
    -------
    torch.nn.Module
        ``forward(embeddings, labels=None) -> logits`` of shape ``(N, num_classes)``.

    Raises
    ------
    ValueError
        If ``name`` is not registered; the message lists the available names.
    """
    factory = _lookup(HEADS, "head", name)
    return factory(embedding_size=embedding_size, num_classes=num_classes, **kwargs)


def list_backbones() -> list[str]:
    """Return the sorted names of all registered backbones."""
    return sorted(BACKBONES)


def list_heads() -> list[str]:
    """Return the sorted names of all registered heads."""
    return sorted(HEADS)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Count the parameters of ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        Module to inspect.
    trainable_only : bool, default False
        Count only parameters with ``requires_grad=True``.

    Returns
    -------
    int
        Total number of scalar parameters.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def feature_size(input_size: int, num_downsamples: int = 4) -> int:
    """Spatial side after ``num_downsamples`` stride-2 (k3/p1 or k1/p0) convolutions.

    Parameters
    ----------
    input_size : int
        Side of the square input.
    num_downsamples : int, default 4
        Number of stride-2 reductions.

    Returns
    -------
    int
        ``ceil(input_size / 2)`` applied ``num_downsamples`` times.
    """
    if int(input_size) != input_size or input_size < 2**num_downsamples:
        raise ValueError(
            f"input_size must be an integer >= {2**num_downsamples}, got {input_size!r}"
        )
    size = int(input_size)
    for _ in range(num_downsamples):
        size = (size + 1) // 2
    return size
