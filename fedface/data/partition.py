"""Split a face data set across simulated institutions.

Face data in a federation is identity-disjoint: a person is a patient of one
hospital. :func:`partition_identities` gives each identity to exactly one client, with
client sizes skewed by a Dirichlet or power law draw; ``scheme="iid"`` shuffles images
across clients for comparison. Every client also keeps a private validation split made
of its *own* identities (held out from its training set), so that validation measures
verification of unseen people, as the final test does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("dirichlet", "powerlaw", "iid")


@dataclass
class ClientSplit:
    """Indices (into the data set) held by one client."""

    client_id: int
    train: np.ndarray
    val: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.train)


def _client_shares(num_clients: int, scheme: str, alpha: float, rng: np.random.Generator):
    if scheme == "dirichlet":
        return rng.dirichlet(np.full(num_clients, float(alpha)))
    if scheme == "powerlaw":
        shares = (np.arange(num_clients) + 1.0) ** (-float(alpha))
        return rng.permutation(shares / shares.sum())
    return np.full(num_clients, 1.0 / num_clients)


def _counts_from_shares(total: int, shares: np.ndarray, minimum: int) -> np.ndarray:
    """Integer counts summing to ``total``, each at least ``minimum``, close to shares."""
    n = len(shares)
    spare = total - minimum * n
    raw = shares * spare
    counts = np.floor(raw).astype(int)
    # Largest remainders get the leftover units.
    for i in np.argsort(-(raw - counts))[: spare - counts.sum()]:
        counts[i] += 1
    return counts + minimum


def partition_identities(
    labels: np.ndarray,
    num_clients: int,
    scheme: str = "dirichlet",
    alpha: float = 1.0,
    val_fraction: float = 0.15,
    seed: int = 0,
    min_identities: int = 2,
) -> list[ClientSplit]:
    """Split image indices across ``num_clients`` institutions.

    Parameters
    ----------
    labels : np.ndarray
        Identity label of every image.
    num_clients : int
        Number of institutions.
    scheme : str
        ``"dirichlet"`` (identity-disjoint, client shares ~ Dir(alpha)),
        ``"powerlaw"`` (identity-disjoint, share of client k ~ (k+1)^-alpha, shuffled) or
        ``"iid"`` (images shuffled across clients; identities shared).
    alpha : float
        Dirichlet concentration (small = more skewed) or power-law exponent.
    val_fraction : float
        Share of each client's identities held out as its private validation split
        (at least 2 identities when the client has 6 or more, else none).
    seed : int
        Seed; the same inputs give the same split.
    min_identities : int
        Every client receives at least this many identities.

    Returns
    -------
    list[ClientSplit]
        One entry per client, indices sorted.
    """
    labels = np.asarray(labels)
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}; use one of {SCHEMES}")
    if num_clients < 1:
        raise ValueError("num_clients must be at least 1")
    identities = np.unique(labels)
    if len(identities) < num_clients * min_identities:
        raise ValueError(
            f"{len(identities)} identities cannot give {num_clients} clients "
            f"{min_identities} identities each: use fewer clients or more data"
        )
    rng = np.random.default_rng(seed)
    shares = _client_shares(num_clients, scheme, alpha, rng)

    if scheme == "iid":
        order = rng.permutation(len(labels))
        chunks = np.array_split(order, num_clients)
        client_ids = [np.unique(labels[c]) for c in chunks]
        client_images = [np.sort(c) for c in chunks]
    else:
        order = rng.permutation(identities)
        counts = _counts_from_shares(len(identities), shares, min_identities)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        client_ids = [order[bounds[k] : bounds[k + 1]] for k in range(num_clients)]
        client_images = [np.flatnonzero(np.isin(labels, ids)) for ids in client_ids]

    splits = []
    for k in range(num_clients):
        ids = np.array(sorted(client_ids[k]))
        n_val = int(round(val_fraction * len(ids)))
        n_val = max(n_val, 2) if len(ids) >= 6 and val_fraction > 0 else 0
        val_ids = rng.choice(ids, size=n_val, replace=False) if n_val else np.array([], int)
        idx = client_images[k]
        in_val = np.isin(labels[idx], val_ids)
        splits.append(ClientSplit(k, np.sort(idx[~in_val]), np.sort(idx[in_val])))
    return splits


def hold_out_images(labels: np.ndarray, indices: np.ndarray, per_identity: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep ``per_identity`` images of each identity out of training.

    Only identities with at least ``per_identity + 2`` images give any, so every held-out
    image belongs to a person the client still trains on: the non-members of a
    record-level membership-inference audit. Returns ``(train, held_out)`` indices.
    """
    rng = np.random.default_rng(seed)
    indices = np.asarray(indices)
    held = []
    for lab in np.unique(labels[indices]):
        own = indices[labels[indices] == lab]
        if len(own) >= per_identity + 2:
            held.extend(rng.choice(own, per_identity, replace=False).tolist())
    held_arr = np.array(sorted(held), dtype=indices.dtype)
    return np.setdiff1d(indices, held_arr), held_arr


def verification_pairs(
    labels: np.ndarray, max_pairs: int = 600, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced same/different pairs among the given images.

    Returns ``(index_a, index_b, same)``; up to ``max_pairs // 2`` pairs of each kind.
    Empty arrays when the images cannot make both kinds (fewer than two identities or
    no identity with two images).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_id: dict[int, np.ndarray] = {}
    for i, lab in enumerate(labels):
        by_id.setdefault(int(lab), []).append(i)  # type: ignore[arg-type]
    multi = [np.array(v) for v in by_id.values() if len(v) >= 2]
    if not multi or len(by_id) < 2:
        empty = np.array([], dtype=int)
        return empty, empty, np.array([], dtype=bool)
    same = [(a, b) for v in multi for ai, a in enumerate(v) for b in v[ai + 1 :]]
    same_arr = np.array(same)
    half = min(max_pairs // 2, len(same_arr))
    same_arr = same_arr[rng.choice(len(same_arr), size=half, replace=False)]
    diff = []
    n = len(labels)
    tries = 0
    while len(diff) < half and tries < 50 * half:
        a, b = rng.integers(0, n, size=2)
        tries += 1
        if labels[a] != labels[b]:
            diff.append((a, b))
    diff_arr = np.array(diff, dtype=int).reshape(-1, 2)
    a = np.concatenate([same_arr[:, 0], diff_arr[:, 0]])
    b = np.concatenate([same_arr[:, 1], diff_arr[:, 1]])
    issame = np.concatenate([np.ones(len(same_arr), bool), np.zeros(len(diff_arr), bool)])
    return a, b, issame
