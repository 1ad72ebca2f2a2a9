"""Encrypted-aggregation settings of a run: the combinations it refuses."""

from __future__ import annotations


def encryption_problems(cfg) -> list[str]:
    """Combinations that encrypted aggregation refuses (the server sees no plaintext).

    Valid: fedavg, pfm (momentum applied by clients) and fedprox, with local DP-SGD
    and ``client-fixed`` central DP. Refused: FV (every candidate weighting is another
    linear combination of the same encrypted updates, and every institution decrypts
    them all: ``k + 1`` combinations solve for individual updates); fewer than 2
    institutions or ``min_train_nodes`` below 2 (an aggregate of one update is that
    update, and institutions refuse to decrypt it).
    """
    if not cfg.encrypted:
        return []
    out = []
    if cfg.mode != "federated":
        out.append("he_keys applies to federated runs: drop it for mode=centralized")
    if cfg.fv:
        out.append("fv with he_keys is refused: each FV candidate is another linear "
                   "combination of the same encrypted updates, and every institution "
                   "decrypts them all; k+1 combinations reveal individual updates (with up "
                   f"to fv_candidates + 1 = {cfg.fv_candidates + 1} institutions, one "
                   "institution solves every other's update). Use plaintext FV (drop "
                   "he_keys) or HE without FV (drop fv)")
    if cfg.num_clients < 2 or cfg.min_train_nodes < 2:
        out.append(f"num_clients={cfg.num_clients}, min_train_nodes={cfg.min_train_nodes} "
                   "with he_keys: an aggregate of one update is that update (institutions "
                   "refuse to decrypt it); use at least 2 of each")
    if cfg.strategy not in ("fedavg", "pfm", "fedprox"):
        out.append(f"strategy={cfg.strategy!r} keeps a server-side optimizer state that "
                   "needs plaintext updates: with he_keys use fedavg, pfm or fedprox")
    if cfg.central_dp.startswith("server-"):
        out.append(f"central_dp={cfg.central_dp!r} clips plaintext updates on the server: "
                   "with he_keys use central_dp=client-fixed")
    if cfg.server_lr != 1.0 and cfg.strategy == "pfm":
        out.append(f"server_lr={cfg.server_lr} with he_keys: the institutions apply the "
                   "decrypted mean as it is; use server-lr=1")
    if not 2 <= cfg.he_bits <= 30:
        out.append(f"he_bits={cfg.he_bits}: use 2..30")
    if not cfg.he_clip > 0:
        out.append(f"he_clip={cfg.he_clip}: use a positive range")
    if cfg.he_max_clients < cfg.num_clients:
        out.append(f"he_max_clients={cfg.he_max_clients} < num_clients={cfg.num_clients}: "
                   "the packing's headroom must hold the sum over every client; raise it")
    if not 0 <= cfg.he_fv_bits <= 8:
        out.append(f"he_fv_bits={cfg.he_fv_bits}: use 0..8")
    if cfg.he_masks:
        if not 0.5 <= cfg.he_mask_threshold < 1.0:
            out.append(f"he_mask_threshold={cfg.he_mask_threshold}: use a fraction in [0.5, 1) "
                       "(0.5: just over half of each institution's share holders)")
        if cfg.he_mask_degree < 0:
            out.append(f"he_mask_degree={cfg.he_mask_degree}: use 0 (automatic) or a positive "
                       "number of neighbours")
        if cfg.fraction_train < 1.0:
            out.append(f"fraction_train={cfg.fraction_train} with he_masks: every institution "
                       "with a key takes part in each masked exchange (a sampled-out one would "
                       "hold shares of an exchange it cannot check); use fraction-train=1 or "
                       "he-masks=false")
    return out
