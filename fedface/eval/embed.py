"""Image preprocessing and embedding extraction.

:func:`to_tensor` is the single preprocessing function of the project:
training and evaluation must both use it so that models see identically
scaled inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["embed", "pair_scores", "raw_pixel_embed", "to_tensor"]

_EPS = 1e-12


def _check_images(images, name: str = "images") -> np.ndarray:
    """Validate an (N,H,W,3) RGB or (N,H,W) grey image batch; return ndarray."""
    x = np.asarray(images)
    if x.ndim == 4:
        if x.shape[3] != 3:
            raise ValueError(
                f"{name} with 4 dimensions must be (N, H, W, 3) RGB, got shape {x.shape}"
            )
    elif x.ndim != 3:
        raise ValueError(
            f"{name} must be (N, H, W, 3) RGB or (N, H, W) grey, got shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    return x


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert uint8 images to the model input tensor.

    Parameters
    ----------
    images : ndarray of uint8
        ``(N, H, W, 3)`` RGB or ``(N, H, W)`` greyscale images in [0, 255].

    Returns
    -------
    torch.Tensor
        float32, shape ``(N, 3, H, W)``, contiguous, values
        ``(pixel - 127.5) / 127.5`` in [-1, 1]. Greyscale input is replicated
        to three channels.

    Raises
    ------
    TypeError
        If ``images`` is not uint8 (guards against double scaling).
    ValueError
        If the shape is not one of the two accepted layouts or N = 0.
    """
    x = _check_images(images)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got dtype {x.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    t = (t - 127.5) / 127.5
    if t.ndim == 3:
        t = t.unsqueeze(1).expand(-1, 3, -1, -1)
    else:
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def _l2_normalize(e: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norm, _EPS)


def embed(model: nn.Module, images: np.ndarray, batch_size: int = 256,
          flip: bool = False) -> np.ndarray:
    """Compute L2-normalized embeddings of uint8 images.

    The model runs in eval mode under ``torch.no_grad()`` on the device (and
    floating dtype) of its first parameter, or on the CPU in float32 if it has
    none. The train/eval flag of every submodule is restored afterwards, even
    on error.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a ``(B, 3, H, W)`` tensor from :func:`to_tensor` to ``(B, D)``.
    images : ndarray of uint8
        ``(N, H, W, 3)`` RGB or ``(N, H, W)`` grey.
    batch_size : int, default 256
    flip : bool, default False
        Test-time augmentation: add the embedding of the horizontally flipped
        image to that of the original before normalizing.

    Returns
    -------
    ndarray of float32, shape (N, D)
        Unit-norm rows (a zero embedding stays zero).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x = _check_images(images)
    if x.dtype != np.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got dtype {x.dtype}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                t = to_tensor(x[start:start + batch_size]).to(device=device, dtype=dtype)
                e = model(t)
                if flip:
                    e = e + model(torch.flip(t, dims=[3]))
                if e.ndim != 2 or e.shape[0] != t.shape[0]:
                    raise ValueError(
                        f"model must return (batch, dim) embeddings, got shape "
                        f"{tuple(e.shape)} for a batch of {t.shape[0]}"
                    )
                out.append(e.detach().to("cpu", torch.float32).numpy())
    finally:
        for m, was_training in modes:
            m.training = was_training
    emb = np.concatenate(out, axis=0)
    return _l2_normalize(emb).astype(np.float32)


def raw_pixel_embed(images, size: int = 32) -> np.ndarray:
    """Non-learned reference embedding from raw pixels.

    Each image is converted to grey (ITU-R BT.601 luma), resized to
    ``size x size`` with area interpolation, flattened, centred by its own
    mean and L2-normalized. The result is invariant to a uniform brightness
    shift (without clipping) and to contrast scaling.

    Parameters
    ----------
    images : ndarray
        ``(N, H, W, 3)`` RGB or ``(N, H, W)`` grey, any real dtype.
    size : int, default 32

    Returns
    -------
    ndarray of float32, shape (N, size * size)
        Unit-norm rows; a constant image maps to the zero vector.
    """
    import cv2  # local import: only this reference embedding needs OpenCV

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    x = _check_images(images)
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"images must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.ndim == 4:
        x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = np.empty((x.shape[0], size * size), dtype=np.float32)
    for i in range(x.shape[0]):
        r = cv2.resize(x[i], (size, size), interpolation=cv2.INTER_AREA)
        out[i] = r.reshape(-1)
    out -= out.mean(axis=1, keepdims=True)
    return _l2_normalize(out).astype(np.float32)


def pair_scores(emb_a, emb_b) -> np.ndarray:
    """Row-wise cosine similarity of two embedding matrices.

    Parameters
    ----------
    emb_a, emb_b : array_like, shape (n, d)

    Returns
    -------
    ndarray of float64, shape (n,)
        ``cos(emb_a[i], emb_b[i])``; 0 where either row is the zero vector.
    """
    a = np.asarray(emb_a, dtype=np.float64)
    b = np.asarray(emb_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"emb_a and emb_b must be 2-D with equal shapes, got {a.shape} and {b.shape}"
        )
    return np.sum(_l2_normalize(a) * _l2_normalize(b), axis=1)
