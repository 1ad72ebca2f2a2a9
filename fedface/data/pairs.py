"""Read the LFW protocol files: ``pairs*.txt`` (verification pairs) and ``people*.txt`` (identities).

Formats (from the LFW README; fields separated by any whitespace):

- ``pairs.txt`` (View 2): header ``10 300``, then for each of the 10 folds 300 matched lines
  ``name n1 n2`` followed by 300 mismatched lines ``name1 n1 name2 n2``.
- ``pairsDevTrain.txt`` / ``pairsDevTest.txt`` (View 1): header ``1100`` / ``500``, then one fold of
  N matched and N mismatched lines.
- ``people.txt``: the number of folds, then per fold a count line followed by that many
  ``name n_images`` lines. ``peopleDevTrain.txt`` / ``peopleDevTest.txt``: one count line then the
  lines.

Image ``n`` of ``name`` is ``images_root/name/name_%04d.<ext>``, with ``ext`` auto-detected.

Error discipline: a malformed line raises :class:`PairFileError` (``file:line: ...``) when
``strict=True``; by default it is recorded in the :class:`DataReport` (with its line) and skipped.
A pair naming a missing image is recorded as ``"missing_image"`` and skipped. A missing file or an
unreadable header always raises, before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS
from .report import DataReport

__all__ = [
    "Pair",
    "PairFileError",
    "pair_image_path",
    "read_pairs",
    "read_people",
    "read_people_folds",
]

# Tried in this order when the extension is not given.
_EXT_ORDER = (".jpg", ".png", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")
# Where LFW keeps its images below the data set root.
_LFW_IMAGE_DIRS = ("lfw-deepfunneled", "lfw", "lfw_funneled", "lfw-funneled")


@dataclass(frozen=True)
class Pair:
    """Two images and whether they show the same person; ``fold`` is 0-based."""

    a: Path
    b: Path
    same: bool
    fold: int


class PairFileError(ValueError):
    """A malformed protocol file; the message starts with ``file:line:``."""

    def __init__(self, path: str | Path, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist: check the path")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} is not a file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.splitlines()


def _positive_int(token: str) -> int | None:
    try:
        value = int(token)
    except ValueError:
        return None
    return value if value > 0 else None


def _resolve_images_root(images_root: Path) -> Path:
    if not images_root.is_dir():
        raise FileNotFoundError(
            f"images folder {images_root} does not exist: pass the folder that holds "
            "<name>/<name>_0001.jpg (for LFW: lfw-deepfunneled/)"
        )
    for sub in _LFW_IMAGE_DIRS:
        if (images_root / sub).is_dir():
            return images_root / sub
    return images_root


def pair_image_path(images_root: str | Path, name: str, number: int, ext: str = ".jpg") -> Path:
    """``images_root/name/name_%04d<ext>`` (``ext`` with or without the dot)."""
    ext = ext if ext.startswith(".") else f".{ext}"
    return Path(images_root) / name / f"{name}_{number:04d}{ext}"


class _ImageLocator:
    """Find ``name_%04d.<ext>``, learning the extension from the first image found."""

    def __init__(self, root: Path, ext: str | None):
        self.root = root
        if ext is not None:
            ext = ext.lower() if ext.startswith(".") else f".{ext.lower()}"
            if ext not in IMAGE_EXTENSIONS:
                raise ValueError(
                    f"unsupported image extension {ext!r}; use one of "
                    f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
                )
        self.fixed = ext is not None
        self.ext = ext

    def find(self, name: str, number: int) -> tuple[Path, bool]:
        if self.ext is not None:
            path = pair_image_path(self.root, name, number, self.ext)
            if path.is_file() or self.fixed:
                return path, path.is_file()
        for ext in _EXT_ORDER:
            path = pair_image_path(self.root, name, number, ext)
            if path.is_file():
                if self.ext is None:
                    self.ext = ext
                return path, True
        return pair_image_path(self.root, name, number, self.ext or ".jpg"), False


def _fail(
    report: DataReport, strict: bool, kind: str, path: Path, line: int | None, reason: str
) -> None:
    if strict:
        raise PairFileError(path, line, reason)
    report.add(kind, path, reason, line=line)


def read_pairs(
    pairs_file: str | Path,
    images_root: str | Path,
    report: DataReport | None = None,
    ext: str | None = None,
    strict: bool = False,
    check_images: bool = True,
) -> list[Pair]:
    """Read an LFW pairs file (``pairs.txt``, ``pairsDevTrain.txt``, ``pairsDevTest.txt``).

    ``images_root`` is the folder holding ``<name>/`` folders (the LFW root is accepted too: its
    ``lfw-deepfunneled``/``lfw`` subfolder is used). ``ext`` fixes the image extension (default:
    auto-detected). Folds are 0-based and taken from the line's position, as in the protocol.

    Problems, recorded in ``report`` (kind, file, line) and skipped unless ``strict``:
    ``"malformed_pair_line"``, ``"pair_count_mismatch"``; always recorded and skipped:
    ``"missing_image"`` (when ``check_images``). Kept pairs are counted as ``"pairs_same"`` and
    ``"pairs_different"``. Raises :class:`FileNotFoundError` for a missing file or images folder
    and :class:`PairFileError` for an unreadable header.
    """
    pairs_file = Path(pairs_file)
    report = report if report is not None else DataReport()
    lines = _read_lines(pairs_file, "pairs")
    root = _resolve_images_root(Path(images_root)) if check_images else Path(images_root)
    locator = _ImageLocator(root, ext)

    numbered = [(i + 1, ln.split()) for i, ln in enumerate(lines)]
    numbered = [(n, toks) for n, toks in numbered if toks]
    if not numbered:
        raise PairFileError(pairs_file, 1, "empty pairs file: expected a header such as '10 300'")
    header_line, header = numbered[0]
    counts = [_positive_int(t) for t in header]
    if len(header) not in (1, 2) or any(c is None for c in counts):
        raise PairFileError(
            pairs_file,
            header_line,
            f"bad header {' '.join(header)!r}: expected '<folds> <pairs per fold>' (pairs.txt: "
            "'10 300') or '<pairs>' (pairsDevTrain.txt: '1100')",
        )
    n_folds, per_fold = (1, counts[0]) if len(counts) == 1 else (counts[0], counts[1])
    assert n_folds is not None and per_fold is not None
    block = 2 * per_fold
    expected = n_folds * block
    body = numbered[1:]

    pairs: list[Pair] = []
    for index, (line_no, toks) in enumerate(body):
        if index >= expected:
            _fail(
                report, strict, "pair_count_mismatch", pairs_file, line_no,
                f"{len(body)} pair lines but the header promises {n_folds} x 2 x {per_fold} = "
                f"{expected}; lines from here on are ignored",
            )
            break
        fold, pos = divmod(index, block)
        want_same = pos < per_fold
        shown = " ".join(toks)
        if len(toks) == 3:
            name_a, name_b = toks[0], toks[0]
            num_a, num_b = _positive_int(toks[1]), _positive_int(toks[2])
            same = True
        elif len(toks) == 4:
            name_a, name_b = toks[0], toks[2]
            num_a, num_b = _positive_int(toks[1]), _positive_int(toks[3])
            same = False
        else:
            _fail(
                report, strict, "malformed_pair_line", pairs_file, line_no,
                f"{len(toks)} fields in {shown!r}: expected 'name n1 n2' (same person) or "
                "'name1 n1 name2 n2' (different people)",
            )
            continue
        if num_a is None or num_b is None:
            _fail(
                report, strict, "malformed_pair_line", pairs_file, line_no,
                f"image numbers must be positive integers in {shown!r}",
            )
            continue
        if not same and name_a == name_b:
            _fail(
                report, strict, "malformed_pair_line", pairs_file, line_no,
                f"a different-people line names the same person twice: {shown!r}",
            )
            continue
        if same != want_same:
            kind = "same-person ('name n1 n2')" if want_same else "different-people"
            _fail(
                report, strict, "malformed_pair_line", pairs_file, line_no,
                f"expected a {kind} line here (fold {fold + 1}, pair {pos % per_fold + 1} of "
                f"the {'matched' if want_same else 'mismatched'} block), got {shown!r}",
            )
            continue
        if check_images:
            path_a, ok_a = locator.find(name_a, num_a)
            path_b, ok_b = locator.find(name_b, num_b)
        else:
            path_a, ok_a = pair_image_path(root, name_a, num_a, locator.ext or ".jpg"), True
            path_b, ok_b = pair_image_path(root, name_b, num_b, locator.ext or ".jpg"), True
        if not (ok_a and ok_b):
            missing = ", ".join(str(p) for p, ok in ((path_a, ok_a), (path_b, ok_b)) if not ok)
            report.add(
                "missing_image", pairs_file,
                f"pair {shown!r} skipped: image not found: {missing}", line=line_no,
            )
            continue
        pairs.append(Pair(path_a, path_b, same, fold))
        report.bump("pairs_same" if same else "pairs_different")

    if len(body) < expected:
        last = body[-1][0] if body else header_line
        _fail(
            report, strict, "pair_count_mismatch", pairs_file, last,
            f"only {len(body)} pair lines but the header promises {n_folds} x 2 x {per_fold} = "
            f"{expected}: the file looks truncated",
        )
    return pairs


def read_people_folds(
    path: str | Path, report: DataReport | None = None, strict: bool = False
) -> list[dict[str, int]]:
    """Read an LFW people file as one ``{name: n_images}`` dict per fold.

    ``people.txt``: first line the number of folds, then per fold a count line and that many
    ``name n`` lines. ``peopleDevTrain.txt`` / ``peopleDevTest.txt``: one count line and the lines
    (one fold). Problems (recorded and skipped unless ``strict``): ``"malformed_people_line"``,
    ``"people_count_mismatch"``, ``"duplicate_identity"``.
    """
    path = Path(path)
    report = report if report is not None else DataReport()
    lines = _read_lines(path, "people")
    numbered = [(i + 1, ln.split()) for i, ln in enumerate(lines)]
    numbered = [(n, toks) for n, toks in numbered if toks]
    if not numbered:
        raise PairFileError(path, 1, "empty people file: expected a count line such as '4038'")
    first_line, first = numbered[0]
    first_count = _positive_int(first[0]) if len(first) == 1 else None
    if first_count is None:
        raise PairFileError(
            path, first_line,
            f"bad header {' '.join(first)!r}: expected a count (peopleDevTrain.txt: '4038') or "
            "the number of folds (people.txt: '10')",
        )
    rest = numbered[1:]
    multi = bool(rest) and len(rest[0][1]) == 1 and _positive_int(rest[0][1][0]) is not None
    n_folds = first_count if multi else 1

    # Each fold: (header line number, promised count, entries).
    folds: list[tuple[int, int, dict[str, int]]] = []
    if not multi:
        folds.append((first_line, first_count, {}))
    seen: dict[str, int] = {}
    for line_no, toks in rest:
        if len(toks) == 1 and _positive_int(toks[0]) is not None and multi:
            folds.append((line_no, int(toks[0]), {}))
            continue
        if len(toks) != 2 or _positive_int(toks[1]) is None:
            _fail(
                report, strict, "malformed_people_line", path, line_no,
                f"expected 'name n_images' (n a positive integer), got {' '.join(toks)!r}",
            )
            continue
        if not folds:  # pragma: no cover - multi implies a fold header came first
            continue
        name, n = toks[0], int(toks[1])
        if name in seen:
            _fail(
                report, strict, "duplicate_identity", path, line_no,
                f"{name!r} already listed at line {seen[name]}; the later entry is ignored",
            )
            continue
        seen[name] = line_no
        folds[-1][2][name] = n
        report.bump("people")

    for header_no, promised, entries in folds:
        if len(entries) != promised:
            _fail(
                report, strict, "people_count_mismatch", path, header_no,
                f"the count line promises {promised} people but {len(entries)} valid entries "
                "follow",
            )
    if len(folds) != n_folds:
        _fail(
            report, strict, "people_count_mismatch", path, first_line,
            f"the header promises {n_folds} folds but the file has {len(folds)}",
        )
    return [entries for _, _, entries in folds]


def read_people(
    path: str | Path, report: DataReport | None = None, strict: bool = False
) -> dict[str, int]:
    """Read an LFW people file (``people.txt``, ``peopleDevTrain.txt``, ``peopleDevTest.txt``) as
    ``{name: n_images}`` over all folds, in file order. See :func:`read_people_folds`."""
    merged: dict[str, int] = {}
    for fold in read_people_folds(path, report=report, strict=strict):
        merged.update(fold)
    return merged
