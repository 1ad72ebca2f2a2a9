"""What the study scripts (``experiments/*.py``) share: the preamble, their common arguments,
result files and figures. A study imports it before anything that loads torch::

    import _study  # experiments/ is on sys.path when a script runs

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set), as ``fedface`` does (see
``fedface.cli``): idle OpenMP threads sleep rather than spin, which on small shared machines
(2 cores, Ray actors beside the server) costs up to 4x in speed. It must happen before torch
loads OpenMP; Ray's workers inherit it.

- :func:`parser` / :func:`parse`: the first docstring line as description, ``--lfw`` first and
  ``--out`` (default ``experiments/results``) last around the study's own options;
  :func:`require_lfw` / :func:`has_lfw`.
- :func:`write_results`: ``<out>/<tag>.json`` and ``<out>/<tag>.md`` (atomically);
  :func:`previous` and :func:`changed_settings` for ``--append``.
- :func:`subplots` / :func:`save_figure`: matplotlib on the file-only Agg backend.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see above)

import argparse  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from fedface.io import atomic_write_text  # noqa: E402
from fedface.metrics import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent  # experiments/
RESULTS = HERE / "results"
DEFAULT_LFW = HERE.parent.parent / "shared" / "data" / "lfw"
FIGURE_DPI = 110


# --------------------------------------------------------------------------- arguments
def parser(doc: str, lfw_help: str | None = None) -> argparse.ArgumentParser:
    """A study's argument parser: described by the first line of its docstring ``doc``, with
    ``--lfw`` (default: the shared LFW tree) as first option."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help=lfw_help)
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Add the option every study ends with (``--out``, the results folder) and parse."""
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def has_lfw(lfw: Path) -> bool:
    """Whether ``lfw`` is an LFW tree with its development protocol files."""
    return (Path(lfw) / "pairsDevTest.txt").exists()


def require_lfw(lfw: Path, remedy: str = "pass --lfw PATH") -> None:
    """Stop the study (exit with a message saying what to do) when LFW is not at ``lfw``."""
    if not has_lfw(lfw):
        raise SystemExit(f"LFW not found at {lfw}: {remedy}")


# --------------------------------------------------------------------------- result files
def write_results(out: Path, tag: str, summary: dict, markdown: Callable[[dict], str]) -> str:
    """Write ``<out>/<tag>.json`` (the summary) and ``<out>/<tag>.md`` (``markdown(summary)``);
    returns the markdown."""
    write_json(Path(out) / f"{tag}.json", summary)
    text = markdown(summary)
    atomic_write_text(Path(out) / f"{tag}.md", text)
    return text


def previous(out: Path, tag: str) -> dict | None:
    """The result file ``<out>/<tag>.json`` of an earlier run (``--append``), or ``None``."""
    path = Path(out) / f"{tag}.json"
    return json.loads(path.read_text()) if path.exists() else None


def changed_settings(old: Mapping[str, Any], now: Mapping[str, Any],
                     defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """``{setting: (theirs, these)}`` for each setting of ``now`` that an earlier result file
    ``old`` has with another value (``defaults``: the value of a setting older files lack)."""
    defaults = defaults or {}
    theirs = {k: old.get(k, defaults.get(k)) for k in now}
    return {k: (theirs[k], v) for k, v in now.items() if theirs[k] != v}


# --------------------------------------------------------------------------- figures
def subplots(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` on the Agg backend (studies write files, show nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> None:
    """Lay out, write (PNG, :data:`FIGURE_DPI`) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
