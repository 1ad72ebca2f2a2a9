"""Run configuration: one dataclass, shared by the CLI, the ServerApp and the ClientApp.

Flower passes settings as a flat ``run_config`` of scalars with kebab-case keys
(``[tool.flwr.app.config]`` in ``pyproject.toml``, or ``flwr run . -c "rounds=10"``).
:class:`RunConfig` is the typed view of that dictionary: :meth:`RunConfig.from_run_config`
reads it (unknown keys are an error that lists the valid ones) and
:meth:`RunConfig.to_run_config` writes it back, so the CLI, the simulation and
``flwr run .`` all describe a run the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fedface.config.anonymize import anonymize_problems
from fedface.config.base import FlatConfig
from fedface.config.encryption import encryption_problems
from fedface.config.privacy import privacy_problems
from fedface.config.unlearnable import share_problems

DEFAULT_CACHE_ENV = "FEDFACE_CACHE"
# Names of server.strategies.STRATEGIES (a test keeps the two equal; the core does not
# import the server package).
STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadam", "fedprox", "pfm")
# Settings that change where and how a run is kept, not what any round computes.
OPERATIONAL_FIELDS = ("out", "cache_dir", "round_timeout", "eval_every", "pause_after", "resume",
                      "share_unlearnable")
# How updates travel, not what a round computes: masks cancel exactly in the sum, so a
# masked run computes what the unmasked run computes (same private seeds).
TRANSPORT_FIELDS = ("he_masks", "he_mask_threshold", "he_mask_degree")


def default_cache_dir() -> Path:
    """Where aligned chips, generated data and prepared partitions are cached.

    ``$FEDFACE_CACHE`` when set, else ``~/.cache/fedface``.
    """
    env = os.environ.get(DEFAULT_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedface"


@dataclass
class RunConfig(FlatConfig):
    """Everything that defines a training run.

    Parameters
    ----------
    data : str
        ``"synthetic"`` (the embedded, generated default) or a path to an identity
        folder (``root/<identity>/*.jpg``), an LFW tree or the ORL folder.
    train_people : str
        Optional identity list restricting training identities (e.g. LFW
        ``peopleDevTrain.txt``); empty for all identities of ``data``.
    pairs : str
        Comma-separated pair files for the final verification report (LFW format).
        Empty: the synthetic set's own pairs file, or held-out identities' pairs.
    min_images : int
        Identities with fewer training images are dropped.
    image_size : int
        Side of the aligned face chips (112 is the face-recognition standard).
    align_policy : str
        ``"fallback"`` (centre crop when no face is detected) or ``"skip"``.
    synthetic_identities, synthetic_images : int
        Size of the generated default set (training identities + images each).
    mode : str
        ``"federated"`` or ``"centralized"`` (same data and model, pooled).
    num_clients : int
        Simulated institutions.
    partition : str
        ``"dirichlet"``, ``"powerlaw"`` (identity-disjoint, skewed sizes) or ``"iid"``.
    partition_alpha : float
        Skew: Dirichlet concentration or power-law exponent.
    val_fraction : float
        Share of each client's identities kept as its private validation split.
    holdout_images : int
        Images of each training identity (with enough images) kept out of training:
        the non-members of record-level membership-inference audits (0: none).
    strategy : str
        Server aggregation strategy: ``fedavg``, ``fedavgm``, ``fedadam``, ``fedprox`` or
        ``pfm`` (partially federated momentum).
    pfm_beta : float
        PFM momentum coefficient.
    server_lr, server_momentum : float
        Server step size (FedAvgM, PFM) and FedAvgM's server momentum.
    fedadam_eta, fedadam_tau : float
        FedAdam's server learning rate and adaptivity.
    proximal_mu : float
        FedProx's proximal weight.
    fv : bool
        Federated validation: each round, try candidate client weightings and keep the one
        that scores best on the clients' private validation splits.
    fv_candidates : int
        Budget: candidate weightings scored per round (one extra exchange carrying them).
    max_update_ratio : float
        Replies whose update norm per local step exceeds this many times the round's
        median are excluded from aggregation.
    dp_epsilon : float
        Local DP-SGD (Opacus) on every client: the privacy budget epsilon each client may
        spend over ``dp_rounds`` rounds. 0 turns DP-SGD off.
    dp_delta : float
        Delta of that budget; 0 picks ``min(1e-5, 1/(10 N))`` for a client of N images.
    dp_clip : float
        Per-sample gradient clipping norm.
    dp_accountant : str
        ``"prv"`` (default, tighter) or ``"rdp"``.
    dp_rounds : int
        Rounds a client's budget is planned for (0: ``rounds``). A client declines
        rounds beyond its budget; its ledger persists across runs.
    dp_max_noise : float
        Refuse budgets that need a larger noise multiplier (steps would be mostly noise).
    dp_unit : str
        What the budget protects: ``image`` (record-level DP-SGD: each training image) or
        ``person`` (each person, with all their images: Poisson sampling of people, each
        sampled person contributes at most ``dp_person_images`` images to a step, clipped
        so that their sum is at most ``dp_clip``; ``batch_size`` then counts people).
        A face data set holds several images per person, and record-level DP bounds what
        is learnt about a person only by group privacy.
    dp_person_images : int
        ``dp_unit=person``: images a sampled person contributes to one step.
    dp_grad_sample_mode : str
        How per-sample clipping is computed: ``bk`` (book-keeping in one backward pass,
        fedface's own; falls back to ``hooks`` for layers it has no rule for), or Opacus'
        per-sample gradients: ``hooks``, ``ew`` or ``functorch``.
    central_dp : str
        Client-level DP of the federated backbone: ``off``, ``server-fixed`` or
        ``server-adaptive`` (Flower's server-side clipping wrappers; plaintext only), or
        ``client-fixed`` (clients clip and add their share of the noise; works with
        encrypted aggregation). Aggregation weights become uniform.
    central_dp_noise, central_dp_clip : float
        Noise multiplier and clipping norm (initial norm for ``server-adaptive``).
    he_keys : str
        Homomorphically encrypted aggregation: the key folder of ``fedface keys init``
        (the server reads only its ``server/`` bundle, clients their ``client/`` bundle;
        a node's ``he-keys`` node config overrides it). Empty: plaintext aggregation.
    he_bits : int
        Quantization bits per update value (stochastic rounding).
    he_clip : float
        Update values (after the client's weight pre-scaling) are clipped to
        ``[-he_clip, he_clip]`` before quantization.
    he_max_clients : int
        Most updates summed in one aggregate: sets the headroom bits of the packing.
    he_fv_bits : int
        With ``fv``: bits of the integer multipliers the server applies to updates to
        form each candidate weighting homomorphically.
    he_masks : bool
        With ``he_keys``: every institution masks its update before encrypting it, with
        masks that cancel only in the round's sum (pairwise masks and a self mask,
        removed by the server from Shamir shares; :mod:`crypto.masks`), so the server
        and one colluding institution (holding the shared BFV key) read no single
        update. ``false`` keeps the unmasked protocol.
    he_mask_threshold : float
        Shares needed to rebuild a mask secret:
        ``floor(he_mask_threshold * (holders + 1)) + 1`` of an institution's holders (its
        neighbours and itself); at least 0.5, where two disjoint groups of holders cannot
        both reach it even with one colluding holder counted in each.
    he_mask_degree : int
        Neighbours per institution in the masking graph (0: all up to 16 institutions,
        then ``2 ceil(2 log2 n)``: each institution's cost grows as ``log n``).
    anonymize : str
        Every institution anonymizes its own images before training (once, cached):
        ``none`` (default), ``blur``, ``mosaic``, ``mask``, ``dppix``, ``ksame`` or
        ``cloak`` (see ``fedface anonymize``).
    anonymize_preset : str
        ``low``, ``medium`` or ``high`` strength.
    anonymize_options : str
        Method options as ``key=value,...`` (e.g. ``k=10``; cloak needs
        ``surrogate=/path/model.pt``).
    share_unlearnable : str
        ``off`` (default), ``sample`` or ``class``: every institution also writes, once, a
        copy of its training images protected with error-minimizing noise (beside its
        data, ``<data>.unlearnable-<mode>/``) to hand over outside the federation; what it
        trains on is unchanged (see ``fedface unlearnable``).
    rounds, local_epochs : int
        Federated rounds and local epochs per round (centralized: rounds x local_epochs
        epochs).
    fraction_train, min_train_nodes : float, int
        Client sampling per round.
    backbone, head : str
        Registry names (see ``fedface models``).
    embedding_size : int
        Embedding dimension.
    batch_size, lr, momentum, weight_decay : ...
        Local SGD settings; the learning rate follows a cosine schedule over rounds.
    flip_tta : bool
        Add the horizontally flipped image's embedding at evaluation.
    eval_every : int
        Score the first evaluation pair set every this many rounds (and at the end).
    seed : int
        Seeds partitioning, initialisation and training.
    num_cpus_per_client : float
        Ray resources for each simulated client (2 cores: 1.0 runs two at once).
    round_timeout : float
        Seconds the server waits for replies in a round.
    pause_after : int
        Stop after this round, leaving the checkpoint for ``--resume`` (0: run to the
        end). For time-boxed machines, and to test that resuming changes nothing.
    resume : bool
        Continue the run checkpointed in ``out`` (``fedface train --resume``; under
        ``flwr run``, ``-c resume=true`` after a coordinator restart).
    out : str
        Output directory (``metrics.json``, ``model.pt``).
    cache_dir : str
        Cache for aligned chips and prepared partitions (default ``~/.cache/fedface``).
    """

    WHAT: ClassVar[str] = "run configuration"

    data: str = "synthetic"
    train_people: str = ""
    pairs: str = ""
    min_images: int = 2
    image_size: int = 64
    align_policy: str = "fallback"
    synthetic_identities: int = 320
    synthetic_images: int = 8
    mode: str = "federated"
    num_clients: int = 8
    partition: str = "dirichlet"
    partition_alpha: float = 1.0
    val_fraction: float = 0.15
    holdout_images: int = 0
    strategy: str = "fedavg"
    pfm_beta: float = 0.9
    server_lr: float = 1.0
    server_momentum: float = 0.9
    fedadam_eta: float = 0.01
    fedadam_tau: float = 0.001
    proximal_mu: float = 0.01
    fv: bool = False
    fv_candidates: int = 4
    max_update_ratio: float = 10.0
    dp_epsilon: float = 0.0
    dp_delta: float = 0.0
    dp_clip: float = 1.0
    dp_accountant: str = "prv"
    dp_rounds: int = 0
    dp_max_noise: float = 20.0
    dp_grad_sample_mode: str = "bk"
    dp_unit: str = "image"
    dp_person_images: int = 2
    central_dp: str = "off"
    central_dp_noise: float = 1.0
    central_dp_clip: float = 1.0
    he_keys: str = ""
    he_bits: int = 15
    he_clip: float = 0.5
    he_max_clients: int = 16
    he_fv_bits: int = 4
    he_masks: bool = True
    he_mask_threshold: float = 0.5
    he_mask_degree: int = 0
    anonymize: str = "none"
    anonymize_preset: str = "medium"
    anonymize_options: str = ""
    share_unlearnable: str = "off"
    rounds: int = 10
    local_epochs: int = 2
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    backbone: str = "tinyface"
    head: str = "softmax"
    embedding_size: int = 128
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    flip_tta: bool = False
    eval_every: int = 1
    seed: int = 0
    num_cpus_per_client: float = 1.0
    round_timeout: float = 3600.0
    pause_after: int = 0
    resume: bool = False
    out: str = "runs/latest"
    cache_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ helpers
    def problems(self) -> list[str]:
        """Every setting that cannot work, saying what to change: training and data here,
        then each capability's own checks (:mod:`fedface.config.privacy`,
        :mod:`fedface.config.encryption`)."""
        problems = []
        if self.mode not in ("federated", "centralized"):
            problems.append(f"mode={self.mode!r}: use 'federated' or 'centralized'")
        if self.partition not in ("dirichlet", "powerlaw", "iid"):
            problems.append(f"partition={self.partition!r}: use dirichlet, powerlaw or iid")
        if self.align_policy not in ("fallback", "skip"):
            problems.append(f"align_policy={self.align_policy!r}: use 'fallback' or 'skip'")
        if self.num_clients < 1:
            problems.append(f"num_clients={self.num_clients}: need at least 1")
        if self.rounds < 1 or self.local_epochs < 1:
            problems.append("rounds and local_epochs must be at least 1")
        if self.holdout_images < 0:
            problems.append(f"holdout_images={self.holdout_images}: use 0 or more")
        if not 0.0 <= self.val_fraction < 0.9:
            problems.append(f"val_fraction={self.val_fraction}: use a value in [0, 0.9)")
        if not 0.0 < self.fraction_train <= 1.0:
            problems.append(f"fraction_train={self.fraction_train}: use a value in (0, 1]")
        if self.image_size < 32 or self.image_size > 224:
            problems.append(f"image_size={self.image_size}: use 32..224 (112 is standard)")
        if self.batch_size < 2:
            problems.append(f"batch_size={self.batch_size}: use at least 2")
        if self.strategy not in STRATEGY_NAMES:
            problems.append(f"strategy={self.strategy!r}: use one of {', '.join(STRATEGY_NAMES)}")
        if not 0.0 <= self.pfm_beta < 1.0:
            problems.append(f"pfm_beta={self.pfm_beta}: use a value in [0, 1)")
        if self.fv and self.fv_candidates < 2:
            problems.append(f"fv_candidates={self.fv_candidates}: FV needs at least 2")
        if self.min_train_nodes > self.num_clients and self.mode == "federated":
            problems.append(
                f"min_train_nodes={self.min_train_nodes} > num_clients={self.num_clients}"
            )
        return (problems + privacy_problems(self) + encryption_problems(self)
                + anonymize_problems(self) + share_problems(self))

    @property
    def encrypted(self) -> bool:
        return bool(self.he_keys)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    @property
    def pair_files(self) -> list[str]:
        return [p.strip() for p in self.pairs.split(",") if p.strip()]

    def computation(self) -> dict[str, Any]:
        """The settings that decide what a round computes (:meth:`to_dict` without the
        :data:`OPERATIONAL_FIELDS`): a resumed run differs from the original only in
        those. The :data:`TRANSPORT_FIELDS` are left out too: they change how updates
        travel, not what is computed."""
        return {k: v for k, v in self.to_dict().items()
                if k not in OPERATIONAL_FIELDS and k not in TRANSPORT_FIELDS}

    def data_key(self) -> str:
        """Hash of the settings that define the prepared (aligned, partitioned) data."""
        keys = (
            "data", "train_people", "pairs", "min_images", "image_size", "align_policy",
            "synthetic_identities", "synthetic_images", "num_clients", "partition",
            "partition_alpha", "val_fraction", "seed",
        )
        values = {k: getattr(self, k) for k in keys}
        if self.holdout_images:  # only when set: earlier caches keep their keys
            values["holdout_images"] = self.holdout_images
        if self.data != "synthetic":  # the same folder, however it was written
            values["data"] = str(Path(self.data).expanduser().resolve())
        blob = json.dumps(values, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

