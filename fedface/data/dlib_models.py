"""Find and load dlib's pretrained face models.

The model files ship in the ``face_recognition_models`` pip package, but importing that package
needs ``pkg_resources`` (gone from recent setuptools), so this module locates the files BY PATH with
:func:`importlib.util.find_spec` and never imports it. ``FEDFACE_DLIB_MODELS`` may name a folder
holding the same ``.dat`` files instead (e.g. on a machine without the package).

The loaders build a fresh dlib object on every call (no module globals): keep the returned object
yourself (e.g. as an attribute) when you need it more than once.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL_FILES",
    "load_cnn_detector",
    "load_detector",
    "load_face_recognition_model",
    "load_shape_predictor",
    "model_path",
    "models_dir",
]

_PACKAGE = "face_recognition_models"
_INSTALL_HINT = "install it with `pip install face-recognition-models` (the package that ships them)"

#: Model name -> file name inside ``face_recognition_models/models/``.
MODEL_FILES: dict[str, str] = {
    "shape_predictor_5": "shape_predictor_5_face_landmarks.dat",
    "shape_predictor_68": "shape_predictor_68_face_landmarks.dat",
    "resnet_recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "mmod_detector": "mmod_human_face_detector.dat",
}


def models_dir() -> Path:
    """The folder holding the ``.dat`` files (``$FEDFACE_DLIB_MODELS`` if set, else the
    ``models/`` folder of the installed ``face_recognition_models`` package).

    Raises :class:`FileNotFoundError` saying what to install when neither exists.
    """
    override = os.environ.get("FEDFACE_DLIB_MODELS")
    if override:
        folder = Path(override)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"FEDFACE_DLIB_MODELS={override!r} is not a folder: point it at a folder holding "
                f"{', '.join(sorted(MODEL_FILES.values()))}, or unset it and {_INSTALL_HINT}"
            )
        return folder
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the dlib model files were not found: the Python package {_PACKAGE!r} is not "
            f"installed; {_INSTALL_HINT}"
        )
    for location in locations:
        folder = Path(location) / "models"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"the package {_PACKAGE!r} is installed at {locations[0]} but has no models/ folder; "
        f"reinstall it: `pip install --force-reinstall face-recognition-models`"
    )


def model_path(name: str) -> Path:
    """The path of one model file: ``"shape_predictor_5"``, ``"shape_predictor_68"``,
    ``"resnet_recognition"`` or ``"mmod_detector"``.

    Raises :class:`ValueError` for an unknown name and :class:`FileNotFoundError` (saying which
    package to install) when the file is missing.
    """
    if name not in MODEL_FILES:
        raise ValueError(f"unknown dlib model {name!r}; choose one of {', '.join(MODEL_FILES)}")
    path = models_dir() / MODEL_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"dlib model file {path} is missing; {_INSTALL_HINT} "
            "(or `pip install --force-reinstall face-recognition-models` if it is damaged)"
        )
    return path


def _dlib() -> Any:
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - dlib-bin is a hard dependency
        raise ImportError(
            "dlib is not installed; install it with `pip install dlib-bin` (prebuilt wheels)"
        ) from exc
    return dlib


def load_detector() -> Any:
    """A new dlib HOG frontal face detector (``dlib.fhog_object_detector``; no model file)."""
    return _dlib().get_frontal_face_detector()


def load_shape_predictor(points: int = 5) -> Any:
    """A new ``dlib.shape_predictor`` with 5 (default, for alignment) or 68 landmarks."""
    if points not in (5, 68):
        raise ValueError(f"points must be 5 or 68, got {points!r}")
    return _dlib().shape_predictor(str(model_path(f"shape_predictor_{points}")))


def load_face_recognition_model() -> Any:
    """A new ``dlib.face_recognition_model_v1`` (ResNet, 128-d descriptors from 150x150 chips)."""
    return _dlib().face_recognition_model_v1(str(model_path("resnet_recognition")))


def load_cnn_detector() -> Any:
    """A new ``dlib.cnn_face_detection_model_v1`` (MMOD CNN detector; slow on CPU)."""
    return _dlib().cnn_face_detection_model_v1(str(model_path("mmod_detector")))
