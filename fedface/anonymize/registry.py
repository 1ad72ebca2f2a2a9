"""The anonymization methods by name, with their presets and strength options.

``build_method("blur", preset="high", options={"strength": 0.3})`` returns a method object
with ``apply(image, faces) -> image`` (and ``apply_batch(images, faces)`` for methods that
need every face of a run at once, like K-Same). Presets are named ``low``, ``medium``
(default) and ``high``; an option given explicitly overrides the preset's value.
``fedface bench anonymize`` measures every preset (re-identification, detectability, image
quality, speed): the README's table comes from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedface.anonymize.boxes import Box

__all__ = ["METHODS", "PRESETS", "MethodInfo", "build_method", "parse_options"]

PRESETS = ("low", "medium", "high")


@dataclass(frozen=True)
class MethodInfo:
    """What a method is, its presets and options.

    Parameters
    ----------
    name : str
        ``--method`` value.
    summary : str
        One line for ``--help`` and the README.
    presets : dict
        ``low``/``medium``/``high`` -> option values.
    options : dict
        Option name -> what it does (its type is the preset value's).
    keeps_face : bool
        The output still shows a (different or perturbed) face that detectors find.
    needs_landmarks : bool
        Faces need 5-point landmarks (alignment).
    batch : bool
        Needs every face of the run at once (``apply_batch``).
    reversible : bool
        Restorable with a key.
    """

    name: str
    summary: str
    presets: dict[str, dict[str, Any]]
    options: dict[str, str]
    keeps_face: bool = False
    needs_landmarks: bool = False
    batch: bool = False
    reversible: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _same(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p: dict(values) for p in PRESETS}


METHODS: dict[str, MethodInfo] = {m.name: m for m in (
    MethodInfo("blur", "Gaussian blur, sigma relative to the face size",
               {"low": {"strength": 0.05}, "medium": {"strength": 0.1}, "high": {"strength": 0.2}},
               {"strength": "blur sigma as a fraction of the face size"}),
    MethodInfo("mosaic", "pixelation: the face becomes N blocks across",
               {"low": {"blocks": 12}, "medium": {"blocks": 8}, "high": {"blocks": 5}},
               {"blocks": "blocks across the face (fewer: coarser)"}),
    MethodInfo("mask", "a solid colour or an image over the face",
               _same({"color": "black"}),
               {"color": "fill colour: R,G,B, #rrggbb, black, white or grey",
                "image": "an image file pasted over each face instead of the colour"}),
    MethodInfo("dppix", "DP pixelization (Fan 2018): blocks of b px + Laplace(255 m / (b^2 eps))",
               {"low": {"b": 8, "epsilon": 1.0, "m": 16}, "medium": {"b": 12, "epsilon": 0.5, "m": 16},
                "high": {"b": 16, "epsilon": 0.1, "m": 16}},
               {"b": "block side in pixels", "epsilon": "privacy parameter per face",
                "m": "pixels two neighbouring faces may differ in"}, keeps_face=True),
    MethodInfo("ksame", "K-Same (Newton 2005): each face becomes the average of k faces of the run",
               {"low": {"k": 10}, "medium": {"k": 15}, "high": {"k": 25}},
               {"k": "faces averaged together (re-identification at most 1/k)"},
               keeps_face=True, needs_landmarks=True, batch=True),
    MethodInfo("cloak", "adversarial perturbation towards another identity under a DSSIM budget",
               {"low": {"budget": 0.004}, "medium": {"budget": 0.012}, "high": {"budget": 0.017}},
               {"budget": "DSSIM budget (Fawkes: 0.004 / 0.012 / 0.017)",
                "surrogate": "the fedface model (model.pt) the cloak is computed against"},
               keeps_face=True, needs_landmarks=True),
    MethodInfo("scramble", "key-reversible scrambling: the right key restores the face exactly",
               _same({}), {"key": "the key file (fedface keys scramble FILE makes one)"},
               reversible=True),
)}


def _number(value: Any, like: Any, key: str) -> Any:
    if isinstance(like, bool) or not isinstance(like, (int, float)):
        return value
    try:
        return type(like)(float(value)) if isinstance(like, int) and float(value).is_integer() \
            else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key}={value!r} is not a number") from None


def parse_options(text: str | dict | None) -> dict[str, Any]:
    """``"k=5,shape=box"`` -> ``{"k": "5", "shape": "box"}`` (values typed later)."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    out = {}
    for part in str(text).split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"option {part.strip()!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def resolve_options(name: str, preset: str = "medium",
                    options: str | dict | None = None) -> dict[str, Any]:
    """The preset's values with ``options`` applied, typed; unknown names refused."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    info = METHODS[name]
    values = dict(info.presets[preset])
    for key, value in parse_options(options).items():
        if key not in info.options and key != "shape":
            valid = ", ".join([*info.options, "shape"])
            raise ValueError(f"{name} has no option {key!r}: its options are {valid}")
        values[key] = _number(value, values.get(key), key)
    return values


def build_method(name: str, preset: str = "medium", options: str | dict | None = None,
                 *, shape: str = "ellipse", key: bytes | None = None,
                 load_image: Callable[[Path], np.ndarray] | None = None) -> Any:
    """A ready method object.

    Parameters
    ----------
    name, preset, options
        The method, its preset and explicit option overrides (see :data:`METHODS`).
    shape : str
        ``"ellipse"`` or ``"box"`` (overridden by an explicit ``shape`` option).
    key : bytes or None
        The scramble key (``scramble`` only).
    load_image : callable or None
        Reads the ``mask`` method's replacement image.
    """
    values = resolve_options(name, preset, options)
    shape = str(values.pop("shape", shape))
    if shape not in ("ellipse", "box"):
        raise ValueError(f"shape={shape!r}: use ellipse or box")
    if name == "blur":
        from fedface.anonymize.classic import Blur
        return Blur(strength=float(values["strength"]), shape=shape)
    if name == "mosaic":
        from fedface.anonymize.classic import Mosaic
        return Mosaic(blocks=int(values["blocks"]), shape=shape)
    if name == "mask":
        from fedface.anonymize.classic import Mask, parse_color
        image = None
        if values.get("image"):
            if load_image is None:
                from fedface.data.images import load_image as load_image
            image = load_image(Path(str(values["image"])))
        return Mask(color=parse_color(str(values.get("color", "black"))), image=image, shape=shape)
    if name == "dppix":
        from fedface.anonymize.dppix import DPPix
        return DPPix(b=int(values["b"]), epsilon=float(values["epsilon"]), m=int(values["m"]),
                     shape=shape if "shape" in parse_options(options) else "box")
    if name == "ksame":
        from fedface.anonymize.ksame import KSame, KSameConfig
        return KSame(KSameConfig(k=int(values["k"])))
    if name == "cloak":
        from fedface.anonymize.cloak import Cloak, CloakConfig
        if not values.get("surrogate"):
            raise ValueError("cloak needs the model it computes the perturbation against: "
                             "--opt surrogate=PATH/model.pt (a fedface model, e.g. a run's)")
        return Cloak.load(str(values["surrogate"]), CloakConfig(budget=float(values["budget"])))
    if name == "scramble":
        from fedface.anonymize.scramble import Scramble
        if key is None:
            raise ValueError("scramble needs a key: pass --key FILE (make one with "
                             "`fedface keys scramble FILE`, and keep it secret)")
        return Scramble(key)
    raise AssertionError(name)  # pragma: no cover - resolve_options refused it


def apply_batch(method: Any, images: Sequence[np.ndarray], faces: Sequence[Sequence[Box]]):
    """Every image anonymized: ``method.apply_batch`` where the method has one (it returns
    ``(images, report)``)."""
    if getattr(method, "batch", False):
        return method.apply_batch(list(images), [list(f) for f in faces])[0]
    return [method.apply(im, f) for im, f in zip(images, faces, strict=True)]
