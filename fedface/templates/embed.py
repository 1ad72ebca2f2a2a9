"""Embeddings to protect: from images (one face each) or from ``.npy`` files.

Two embedders:

- ``dlib``: dlib's 128-d ResNet matcher (``face-recognition-models``), which fedface did
  not train (:class:`fedface.anonymize.evaluate.DlibMatcher`);
- a fedface model (``--model run/model.pt``): the face is aligned the way training aligns
  it (dlib's 5-point chip at the model's input size, padding 0.25) and embedded by the
  saved backbone.

An image must hold exactly one face: none is refused, several are refused unless
``pick="largest"`` (the largest box is used). Embeddings are returned raw (the schemes
normalise them); they live in memory only and are never written by this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedface.templates.schemes import TemplateError, check_embeddings

__all__ = ["Embedder", "load_embedder", "read_embeddings"]

PICKS = ("one", "largest")


def read_embeddings(path: str | Path) -> np.ndarray:
    """The embeddings in a ``.npy`` file: ``(d,)`` or ``(n, d)`` floats, checked."""
    p = Path(path)
    try:
        a = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise TemplateError(f"{p} does not exist") from None
    except (OSError, ValueError) as err:
        raise TemplateError(f"{p} is not a .npy array of embeddings ({err}): save them with "
                            "numpy.save") from None
    if not np.issubdtype(a.dtype, np.number):
        raise TemplateError(f"{p} holds {a.dtype} values, not numbers: save float embeddings")
    check_embeddings(a, what=f"embedding in {p}")
    return np.atleast_2d(np.asarray(a, dtype=np.float64))


class Embedder:
    """Images to embeddings with dlib's matcher or a fedface model.

    Parameters
    ----------
    model : path, optional
        A ``model.pt`` written by ``fedface train``; ``None`` uses dlib's matcher.
    pick : {"one", "largest"}
        What to do with an image holding several faces: refuse it, or use the largest.
    """

    def __init__(self, model: str | Path | None = None, pick: str = "one") -> None:
        if pick not in PICKS:
            raise TemplateError(f"--pick {pick!r}: use one of {', '.join(PICKS)}")
        self.pick = pick
        self.model_path = Path(model) if model else None
        self._detector = None
        self._matcher = None
        self._backbone = None
        self._meta: dict = {}
        if self.model_path is not None:
            from fedface.models.io import load_backbone

            try:
                self._backbone, self._meta = load_backbone(self.model_path)
            except (FileNotFoundError, ValueError) as err:
                raise TemplateError(str(err)) from None

    @property
    def name(self) -> str:
        return f"model:{self.model_path}" if self.model_path else "dlib"

    @property
    def dim(self) -> int:
        return int(self._meta.get("embedding_size", 0)) if self.model_path else 128

    def _face(self, image: np.ndarray, where: str) -> np.ndarray:
        """The 5 landmarks of the one face (or the largest) in ``image``."""
        from fedface.anonymize.detect import DetectConfig, FaceDetector

        if self._detector is None:
            self._detector = FaceDetector(DetectConfig(box_scale=1.0, upsample=1))
        boxes = self._detector.detect(image)
        if not boxes:
            raise TemplateError(f"{where}: no face found; use a frontal photo with the face at "
                                "least 40 pixels wide, or pass an embedding (.npy)")
        if len(boxes) > 1 and self.pick != "largest":
            raise TemplateError(f"{where}: {len(boxes)} faces found; crop the image to the "
                                "subject, or pass --pick largest to use the largest face")
        box = max(boxes, key=lambda b: b.area)
        return self._detector.landmarks(image, [box])[0].landmarks

    def embed_image(self, image: np.ndarray, where: str = "image") -> np.ndarray:
        """The embedding (float64) of the one face in an RGB ``uint8`` image."""
        from fedface.anonymize.evaluate import DlibMatcher

        marks = self._face(image, where)
        if self._matcher is None:
            self._matcher = DlibMatcher()
        if self._backbone is None:
            return self._matcher.describe(image, marks)
        import dlib

        from fedface.data.align import AlignConfig
        from fedface.eval import embed

        size = int(self._meta["image_size"])
        shape = self._matcher.shape(image, marks)
        chip = np.asarray(dlib.get_face_chip(image, shape, size, AlignConfig().padding), np.uint8)
        return embed(self._backbone, chip[None])[0].astype(np.float64)

    def embed_file(self, path: str | Path) -> np.ndarray:
        """Embeddings ``(n, d)`` of a file: an image (one row) or a ``.npy`` file."""
        p = Path(path)
        if p.suffix.lower() == ".npy":
            a = read_embeddings(p)
            if self.dim and a.shape[1] != self.dim:
                raise TemplateError(f"{p} holds embeddings of dimension {a.shape[1]}, but the "
                                    f"embedder ({self.name}) makes {self.dim}: pass embeddings of "
                                    "the same embedder")
            return a
        from fedface.data.images import ImageError, load_image

        try:
            image = load_image(p)
        except FileNotFoundError:
            raise TemplateError(f"{p} does not exist") from None
        except (ImageError, OSError, ValueError) as err:
            raise TemplateError(f"{p} is not a readable image ({err}): pass a JPEG/PNG photo or "
                                "a .npy embedding") from None
        return self.embed_image(image, str(p))[None]

    def embed_files(self, paths, progress=None) -> np.ndarray:
        """Rows of every file, in order (``progress(done, total)`` after each file)."""
        rows = []
        for i, p in enumerate(paths):
            rows.append(self.embed_file(p))
            if progress is not None:
                progress(i + 1, len(paths))
        return np.concatenate(rows) if rows else np.zeros((0, self.dim))


def load_embedder(model: str | Path | None = None, embedder: str = "dlib", pick: str = "one"
                  ) -> Embedder:
    """The embedder a command asked for (``--embedder dlib`` or ``--model PATH``)."""
    if model is None and embedder != "dlib":
        raise TemplateError(f"--embedder {embedder!r}: use dlib, or pass --model run/model.pt")
    return Embedder(model, pick)
