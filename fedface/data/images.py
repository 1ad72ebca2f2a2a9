"""Load any face image as an ``HxWx3`` ``uint8`` RGB array, or fail with a clear :class:`ImageError`.

Every error names the file and the problem (empty, truncated, not an image, unsupported extension,
absurd size, ...) and says what to do, so batch code can record it in a
:class:`~fedface.data.report.DataReport` and carry on.

Truncation: Pillow accepts some truncated files silently (a PNG that lost its last chunk, or any
file at all when another library has set the module global ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``).
This module never touches that global; instead it decodes inside a ``try`` and additionally checks
the end-of-image structure of JPEG (an ``EOI`` marker after the last scan) and PNG (an ``IEND``
chunk), so a truncated file is always an error here.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "MIN_SIDE",
    "ImageError",
    "ImageNotFoundError",
    "decode_image_bytes",
    "is_image_file",
    "load_image",
    "read_image_bytes",
]

#: File extensions (lower case, with the dot) that :func:`load_image` accepts.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}
)

#: Images with more pixels than this are refused as absurd (a face crop never needs 64 Mpx).
MAX_PIXELS = 64_000_000
#: Images with a side shorter than this are refused as absurd (no face fits in 7 pixels).
MIN_SIDE = 8

_EXT_LIST = ", ".join(sorted(IMAGE_EXTENSIONS))


class ImageError(ValueError):
    """An image file that cannot be used. ``path`` and ``reason`` are kept as attributes; the message
    is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ImageNotFoundError(ImageError, FileNotFoundError):
    """The image file does not exist (an :class:`ImageError` and a :class:`FileNotFoundError`)."""

    def __init__(self, path: str | Path, reason: str):
        ImageError.__init__(self, path, reason)


def is_image_file(path: str | Path) -> bool:
    """True when the name has a supported image extension and is not hidden (no content check)."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def read_image_bytes(path: str | Path) -> bytes:
    """The raw bytes of an image file, after the checks that need no decoding (exists, is a file,
    supported extension, not empty). Raises :class:`ImageError`."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        shown = ext or "(none)"
        raise ImageError(
            p, f"unsupported extension {shown!r}: convert it to one of {_EXT_LIST} or remove it"
        )
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ImageNotFoundError(p, "file does not exist: check the path") from None
    except IsADirectoryError:
        raise ImageError(p, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(p, "permission denied: make the file readable") from None
    except OSError as exc:
        raise ImageError(p, f"cannot read the file ({exc.strerror or exc}): check the disk") from None
    if not data:
        raise ImageError(p, "file is empty (0 bytes): re-download or re-export it, or remove it")
    return data


def _jpeg_truncated(data: bytes) -> bool:
    # Inside entropy-coded data 0xFF is always followed by 0x00 or RSTn, so 0xFFD9 can only be the
    # EOI marker. An embedded EXIF thumbnail has its own EOI, but before the main image's scans.
    last_sos = data.rfind(b"\xff\xda")
    if last_sos < 0:
        return True
    return data.rfind(b"\xff\xd9") < last_sos


def _png_truncated(data: bytes) -> bool:
    # The last chunk must be a complete IEND: 4-byte type + 4-byte CRC.
    pos = data.rfind(b"IEND")
    return pos < 0 or len(data) < pos + 8


_RAW_BITS = {
    "1": 1, "1;I": 1, "1;R": 1, "P;1": 1, "L;1": 1, "P;2": 2, "L;2": 2, "P;4": 4, "L;4": 4,
    "L": 8, "P": 8, "L;I": 8, "I;8": 8, "LA": 16, "I;16": 16, "I;16B": 16, "I;16L": 16,
    "I;16N": 16, "RGB": 24, "BGR": 24, "RGB;L": 24, "YCbCr": 24, "RGBA": 32, "RGBX": 32,
    "BGRA": 32, "BGRX": 32, "CMYK": 32, "I": 32, "F": 32, "I;32": 32, "F;32F": 32,
}


def _raw_truncated(im: Image.Image, size: int) -> bool:
    """For uncompressed ("raw") tiles (PPM/PGM, BMP, plain TIFF): does the file hold every row?"""
    end = 0
    for tile in getattr(im, "tile", None) or []:
        codec, extents, offset, args = tile[0], tile[1], tile[2], tile[3]
        if codec != "raw" or extents is None:
            return False
        rawmode = args[0] if isinstance(args, tuple) else args
        stride = args[1] if isinstance(args, tuple) and len(args) > 1 else 0
        bits = _RAW_BITS.get(str(rawmode))
        if bits is None:
            return False  # unknown layout: rely on Pillow alone
        width, rows = extents[2] - extents[0], extents[3] - extents[1]
        row_bytes = (width * bits + 7) // 8
        stride = stride if stride and stride > 0 else row_bytes
        end = max(end, offset + stride * max(rows - 1, 0) + row_bytes)
    return end > size


def _check_size(path: str | Path, width: int, height: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(
            path,
            f"absurd size {width}x{height}: sides must be at least {MIN_SIDE} pixels "
            "(is it a thumbnail or a placeholder?)",
        )
    if width * height > MAX_PIXELS:
        raise ImageError(
            path,
            f"absurd size {width}x{height} ({width * height / 1e6:.0f} Mpx, more than "
            f"{MAX_PIXELS / 1e6:.0f} Mpx): downscale it before use",
        )


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("L", "1"):
        grey = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            hi = float(arr.max()) if arr.size else 0.0
            if hi > 65535 or float(arr.min()) < 0:
                lo = float(arr.min())
                arr = (arr - lo) * (255.0 / max(hi - lo, 1.0))
            elif hi > 255:
                arr = arr / 257.0
        else:  # "F": floats, usually in [0, 1] or [0, 255]
            finite = arr[np.isfinite(arr)]
            lo = float(finite.min()) if finite.size else 0.0
            hi = float(finite.max()) if finite.size else 0.0
            arr = np.nan_to_num(arr, nan=0.0, posinf=hi, neginf=lo)
            if lo >= 0 and hi <= 1.0:
                arr = arr * 255.0
            elif lo < 0 or hi > 255:
                arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_image_bytes(data: bytes, path: str | Path = "<bytes>") -> np.ndarray:
    """Decode image bytes to ``HxWx3`` ``uint8`` RGB; ``path`` is only used in error messages.

    Grey, palette, RGBA (composited on white), CMYK, 16-bit and float images are all converted;
    the EXIF orientation is applied. Raises :class:`ImageError`.
    """
    if not data:
        raise ImageError(path, "file is empty (0 bytes): re-download or re-export it, or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"absurd size ({exc}): downscale it before use") from None
    except UnidentifiedImageError:
        raise ImageError(
            path,
            f"not an image (Pillow cannot identify the format of these {len(data)} bytes): "
            "is it a text/HTML file or a failed download? Re-download it or remove it",
        ) from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        detail = f"{type(exc).__name__}: {exc}"
        if "truncat" in str(exc).lower() or isinstance(exc, EOFError):
            raise ImageError(
                path, f"truncated image (the header is incomplete: {detail}); re-download it"
            ) from None
        raise ImageError(path, f"broken image header ({detail}): re-download or remove it") from None

    with im:
        fmt = (im.format or "").upper()
        width, height = im.size
        _check_size(path, width, height)
        raw_truncated = _raw_truncated(im, len(data))
        try:
            im.load()
        except OSError as exc:
            msg = str(exc)
            if "truncated" in msg.lower() or "premature" in msg.lower():
                raise ImageError(
                    path, f"truncated image ({msg}): the file is incomplete; re-download it"
                ) from None
            raise ImageError(path, f"corrupt image data ({msg}): re-download or remove it") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            raise ImageError(
                path, f"corrupt image data ({type(exc).__name__}: {exc}): re-download or remove it"
            ) from None
        if raw_truncated or (fmt in ("JPEG", "MPO") and _jpeg_truncated(data)) or (
            fmt == "PNG" and _png_truncated(data)
        ):
            raise ImageError(
                path,
                f"truncated image (the {fmt} data ends early or its end-of-image marker is "
                "missing): the file is incomplete; re-download it",
            )
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not cost us the pixels
            oriented = im
        try:
            rgb = _to_rgb(oriented if oriented is not None else im)
        except Exception as exc:  # noqa: BLE001 - report any conversion failure as bad input
            raise ImageError(
                path, f"cannot convert mode {im.mode!r} to RGB ({type(exc).__name__}: {exc})"
            ) from None
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(path, f"unexpected decoded shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def load_image(path: str | Path) -> np.ndarray:
    """Load an image file as an ``HxWx3`` ``uint8`` RGB array.

    Accepts the extensions in :data:`IMAGE_EXTENSIONS` (case-insensitive) and any pixel mode.
    Raises :class:`ImageError` (a ``ValueError``; :class:`ImageNotFoundError` for a missing file)
    whose message names the file, the problem and what to do.
    """
    data = read_image_bytes(path)
    return decode_image_bytes(data, path)
