"""Key-reversible anonymization: scramble face boxes with a key, restore them bit for bit.

In the spirit of visually recoverable anonymization (Gu et al. 2020, "Password-conditioned
anonymization and deanonymization with face identity transformers"; Cao et al. 2021,
"Personalized and invertible face de-identification by disentangled identity
information manipulation"), but with a cipher instead of a generator: each face box's
pixels are permuted with a keyed permutation and a keyed AES-256-CTR keystream is added
to them modulo 256 (:mod:`crypto.scramble`). The scrambled face looks like coloured noise
(that is intended: there is no substitute face). With the right key :func:`restore`
reproduces the original exactly, bit for bit, as long as the scrambled pixels were kept
losslessly (PNG or TIFF: :func:`requires_lossless`); with a wrong key it produces noise.

Adversary
---------
Someone who holds the scrambled file, metadata included, but not the key. Hidden from
them: the pixels inside the boxes (computationally indistinguishable from uniform
noise, a fresh random nonce per image, so two scrambles of one image share nothing).
Not hidden, and public by design: the image size, the number, positions and sizes of the
boxes, every pixel outside the boxes (hair, clothes, background, other people may still
identify someone), and the key's public fingerprint (:func:`crypto.scramble.key_id`),
which links the files scrambled with one key. Whoever holds the key restores every face
scrambled with it; there is no per-face or per-user access control. The scrambled pixels
are not authenticated against tampering beyond :func:`restore`'s check that the restored
faces are the originals (an HMAC kept in the metadata).

Metadata
--------
:func:`scramble` returns the scrambled image and a JSON-serialisable ``meta`` dict::

    {"format": "fedface-scramble", "version": 1, "size": [W, H], "channels": C,
     "boxes": [[x0, y0, x1, y1], ...], "nonce": "<32 hex>", "key_id": "<16 hex>",
     "check": "<32 hex>"}

``boxes`` are integer pixel boxes (``x1``, ``y1`` exclusive, clipped, empty ones
dropped) in the order they were scrambled: overlapping boxes are scrambled one after
the other and restored in reverse. ``check`` is an HMAC of the original pixels of the
boxes under a key derived from the scramble key and the nonce. :func:`save_scrambled`
keeps ``meta`` in the file (PNG text chunk / TIFF ImageDescription, both named
``fedface-scramble``); :func:`read_meta` and :func:`restore_file` read it back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from crypto.scramble import (
    NONCE_BYTES,
    ScrambleKeyError,
    key_id,
    keystream,
    load_key,
    new_nonce,
    permutation,
    same_tag,
    tag,
)
from fedface.anonymize.boxes import Box
from fedface.errors import UserError, user_errors
from fedface.io import atomic_write

__all__ = [
    "META_KEY", "ScrambleError", "WrongKeyError", "png_info", "read_meta", "requires_lossless",
    "restore", "restore_file", "save_scrambled", "scramble",
]

META_KEY = "fedface-scramble"
FORMAT_VERSION = 1
MAX_BOXES = 10_000  # a file's metadata is untrusted input: bound the work it can ask for
_LOSSLESS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}
_LOSSY = {".jpg", ".jpeg", ".jpe", ".jfif", ".jp2", ".j2k", ".jpx", ".heic", ".heif", ".avif", ".webp"}
_HEX = re.compile(r"[0-9a-f]+")
_TIFF_DESCRIPTION = 270


class ScrambleError(UserError):
    """A scrambled image or its metadata that cannot be restored, saying why."""


class WrongKeyError(ScrambleError):
    """The key given is not the key the image was scrambled with."""

    def __init__(self, message: str, expected: str, got: str):
        super().__init__(message)
        self.expected = expected
        self.got = got


# -- the transform -----------------------------------------------------------------------


def _check_image(image: np.ndarray) -> tuple[int, int, int]:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError("scramble works on an HxWxC uint8 array (RGB: C = 3), got "
                         f"{getattr(image, 'dtype', type(image).__name__)} of shape "
                         f"{getattr(image, 'shape', '?')}")
    h, w, c = image.shape
    return w, h, c


def _header(meta: dict) -> bytes:
    """What the check binds besides the pixels: size, channels, boxes in order."""
    return json.dumps([meta["size"], meta["channels"], meta["boxes"]], separators=(",", ":")).encode()


def _check_value(key: bytes, nonce: bytes, meta: dict, image: np.ndarray) -> str:
    parts = [_header(meta)]
    for x0, y0, x1, y1 in meta["boxes"]:
        parts.append(np.ascontiguousarray(image[y0:y1, x0:x1]).tobytes())
    return tag(key, nonce, *parts)


def _streams(key: bytes, nonce: bytes, index: int, box: Sequence[int], channels: int
             ) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = box
    n = (x1 - x0) * (y1 - y0)
    return (permutation(key, nonce, index, box, n),
            keystream(key, nonce, index, box, n * channels).reshape(n, channels))


def scramble(image: np.ndarray, faces: Sequence[Box], key: bytes) -> tuple[np.ndarray, dict]:
    """Scramble every face box of ``image`` with ``key``.

    Parameters
    ----------
    image : numpy.ndarray
        ``HxWx3`` ``uint8`` RGB image (any channel count works). Not modified.
    faces : sequence of Box
        Face boxes in the image's pixel coordinates. Each covers every pixel it touches
        (:meth:`Box.pixels`), clipped to the image; boxes empty after clipping are
        skipped. Overlapping boxes are scrambled in the order given.
    key : bytes
        The 32-byte scramble key (:func:`crypto.scramble.load_key`).

    Returns
    -------
    scrambled : numpy.ndarray
        A new array: the image with each box's pixels permuted and masked with a keyed
        keystream (noise to anyone without the key).
    meta : dict
        JSON-serialisable metadata :func:`restore` needs (see the module docstring);
        keep it with the image (:func:`save_scrambled`).
    """
    w, h, c = _check_image(image)
    boxes = []
    for face in faces:
        x0, y0, x1, y1 = face.pixels(w, h)
        if x1 > x0 and y1 > y0:
            boxes.append([x0, y0, x1, y1])
    if len(boxes) > MAX_BOXES:
        raise ValueError(f"scramble takes at most {MAX_BOXES} boxes per image, got {len(boxes)}")
    nonce = new_nonce()
    meta: dict[str, Any] = {"format": META_KEY, "version": FORMAT_VERSION, "size": [w, h],
                            "channels": c, "boxes": boxes, "nonce": nonce.hex(), "key_id": key_id(key)}
    meta["check"] = _check_value(key, nonce, meta, image)
    out = image.copy()
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = box
        perm, ks = _streams(key, nonce, i, box, c)
        region = out[y0:y1, x0:x1]
        region[...] = (region.reshape(-1, c)[perm] + ks).reshape(region.shape)  # uint8: mod 256
    return out, meta


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(meta: Any, image: np.ndarray, what: str) -> tuple[dict, bytes]:
    """``meta`` checked against itself and ``image``; every refusal names ``what``."""
    if not isinstance(meta, dict) or meta.get("format") != META_KEY:
        raise ScrambleError(f"{what} carries no fedface scramble metadata: it was not scrambled by "
                            "fedface or its metadata was stripped")
    version = meta.get("version")
    if version != FORMAT_VERSION:
        raise ScrambleError(f"{what} was scrambled with metadata version {version!r}; this fedface "
                            f"reads version {FORMAT_VERSION}: use the fedface version that wrote it")
    def bad(field: str) -> str:
        return f"{what} has malformed scramble metadata ({field}): it was edited; use the file fedface wrote"

    size, channels, boxes = meta.get("size"), meta.get("channels"), meta.get("boxes")
    if not (isinstance(size, list) and len(size) == 2 and all(_int(v) and v > 0 for v in size)):
        raise ScrambleError(bad("size"))
    if not (_int(channels) and channels > 0):
        raise ScrambleError(bad("channels"))
    nonce_hex = meta.get("nonce")
    if not (isinstance(nonce_hex, str) and len(nonce_hex) == 2 * NONCE_BYTES and _HEX.fullmatch(nonce_hex)):
        raise ScrambleError(bad("nonce"))
    for field in ("key_id", "check"):
        if not (isinstance(meta.get(field), str) and _HEX.fullmatch(meta[field])):
            raise ScrambleError(bad(field))
    w, h = size
    if not isinstance(boxes, list) or len(boxes) > MAX_BOXES:
        raise ScrambleError(bad("boxes"))
    for b in boxes:
        if not (isinstance(b, list) and len(b) == 4 and all(_int(v) for v in b)
                and 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
            raise ScrambleError(bad(f"box {b!r}"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ScrambleError(f"{what} is not an 8-bit image (got {getattr(image, 'dtype', '?')}): it "
                            "was converted after scrambling; use the file fedface wrote")
    ih, iw = image.shape[:2]
    ic = image.shape[2] if image.ndim == 3 else 1
    if (iw, ih) != (w, h):
        raise ScrambleError(f"{what} is {iw}x{ih} pixels but was scrambled at {w}x{h}: it was "
                            "resized or cropped after scrambling and cannot be restored; use the "
                            "file fedface wrote")
    if ic != channels:
        raise ScrambleError(f"{what} has {ic} channel(s) but was scrambled with {channels}: it was "
                            "converted (grayscale, alpha, palette) after scrambling and cannot be "
                            "restored; use the file fedface wrote")
    return meta, bytes.fromhex(nonce_hex)


def restore(image: np.ndarray, meta: dict, key: bytes, check: bool = True, *,
            what: str = "the image") -> np.ndarray:
    """Undo :func:`scramble`: exactly, with the key it was scrambled with.

    Parameters
    ----------
    image : numpy.ndarray
        The scrambled ``HxWxC`` ``uint8`` image, as :func:`scramble` returned it (or read
        back from a lossless file). Not modified.
    meta : dict
        The metadata :func:`scramble` returned.
    key : bytes
        The 32-byte scramble key.
    check : bool, default True
        Refuse a key whose :func:`~crypto.scramble.key_id` is not the one in ``meta``
        (:class:`WrongKeyError`), and check that the restored faces are bit for bit the
        originals. ``False`` applies ``key`` anyway, unchecked: what an attacker holding
        a wrong key gets (noise in every box); evaluation uses it.
    what : str, default "the image"
        How error messages name the image (e.g. its path).

    Returns
    -------
    numpy.ndarray
        A new array, the original image when ``key`` is right.

    Raises
    ------
    ScrambleError
        When ``meta`` is malformed or does not fit ``image`` (resized, cropped or
        converted after scrambling), or, with ``check``, when the restored faces are not
        the originals (the scrambled pixels were re-encoded lossily or edited).
    WrongKeyError
        With ``check``, when ``key`` is not the key the image was scrambled with.
    """
    meta, nonce = _validate(meta, image, what)
    shape = image.shape
    if image.ndim == 2:  # a one-channel image read back from a grayscale file
        image = image[:, :, None]
    if check:
        got = key_id(key)
        if got != meta["key_id"]:
            raise WrongKeyError(f"{what} was scrambled with key {meta['key_id']}; the given key is key "
                                f"{got}: pass the key file it was scrambled with",
                                expected=meta["key_id"], got=got)
    c = meta["channels"]
    out = image.copy()
    for i in reversed(range(len(meta["boxes"]))):
        box = meta["boxes"][i]
        x0, y0, x1, y1 = box
        perm, ks = _streams(key, nonce, i, box, c)
        region = out[y0:y1, x0:x1]
        masked = region.reshape(-1, c) - ks  # uint8: mod 256
        plain = np.empty_like(masked)
        plain[perm] = masked
        region[...] = plain.reshape(region.shape)
    if check and not same_tag(_check_value(key, nonce, meta, out), meta["check"]):
        raise ScrambleError(f"restoring {what} did not reproduce the original faces exactly: its "
                            "scrambled pixels were changed after scrambling (re-encoded lossily, "
                            "edited or converted); restore the file fedface wrote")
    return out.reshape(shape)


# -- files -------------------------------------------------------------------------------


def requires_lossless(suffix: str) -> str:
    """The Pillow format a scrambled image is saved in for an output ``suffix``.

    Parameters
    ----------
    suffix : str
        A file suffix or format name: ``".png"``, ``"png"``, ``".tif"``, ``"tiff"`` ...

    Returns
    -------
    str
        ``"PNG"`` or ``"TIFF"``: lossless formats that also carry the metadata.

    Raises
    ------
    UserError
        For a lossy format (JPEG, WebP, AVIF ...: restoring from them cannot be exact)
        or one that cannot carry the metadata.
    """
    s = "." + str(suffix).lower().lstrip(".")
    if s in _LOSSLESS:
        return _LOSSLESS[s]
    if s in _LOSSY:
        raise UserError(f"scramble needs a lossless output: {s} is lossy, and a face restored from "
                        "a lossy file is not the original; use --format png")
    raise UserError(f"scramble writes PNG or TIFF (lossless, with the metadata restore needs), not "
                    f"{s}: use --format png")


def _dumps(meta: dict) -> str:
    return json.dumps(meta, separators=(",", ":"), sort_keys=True)


def png_info(meta: dict, info: PngImagePlugin.PngInfo | None = None) -> PngImagePlugin.PngInfo:
    """A Pillow ``PngInfo`` (``info``, or a new one) with ``meta`` as the ``fedface-scramble``
    text chunk, for callers that save the PNG themselves (``pnginfo=`` of ``Image.save``)."""
    info = info if info is not None else PngImagePlugin.PngInfo()
    info.add_text(META_KEY, _dumps(meta))
    return info


def save_scrambled(path: str | Path, image: np.ndarray, meta: dict) -> Path:
    """Write a scrambled image with its metadata, atomically, as PNG or TIFF (by suffix).

    Raises
    ------
    UserError
        When ``path``'s suffix is not a lossless format that carries the metadata
        (:func:`requires_lossless`).
    """
    path = Path(path)
    fmt = requires_lossless(path.suffix)
    im = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if fmt == "PNG":
        kwargs: dict[str, Any] = {"pnginfo": png_info(meta)}
    else:
        kwargs = {"description": _dumps(meta), "compression": "tiff_deflate"}
    return atomic_write(path, lambda fh: im.save(fh, format=fmt, **kwargs))


def _meta_of(im: Image.Image, what: str) -> dict | None:
    if im.format == "PNG":
        text = getattr(im, "text", {}).get(META_KEY)
    elif im.format == "TIFF":
        text = im.tag_v2.get(_TIFF_DESCRIPTION)
        if isinstance(text, str) and META_KEY not in text:
            text = None  # another program's description
    else:
        text = None
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != META_KEY:
        raise ScrambleError(f"{what}'s fedface scramble metadata is not readable (truncated or "
                            "edited): use the file fedface wrote")
    return meta


def _open(path: Path) -> tuple[np.ndarray, dict | None]:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im).copy(), _meta_of(im, str(path))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"{path} is not a readable image ({err})") from None


def read_meta(path: str | Path) -> dict | None:
    """The scramble metadata kept in the image file ``path``, ``None`` when it has none.

    Raises
    ------
    UserError
        When ``path`` is not a readable image, or its metadata is garbled.
    """
    return _open(Path(path))[1]


def restore_file(src: str | Path, dst: str | Path, key_path: str | Path, *, check: bool = True) -> Path:
    """Restore the scrambled image file ``src`` with the key file ``key_path`` into ``dst``.

    ``dst``'s format follows its suffix; it is written atomically, without the scramble
    metadata. Only a lossless ``dst`` (PNG, TIFF, BMP ...) keeps the restore exact.

    Raises
    ------
    UserError
        When ``src`` is not an image or carries no scramble metadata ("was not scrambled
        by fedface or its metadata was stripped"), the key file is missing, insecure or
        garbled, the key is the wrong one (a :class:`WrongKeyError` naming both key ids
        and the key file), the image was resized, cropped, converted or re-encoded after
        scrambling, or ``dst``'s format is unknown.
    """
    src, dst, key_path = Path(src), Path(dst), Path(key_path)
    image, meta = _open(src)
    if meta is None:
        raise ScrambleError(f"{src} was not scrambled by fedface or its metadata was stripped (no "
                            f"{META_KEY!r} PNG text chunk or TIFF description): restore needs the "
                            "file fedface wrote")
    with user_errors(ScrambleKeyError):
        key = load_key(key_path)
    try:
        restored = restore(image, meta, key, check=check, what=str(src))
    except WrongKeyError as err:
        raise WrongKeyError(f"{src} was scrambled with key {err.expected}; the key file {key_path} is "
                            f"key {err.got}: pass the key file it was scrambled with",
                            expected=err.expected, got=err.got) from None
    fmt = Image.registered_extensions().get(dst.suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the image format of {dst} from its suffix: use .png")
    im = Image.fromarray(restored)
    try:
        return atomic_write(dst, lambda fh: im.save(fh, format=fmt))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot write {dst} as {fmt} ({err}): use .png") from None


class Scramble:
    """The ``scramble`` method for :class:`~fedface.anonymize.pipeline.Anonymizer`:
    ``apply_meta`` returns the scrambled image and the metadata restoring it needs
    (written into the output file by :func:`save_scrambled`)."""

    name = "scramble"
    needs_landmarks = False
    batch = False
    keeps_face = False

    def __init__(self, key: bytes):
        self.key = key

    def apply_meta(self, image: np.ndarray, faces: Sequence[Box]) -> tuple[np.ndarray, dict]:
        return scramble(image, faces, self.key)

    def apply(self, image: np.ndarray, faces: Sequence[Box]) -> np.ndarray:
        return scramble(image, faces, self.key)[0]
