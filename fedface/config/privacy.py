"""Differential-privacy settings of a run: their valid values and refused combinations."""

from __future__ import annotations

ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("bk", "hooks", "ew", "functorch")
CENTRAL_DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed")
DP_UNITS = ("image", "person")


def privacy_problems(cfg) -> list[str]:
    """DP settings and the combinations that are refused (see ``fedface.privacy``).

    Valid: local DP-SGD with any strategy; ``client-fixed`` central DP with encrypted
    updates and any strategy they allow; ``server-*`` central DP with plaintext
    updates and FedAvg or FedProx.
    Refused: FV with any DP (FV scores candidates on the institutions' private
    validation people, a release outside the accounting; under central DP every
    candidate is another release of the same updates); ``server-*`` central DP with
    PFM, FedAvgM or FedAdam (their server state carries earlier noiseless means into
    each release); ``client-fixed`` without encryption (the server would see each
    update with only its share of the noise).
    """
    out = []
    if cfg.dp_epsilon < 0 or cfg.dp_epsilon != cfg.dp_epsilon:
        out.append(f"dp_epsilon={cfg.dp_epsilon}: use a value > 0 (0 turns DP-SGD off)")
    if not 0.0 <= cfg.dp_delta < 1.0:
        out.append(f"dp_delta={cfg.dp_delta}: use a value in (0, 1/N), or 0 for the default")
    if cfg.dp_clip <= 0 or cfg.central_dp_clip <= 0:
        out.append("dp_clip and central_dp_clip must be > 0")
    if cfg.dp_accountant not in ACCOUNTANTS:
        out.append(f"dp_accountant={cfg.dp_accountant!r}: use one of {', '.join(ACCOUNTANTS)}")
    if cfg.dp_grad_sample_mode not in GRAD_SAMPLE_MODES:
        out.append(f"dp_grad_sample_mode={cfg.dp_grad_sample_mode!r}: use one of "
                   f"{', '.join(GRAD_SAMPLE_MODES)}")
    if cfg.mode == "centralized" and (cfg.dp_epsilon > 0 or cfg.central_dp != "off"):
        out.append("DP settings apply to federated clients: use mode=federated, or "
                   "drop dp_epsilon / central_dp for the centralized baseline")
    if cfg.dp_rounds < 0:
        out.append(f"dp_rounds={cfg.dp_rounds}: use 0 (= rounds) or a positive count")
    if cfg.dp_unit not in DP_UNITS:
        out.append(f"dp_unit={cfg.dp_unit!r}: use one of {', '.join(DP_UNITS)}")
    if cfg.dp_person_images < 1:
        out.append(f"dp_person_images={cfg.dp_person_images}: use at least 1")
    if cfg.fv and cfg.dp_epsilon > 0:
        out.append("fv with dp_epsilon is refused: FV scores every candidate on the "
                   "institutions' private validation people, whom DP-SGD does not protect "
                   "(they are not trained on), so the scores would be a release outside "
                   "the accounting; turn fv off under DP")
    if cfg.central_dp not in CENTRAL_DP_MODES:
        out.append(f"central_dp={cfg.central_dp!r}: use one of {', '.join(CENTRAL_DP_MODES)}")
    elif cfg.central_dp != "off":
        if cfg.fv:
            out.append("central_dp with fv is refused: each FV candidate is another "
                       "release of the same updates and would multiply the privacy cost; "
                       "turn fv off, or use local DP-SGD (dp_epsilon) with fv")
        if cfg.central_dp_noise < 0:
            out.append(f"central_dp_noise={cfg.central_dp_noise}: must be >= 0")
        if cfg.strategy == "pfm" and cfg.central_dp.startswith("server-"):
            out.append(f"strategy=pfm with central_dp={cfg.central_dp!r} is refused: PFM's "
                       "momentum, sent to every client, is estimated from the aggregate "
                       "before Flower's server-side wrapper adds its noise, so it would "
                       "release the noiseless mean; use central_dp=client-fixed with pfm "
                       "(the noise is added before updates leave the clients)")
        if cfg.strategy in ("fedavgm", "fedadam") and cfg.central_dp.startswith("server-"):
            out.append(f"strategy={cfg.strategy} with central_dp={cfg.central_dp!r} is "
                       "refused: its server optimizer (momentum or Adam moments) is updated "
                       "from the noiseless mean before the wrapper adds noise, and carries "
                       "it into every later release beyond the calibrated sensitivity; use "
                       "fedavg or fedprox with server-side central DP")
        if cfg.central_dp == "client-fixed" and not cfg.he_keys:
            out.append("central_dp=client-fixed without he_keys is refused: the server "
                       "would see each update carrying only its 1/sqrt(m) share of the "
                       "noise (a far larger epsilon per update than the one reported); add "
                       "--he-keys (encrypted aggregation), or use central_dp=server-fixed")
    return out
