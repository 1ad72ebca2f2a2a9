"""Face data sets on disk: LFW, ORL/AT&T, or any ``root/<identity>/*.jpg`` folder tree.

:func:`load_dataset` detects the layout and returns a :class:`FaceDataset` (paths and integer
labels; no pixels are read: use :func:`~fedface.data.images.load_image` or
:class:`~fedface.data.align.FaceAligner` for that). Scanning never stops on a bad entry: empty
identity folders, non-image and hidden files are recorded in the :class:`DataReport` and counted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import IMAGE_EXTENSIONS
from .pairs import _LFW_IMAGE_DIRS, read_people
from .report import DataReport

__all__ = [
    "DataSource",
    "FaceDataset",
    "detect_layout",
    "find_images_root",
    "is_prealigned",
    "load_dataset",
    "natural_key",
    "resolve_source",
    "scan_identity_folder",
]

_EXPECTED = "root/<identity>/*.jpg (one folder per person holding that person's images)"
_ORL_DIR = re.compile(r"^s\d+$")
# LFW's development protocol, used when a run names no training list or pair file of its own.
_LFW_TRAIN_PEOPLE = "peopleDevTrain.txt"
_LFW_TEST_PAIRS = "pairsDevTest.txt"
_PREALIGNED_MARKER = "SYNTHETIC.md"  # written by fedface.data.synthetic.write_identity_folder


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically (``s2`` < ``s10``, ``2.pgm`` < ``10.pgm``)."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", name)
        if part
    )


@dataclass
class FaceDataset:
    """Image paths with integer labels; ``identities[label]`` is the person's name.

    ``labels`` index into ``identities``; :meth:`subset` keeps that label space (so subsets of one
    data set stay comparable), :meth:`compact` and :meth:`filter_min_images` relabel to
    ``0..k-1``.
    """

    root: Path
    paths: list[Path]
    labels: np.ndarray
    identities: list[str]
    layout: str

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.paths = [Path(p) for p in self.paths]
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.identities = [str(i) for i in self.identities]
        if len(self.paths) != len(self.labels):
            raise ValueError(
                f"FaceDataset: {len(self.paths)} paths but {len(self.labels)} labels"
            )
        if self.labels.size and (
            self.labels.min() < 0 or self.labels.max() >= len(self.identities)
        ):
            raise ValueError(
                f"FaceDataset: labels must lie in [0, {len(self.identities)}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_identities(self) -> int:
        """The size of the label space (``len(identities)``)."""
        return len(self.identities)

    def subset(self, indices: Sequence[int] | np.ndarray) -> FaceDataset:
        """The images at ``indices`` (ints or a bool mask), same identities and labels."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"bool mask of shape {idx.shape} for {len(self)} images")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset index out of range for {len(self)} images")
        return FaceDataset(
            self.root, [self.paths[i] for i in idx], self.labels[idx].copy(),
            list(self.identities), self.layout,
        )

    def by_identity(self) -> dict[int, np.ndarray]:
        """``{label: indices of its images}`` for every label present, in label order."""
        order = np.argsort(self.labels, kind="stable")
        labels = self.labels[order]
        uniq, starts = np.unique(labels, return_index=True)
        ends = list(starts[1:]) + [len(labels)]
        return {int(u): order[s:e] for u, s, e in zip(uniq, starts, ends, strict=True)}

    def compact(self) -> FaceDataset:
        """Drop identities without images and relabel to ``0..k-1`` (order kept)."""
        present = np.unique(self.labels)
        remap = np.full(len(self.identities), -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        return FaceDataset(
            self.root, list(self.paths), remap[self.labels],
            [self.identities[i] for i in present], self.layout,
        )

    def filter_min_images(self, k: int) -> FaceDataset:
        """Only identities with at least ``k`` images, relabelled to ``0..n-1``."""
        counts = np.bincount(self.labels, minlength=len(self.identities))
        return self.subset(counts[self.labels] >= k).compact()

    def counts(self) -> np.ndarray:
        """Images per label (length ``num_identities``)."""
        return np.bincount(self.labels, minlength=len(self.identities))

    def __repr__(self) -> str:
        return (
            f"FaceDataset(layout={self.layout!r}, root={str(self.root)!r}, "
            f"images={len(self)}, identities={self.num_identities})"
        )


def _is_orl(root: Path) -> bool:
    try:
        dirs = [d for d in root.iterdir() if d.is_dir() and _ORL_DIR.match(d.name)]
    except OSError:
        return False
    if not dirs:
        return False
    return any(f.suffix.lower() == ".pgm" for d in dirs[:3] for f in d.iterdir())


def detect_layout(root: str | Path) -> str:
    """``"lfw"`` (has ``pairs.txt`` or an ``lfw-deepfunneled``/``lfw`` subfolder), ``"orl"``
    (``s1``..``s40`` folders of ``.pgm``) or ``"folder"`` (anything else: identity folders)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist; expected {_EXPECTED}")
    if (root / "pairs.txt").is_file() or any((root / d).is_dir() for d in _LFW_IMAGE_DIRS):
        return "lfw"
    if _is_orl(root):
        return "orl"
    return "folder"


def find_images_root(root: str | Path) -> Path:
    """The folder holding the identity folders: for LFW its ``lfw-deepfunneled`` (or ``lfw``)
    subfolder, otherwise ``root`` itself."""
    root = Path(root)
    return _images_root(root, detect_layout(root))


def _images_root(root: Path, layout: str) -> Path:
    if layout == "lfw":
        for sub in _LFW_IMAGE_DIRS:
            if (root / sub).is_dir():
                return root / sub
        raise FileNotFoundError(
            f"{root} has LFW protocol files but no image folder: expected "
            f"{root}/lfw-deepfunneled/<Name>/<Name>_0001.jpg"
        )
    return root


def is_prealigned(root: str | Path) -> bool:
    """Generated sets (``SYNTHETIC.md``) hold aligned face chips by construction: no detection."""
    return (Path(root) / _PREALIGNED_MARKER).exists()


@dataclass(frozen=True)
class DataSource:
    """A data set folder, looked at once by :func:`resolve_source`: what every reader needs.

    ``root`` is the folder as given (for LFW the tree holding the protocol files),
    ``layout`` its :func:`detect_layout`, ``images_root`` the folder holding the identity folders
    (:func:`find_images_root`), ``pair_files`` the evaluation pair files and ``people_file`` the
    training identity list (``None``: every identity), both resolved against ``root``;
    ``prealigned``: generated images, already face chips (:func:`is_prealigned`).
    """

    root: Path
    layout: str
    images_root: Path
    pair_files: tuple[Path, ...] = ()
    people_file: Path | None = None
    prealigned: bool = False

    @property
    def pairs_images_root(self) -> Path:
        """The folder the pair files' ``<name>/<name>_NNNN`` images are looked up in."""
        return self.root if self.prealigned else self.images_root


def resolve_source(
    root: str | Path,
    pair_files: Iterable[str | Path] = (),
    people_file: str | Path | None = None,
    *,
    protocol_defaults: bool = True,
    pairs_from: str | None = None,
) -> DataSource:
    """Look at the data set folder ``root`` once and describe it as a :class:`DataSource`.

    ``pair_files`` and ``people_file`` that do not exist as given and are relative are taken
    inside ``root``. With ``protocol_defaults``, an LFW tree without them uses its
    ``peopleDevTrain.txt`` and ``pairsDevTest.txt`` where present. Raises
    :class:`FileNotFoundError` when ``root`` is not a folder, a pair file does not exist (the
    message names ``pairs_from``, where the file was given, when set) or an LFW tree has no image
    folder. The people file is read later (:func:`load_dataset`), so its errors come from there.
    """
    root = Path(root)
    layout = detect_layout(root)
    people = Path(people_file).expanduser() if people_file else None
    pairs = [Path(p).expanduser() for p in pair_files]
    if protocol_defaults and layout == "lfw":
        if people is None and (root / _LFW_TRAIN_PEOPLE).exists():
            people = root / _LFW_TRAIN_PEOPLE
        if not pairs and (root / _LFW_TEST_PAIRS).exists():
            pairs = [root / _LFW_TEST_PAIRS]
    if people is not None and not people.is_absolute() and not people.exists():
        people = root / people
    pairs = [p if p.exists() or p.is_absolute() else root / p for p in pairs]
    for p in pairs:
        if not p.exists():
            raise FileNotFoundError(
                f"Pair file {p} does not exist" + (f" (from {pairs_from})" if pairs_from else "")
            )
    return DataSource(root, layout, _images_root(root, layout), tuple(pairs), people,
                      is_prealigned(root))


def scan_identity_folder(
    root: str | Path,
    report: DataReport | None = None,
    identities: Iterable[str] | None = None,
    min_images: int = 1,
    layout: str = "folder",
) -> FaceDataset:
    """Scan ``root/<identity>/*.<image ext>`` into a :class:`FaceDataset`.

    Identities and files are sorted naturally (``s2`` before ``s10``), so the result is
    deterministic. Only names are checked (use :func:`~fedface.data.images.load_image` to check
    contents). Recorded in ``report`` and skipped: ``"empty_identity"`` (no image in the folder),
    ``"not_an_image"`` (wrong extension, hidden file or sub-folder), ``"empty_file"`` (0 bytes),
    ``"missing_identity"`` (named in ``identities`` but absent). Counted: ``"images"``,
    ``"identities"``, ``"below_min_images"`` (identities dropped by ``min_images``).

    Raises :class:`FileNotFoundError` when ``root`` is missing and :class:`ValueError` when it has no
    identity folders or nothing is left.
    """
    root = Path(root)
    report = report if report is not None else DataReport()
    if not root.is_dir():
        raise FileNotFoundError(f"data set folder {root} does not exist; expected {_EXPECTED}")
    wanted = None if identities is None else list(dict.fromkeys(str(i) for i in identities))

    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: natural_key(e.name))
    folders = {
        e.name: Path(e.path)
        for e in entries
        if not e.name.startswith(".") and e.is_dir(follow_symlinks=True)
    }
    if not folders:
        raise ValueError(
            f"{root} has no identity folders; expected {_EXPECTED}"
            + (f" (found {len(entries)} other entries)" if entries else " (the folder is empty)")
        )

    if wanted is None:
        names = list(folders)
    else:
        names = []
        for name in wanted:
            if name in folders:
                names.append(name)
            else:
                report.add(
                    "missing_identity", root / name,
                    "identity listed but its folder does not exist; it is left out",
                )

    kept_names: list[str] = []
    paths: list[Path] = []
    labels: list[int] = []
    for name in names:
        files: list[Path] = []
        with os.scandir(folders[name]) as it:
            children = sorted(it, key=lambda e: natural_key(e.name))
        for child in children:
            child_path = Path(child.path)
            if child.name.startswith("."):
                report.add("not_an_image", child_path, "hidden file skipped")
                continue
            if child.is_dir(follow_symlinks=True):
                report.add(
                    "not_an_image", child_path,
                    f"sub-folder skipped: images must sit directly in {_EXPECTED}",
                )
                continue
            if Path(child.name).suffix.lower() not in IMAGE_EXTENSIONS:
                report.add(
                    "not_an_image", child_path,
                    "not an image file name (extension not in "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}); skipped",
                )
                continue
            try:
                size = child.stat(follow_symlinks=True).st_size
            except OSError as exc:
                report.add("unreadable_image", child_path, f"cannot stat ({exc}); skipped")
                continue
            if size == 0:
                report.add("empty_file", child_path, "empty file (0 bytes) skipped")
                continue
            files.append(child_path)
        if not files:
            report.add("empty_identity", folders[name], "identity folder holds no image; skipped")
            continue
        if len(files) < min_images:
            report.bump("below_min_images")
            continue
        label = len(kept_names)
        kept_names.append(name)
        paths.extend(files)
        labels.extend([label] * len(files))
        report.bump("images", len(files))
        report.bump("identities")

    if not kept_names:
        raise ValueError(
            f"no usable identity in {root} (min_images={min_images}"
            + (f", {len(wanted)} identities requested" if wanted is not None else "")
            + f"); expected {_EXPECTED}"
        )
    return FaceDataset(root, paths, np.asarray(labels, dtype=np.int64), kept_names, layout)


def load_dataset(
    root: str | Path | DataSource,
    people_file: str | Path | None = None,
    min_images: int = 1,
    report: DataReport | None = None,
) -> FaceDataset:
    """Load a data set folder (or an already resolved :class:`DataSource`) in its layout.

    ``people_file`` (e.g. LFW ``peopleDevTrain.txt``; a bare name is looked up in ``root``;
    default: the source's own) restricts the identities; for LFW, an identity whose image count
    differs from the file is recorded as ``"people_count_mismatch"``. See
    :func:`scan_identity_folder` for what is reported.
    """
    if isinstance(root, DataSource):
        source = root
        if people_file is None:
            people_file = source.people_file
    else:
        path = Path(root)
        layout = detect_layout(path)
        source = DataSource(path, layout, _images_root(path, layout))
    root, images_root = source.root, source.images_root
    report = report if report is not None else DataReport()
    people: dict[str, int] | None = None
    if people_file is not None:
        pf = Path(people_file)
        if not pf.exists() and not pf.is_absolute() and (root / pf).exists():
            pf = root / pf
        people = read_people(pf, report=report)
    dataset = scan_identity_folder(
        images_root, report=report, identities=None if people is None else list(people),
        min_images=min_images, layout=source.layout,
    )
    if people is not None:
        counts = dataset.counts()
        for label, name in enumerate(dataset.identities):
            if name in people and people[name] != counts[label]:
                report.add(
                    "people_count_mismatch", images_root / name,
                    f"the people file lists {people[name]} images but the folder has "
                    f"{counts[label]}",
                )
    dataset.root = root
    return dataset
