"""Turn a data source into what a federated run consumes.

:func:`prepare` resolves ``RunConfig.data`` (the generated synthetic set, an identity
folder, LFW or ORL), aligns every image once (cached by content), splits the training
identities across clients and writes, under ``<cache>/prepared/<key>/``:

- ``client_000.npz`` ... one file per institution: aligned training chips with local
  labels and its private validation split (what that institution would hold on disk);
- ``pairs_<name>.npz``: aligned chips of each evaluation pair file, as a :class:`PairSet`;
- ``report.json``: what was read, skipped and why.

A second call with the same settings reads ``report.json`` and returns at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedface.config import RunConfig
from fedface.data.align import AlignConfig, FaceAligner
from fedface.data.datasets import (
    DataSource,
    FaceDataset,
    detect_layout,
    is_prealigned,
    load_dataset,
    resolve_source,
)
from fedface.data.pairs import read_pairs
from fedface.data.partition import hold_out_images, partition_identities
from fedface.data.report import DataReport
from fedface.io import atomic_write, atomic_write_text

PREPARED_VERSION = "1"
Progress = Callable[[str, int, int], None]  # (step description, done, total)

# Synthetic default: identities after the training ones are held out for testing.
SYNTHETIC_TEST_IDENTITIES = 100


@dataclass
class PairSet:
    """Aligned images of an evaluation pair list.

    ``images[a[i]]`` and ``images[b[i]]`` form pair ``i``; ``same[i]`` says whether they
    show one person; ``folds[i]`` is the protocol fold (LFW: 10 folds of 600).
    """

    name: str
    images: np.ndarray
    a: np.ndarray
    b: np.ndarray
    same: np.ndarray
    folds: np.ndarray

    def __len__(self) -> int:
        return len(self.same)

    def save(self, path: Path) -> None:
        _atomic_savez(path, name=np.array(self.name), images=self.images, a=self.a,
                      b=self.b, same=self.same, folds=self.folds)

    @classmethod
    def load(cls, path: Path) -> PairSet:
        with np.load(path) as z:
            return cls(str(z["name"]), z["images"], z["a"], z["b"], z["same"], z["folds"])


@dataclass
class ClientData:
    """What one institution holds: training chips, local labels, validation split, and
    (with ``holdout-images``) held-out images of its training identities, never trained
    on: the non-members of record-level membership audits."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_holdout: np.ndarray | None = None
    y_holdout: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1 if len(self.y_train) else 0

    def save(self, path: Path) -> None:
        extra = ({"x_holdout": self.x_holdout, "y_holdout": self.y_holdout}
                 if self.x_holdout is not None else {})
        _atomic_savez(path, x_train=self.x_train, y_train=self.y_train,
                      x_val=self.x_val, y_val=self.y_val, **extra)

    @classmethod
    def load(cls, path: str | Path) -> ClientData:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"Client data file {path} is missing: run `fedface prepare` (or any "
                "`fedface train`) with the same settings to create it"
            )
        with np.load(path) as z:
            held = (z["x_holdout"], z["y_holdout"]) if "x_holdout" in z.files else (None, None)
            return cls(z["x_train"], z["y_train"], z["x_val"], z["y_val"], *held)


@dataclass
class PreparedData:
    """Paths and a summary of a prepared federation."""

    root: Path
    client_files: list[Path]
    pair_files: list[Path]
    summary: dict = field(default_factory=dict)

    def load_client(self, k: int, cfg: RunConfig | None = None) -> ClientData:
        """Institution ``k``'s data; anonymized (once, cached) when ``cfg.anonymize`` says so."""
        if cfg is not None and cfg.anonymize != "none":
            from fedface.anonymize.chips import anonymized_client_data
            return anonymized_client_data(self.client_files[k], cfg)
        return ClientData.load(self.client_files[k])

    def load_pairsets(self) -> list[PairSet]:
        return [PairSet.load(p) for p in self.pair_files]

    def load_pooled(self, cfg: RunConfig | None = None) -> ClientData:
        """All clients' data with globally unique labels (centralized training).

        An institution that cannot anonymize its images as ``cfg`` asks (K-Same with
        fewer than k of them) contributes nothing, never its raw images; the summary lists
        it under ``anonymize_excluded``."""
        from fedface.anonymize.ksame import NotEnoughFacesError

        xs, ys, xv, yv, offset = [], [], [], [], 0
        for k in range(len(self.client_files)):
            try:
                c = self.load_client(k, cfg)
            except NotEnoughFacesError as err:
                self.summary.setdefault("anonymize_excluded", []).append(
                    {"institution": k, "reason": str(err)})
                continue
            xs.append(c.x_train)
            ys.append(c.y_train + offset)
            xv.append(c.x_val)
            yv.append(c.y_val + offset + 100_000)  # val identities never share train labels
            offset += c.num_classes
        return ClientData(np.concatenate(xs), np.concatenate(ys), np.concatenate(xv),
                          np.concatenate(yv))


def _atomic_savez(path: Path, **arrays) -> None:
    atomic_write(path, lambda fh: np.savez(fh, **arrays), suffix=".tmp.npz")


def local_labels(labels: np.ndarray) -> np.ndarray:
    """Re-index identity labels to 0..K-1 (a client's head knows only its people)."""
    _, inv = np.unique(labels, return_inverse=True)
    return inv.astype(np.int64)


# --------------------------------------------------------------------------- sources
def make_aligner(cfg: RunConfig, source: DataSource | Path) -> FaceAligner:
    """The aligner for a source: dlib detection, or resize only for generated data."""
    if isinstance(source, DataSource):
        prealigned, layout = source.prealigned, source.layout
    else:
        prealigned = is_prealigned(source)
        layout = "" if prealigned else detect_layout(source)
    if prealigned:
        return ChipResizer(AlignConfig(size=cfg.image_size, policy=cfg.align_policy))
    acfg = AlignConfig.for_layout(layout, size=cfg.image_size, policy=cfg.align_policy)
    return FaceAligner(acfg, cfg.cache_path)


class ChipResizer:
    """Aligner for pre-aligned images: read and resize (same interface as FaceAligner)."""

    def __init__(self, config: AlignConfig):
        self.config = config

    def align_files(self, paths, report: DataReport | None = None, progress=None):
        import cv2

        from fedface.data.images import ImageError, load_image

        size = self.config.size
        chips = np.zeros((len(paths), size, size, 3), np.uint8)
        keep = np.zeros(len(paths), bool)
        statuses = []
        for i, p in enumerate(paths):
            try:
                img = load_image(p)
            except ImageError as err:
                if report is not None:
                    report.add("unreadable_image", str(p), str(err))
                statuses.append("unreadable")
            else:
                if img.shape[:2] != (size, size):
                    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
                chips[i] = img
                keep[i] = True
                statuses.append("prealigned")
                if report is not None:
                    report.bump("prealigned")
            if progress is not None:
                progress(i + 1)
        return chips, keep, statuses


def _synthetic_config(cfg: RunConfig):
    """The generator settings of a run and the folder they are written to."""
    from fedface.data import synthetic as syn

    total = cfg.synthetic_identities + SYNTHETIC_TEST_IDENTITIES
    scfg = syn.SyntheticConfig(
        num_identities=total, images_per_identity=cfg.synthetic_images,
        size=cfg.image_size, seed=cfg.seed,
    )
    # Keyed by every generator setting and version: a changed generator never meets an
    # old folder (write_identity_folder refuses to mix them).
    key = hashlib.sha256(json.dumps([syn.GENERATOR_VERSION, scfg.to_dict()],
                                    sort_keys=True).encode()).hexdigest()[:12]
    return scfg, cfg.cache_path / "synthetic" / f"n{total}-k{cfg.synthetic_images}-s{cfg.image_size}-{key}"


def synthetic_root(cfg: RunConfig) -> tuple[Path, Path]:
    """Write (once) the generated default set; returns (images root, pairs file)."""
    from fedface.data import synthetic as syn

    total = cfg.synthetic_identities + SYNTHETIC_TEST_IDENTITIES
    scfg, root = _synthetic_config(cfg)
    syn.write_identity_folder(root, scfg)
    pairs_file = root / "pairs_heldout.txt"
    if not pairs_file.exists():
        # Held-out identities (never trained on) make the 10-fold test protocol.
        labels = np.repeat(np.arange(cfg.synthetic_identities, total), cfg.synthetic_images)
        names = [syn.identity_name(int(i)) for i in labels]
        pairs = syn.make_pairs(labels, num_folds=10, pairs_per_fold=50, seed=cfg.seed)
        syn.write_pairs_file(pairs_file, pairs, names)
    return root, pairs_file


def resolve_run_source(cfg: RunConfig) -> DataSource:
    """The configured source (``RunConfig.data``, ``pairs``, ``train_people``), resolved once:
    the generated set (written on first use) or a data set folder (see
    :func:`~fedface.data.datasets.resolve_source`)."""
    if cfg.data == "synthetic":
        root, pairs_file = synthetic_root(cfg)
        # The generated pairs, or the given files as they are (not looked up in the root).
        return dataclasses.replace(
            resolve_source(root, protocol_defaults=False),
            pair_files=tuple(Path(p) for p in cfg.pair_files) or (pairs_file,))
    root = Path(cfg.data).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"Data folder {root} does not exist: give an identity folder "
            "(root/<identity>/*.jpg), an LFW tree or the ORL folder, or use --data synthetic"
        )
    return resolve_source(root, cfg.pair_files, cfg.train_people or None, pairs_from="--pairs")


# --------------------------------------------------------------------------- prepare
def prepare(cfg: RunConfig, progress: Progress | None = None, force: bool = False) -> PreparedData:
    """Align, partition and write the data of a run (cached; see module docstring)."""
    out = cfg.cache_path / "prepared" / cfg.data_key()
    done = out / "report.json"
    if done.exists() and not force:
        meta = json.loads(done.read_text())
        # A prepared synthetic federation is only reused for the generator folder it was
        # made from (an older generator's partitions would otherwise linger).
        same_source = (cfg.data != "synthetic"
                       or meta.get("summary", {}).get("root") == str(_synthetic_config(cfg)[1]))
        if meta.get("version") == PREPARED_VERSION and same_source:
            return PreparedData(out, [out / f for f in meta["client_files"]],
                                [out / f for f in meta["pair_files"]], meta["summary"])
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()
    report = DataReport()
    source = resolve_run_source(cfg)
    aligner = make_aligner(cfg, source)

    # --- evaluation pairs (read first: their identities leave the training set)
    pairsets_raw = []
    for pf in source.pair_files:
        pairs = read_pairs(pf, source.pairs_images_root, report=report)
        if not pairs:
            raise ValueError(f"Pair file {pf} gave no usable pairs; see the report above")
        pairsets_raw.append((pf, pairs))

    dataset = load_dataset(source, min_images=cfg.min_images, report=report)
    if cfg.data == "synthetic":
        keep = dataset.labels < _label_of(dataset, f"id_{cfg.synthetic_identities:05d}")
        dataset = dataset.subset(np.flatnonzero(keep))
    test_names = {p.a.parent.name for _, ps in pairsets_raw for p in ps} | {
        p.b.parent.name for _, ps in pairsets_raw for p in ps}
    if test_names and source.people_file is None and cfg.data != "synthetic":
        # No explicit training list: keep evaluation identities out of training.
        keep = [i for i, lab in enumerate(dataset.labels)
                if dataset.identities[lab] not in test_names]
        report.bump("train_images_dropped_as_test_identity", len(dataset.labels) - len(keep))
        dataset = dataset.subset(np.array(keep, dtype=int))
    if not pairsets_raw:
        dataset, heldout = _hold_out_identities(dataset, cfg.seed)
        pairsets_raw.append((Path("heldout"), heldout))

    if len(dataset.labels) == 0:
        raise ValueError(
            f"No training images left in {source.root}: every identity is used by the evaluation "
            "pairs or was dropped (see the report). Give a training list (--train-people) "
            "or pair files that name other identities"
        )

    # --- align training images
    chips, ok = _align(aligner, dataset.paths, report, progress, "Aligning training faces")
    dataset = dataset.subset(np.flatnonzero(ok))
    chips = chips[ok]
    dataset, chips = _min_images(dataset, chips, cfg.min_images, report)

    # --- partition
    n_clients = cfg.num_clients
    splits = partition_identities(dataset.labels, n_clients, cfg.partition, cfg.partition_alpha,
                                  cfg.val_fraction, cfg.seed)
    client_files, clients_summary = [], []
    for s in splits:
        train, held = s.train, None
        if cfg.holdout_images > 0:
            train, held = hold_out_images(dataset.labels, s.train, cfg.holdout_images,
                                          cfg.seed * 1000 + s.client_id)
        ids = np.unique(dataset.labels[train])  # the head's classes, in label order
        cd = ClientData(chips[train], local_labels(dataset.labels[train]),
                        chips[s.val], local_labels(dataset.labels[s.val]))
        if held is not None:
            cd.x_holdout = chips[held]
            cd.y_holdout = np.searchsorted(ids, dataset.labels[held]).astype(np.int64)
        path = out / f"client_{s.client_id:03d}.npz"
        cd.save(path)
        client_files.append(path.name)
        clients_summary.append({"client": s.client_id, "train_images": len(train),
                                "train_identities": cd.num_classes,
                                "val_images": len(s.val),
                                "val_identities": len(np.unique(cd.y_val)),
                                **({"holdout_images": len(held)} if held is not None else {})})

    # --- evaluation pair sets
    pair_files = []
    for pf, pairs in pairsets_raw:
        ps = build_pairset(pf, pairs, aligner, report, progress)
        path = out / f"pairs_{ps.name}.npz"
        ps.save(path)
        pair_files.append(path.name)

    summary = {
        "source": str(cfg.data), "root": str(source.root),
        "layout": "synthetic" if cfg.data == "synthetic" else source.layout,
        "train_identities": len(np.unique(dataset.labels)),
        "train_images": len(dataset.labels),
        "clients": clients_summary, "pair_sets": [p.removeprefix("pairs_").removesuffix(".npz")
                                                  for p in pair_files],
        "report": report.to_dict(), "prepare_seconds": round(time.time() - t0, 2),
    }
    meta = {"version": PREPARED_VERSION, "client_files": client_files,
            "pair_files": pair_files, "summary": summary}
    atomic_write_text(done, json.dumps(meta, indent=1))
    return PreparedData(out, [out / f for f in client_files], [out / f for f in pair_files],
                        summary)


def _label_of(ds: FaceDataset, name: str) -> int:
    return ds.identities.index(name) if name in ds.identities else len(ds.identities)


def _align(aligner, paths, report, progress, what):
    total = len(paths)
    cb = (lambda i: progress(what, i, total)) if progress else None
    chips, ok, _ = aligner.align_files(list(paths), report=report, progress=cb)
    return chips, np.asarray(ok, bool)


def _min_images(ds: FaceDataset, chips: np.ndarray, k: int, report: DataReport):
    counts = np.bincount(ds.labels, minlength=ds.num_identities)
    keep = counts[ds.labels] >= k
    dropped = int((counts[(counts > 0)] < k).sum())
    if dropped:
        report.bump(f"identities_with_fewer_than_{k}_images_dropped", dropped)
    idx = np.flatnonzero(keep)
    return ds.subset(idx), chips[idx]


def _hold_out_identities(ds: FaceDataset, seed: int, fraction: float = 0.2):
    """Identity-disjoint test split with 10-fold pairs, for sources without pair files."""
    from fedface.data.pairs import Pair
    from fedface.data.partition import verification_pairs

    rng = np.random.default_rng(seed + 1)
    ids = np.unique(ds.labels)
    n_test = max(2, int(round(fraction * len(ids))))
    test_ids = rng.choice(ids, size=n_test, replace=False)
    is_test = np.isin(ds.labels, test_ids)
    test_idx = np.flatnonzero(is_test)
    a, b, same = verification_pairs(ds.labels[test_idx], max_pairs=1000, seed=seed)
    order = rng.permutation(len(a))
    folds = np.zeros(len(a), int)
    folds[order] = np.arange(len(a)) % 10
    pairs = [Pair(ds.paths[test_idx[i]], ds.paths[test_idx[j]], bool(s), int(f))
             for i, j, s, f in zip(a, b, same, folds)]
    return ds.subset(np.flatnonzero(~is_test)), pairs


def build_pairset(pf: Path, pairs, aligner, report, progress) -> PairSet:
    """Align the images of ``pairs`` once each and index the pairs into them.

    Pairs with an unreadable image are dropped and counted in ``report``.
    """
    uniq = sorted({p.a for p in pairs} | {p.b for p in pairs})
    chips, ok = _align(aligner, uniq, report, progress, f"Aligning {pf.name} faces")
    index = {p: i for i, p in enumerate(uniq)}
    usable = [p for p in pairs if ok[index[p.a]] and ok[index[p.b]]]
    if len(usable) < len(pairs):
        report.bump("pairs_dropped_unreadable_image", len(pairs) - len(usable))
    name = pf.stem if pf.name != "heldout" else "heldout"
    folds = np.array([p.fold for p in usable], int)
    if len(np.unique(folds)) == 1:
        # One-fold protocols (pairsDevTest.txt): choose the threshold by 10-fold
        # cross-validation rather than on the test pairs themselves.
        folds = np.arange(len(usable)) % 10
    return PairSet(
        name, chips,
        np.array([index[p.a] for p in usable]), np.array([index[p.b] for p in usable]),
        np.array([p.same for p in usable], bool), folds,
    )
