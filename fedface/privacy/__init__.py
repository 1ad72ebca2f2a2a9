"""Differential privacy: DP-SGD on clients (Opacus), budgets and ledgers, central DP,
and the membership-inference audit.

- :func:`plan_dp` turns a client's budget (epsilon at delta, over the rounds it may
  join) into a noise multiplier; :class:`PrivacyLedger` accounts every round trained and
  persists it; :func:`make_private` wraps backbone, head and optimizer (Opacus).
- :mod:`fedface.privacy.central`: client-level DP, server- or client-side.
- :func:`membership_inference_auc`: the loss-threshold attack (true-label loss, and
  label-free ones); :func:`audit_run` (:mod:`fedface.privacy.audit`): the record- and
  person-level audit of a finished run's institutions, and where their heads are kept.
- :mod:`fedface.privacy.report`: what a run reports (:func:`check_privacy` before round
  1, :func:`privacy_record` each round).
"""

from fedface.config import CENTRAL_DP_MODES  # valid combinations: RunConfig.validate
from fedface.privacy.attacks import membership_inference_auc, sample_losses
from fedface.privacy.audit import (
    AUDIT_VERSION,
    audit_client,
    audit_run,
    client_state_dir,
    head_file,
    head_prefix,
    people_split,
    records_split,
    saved_heads,
)
from fedface.privacy.budget import (
    ACCOUNTANTS,
    DPPlan,
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    check_run,
    default_delta,
    epsilon_of,
    plan_dp,
    plan_for_run,
)
from fedface.privacy.central import (
    central_delta,
    central_epsilon,
    clip_and_noise_update,
    effective_noise_multiplier,
)
from fedface.privacy.engine import (
    GRAD_SAMPLE_MODES,
    PrivateTraining,
    check_dp_compatible,
    make_private,
)
from fedface.privacy.report import check_privacy, privacy_record, sampled_clients

__all__ = [
    "ACCOUNTANTS",
    "AUDIT_VERSION",
    "CENTRAL_DP_MODES",
    "DPPlan",
    "GRAD_SAMPLE_MODES",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "PrivacyLedger",
    "PrivateTraining",
    "audit_client",
    "audit_run",
    "central_delta",
    "central_epsilon",
    "check_dp_compatible",
    "check_privacy",
    "check_run",
    "client_state_dir",
    "clip_and_noise_update",
    "default_delta",
    "effective_noise_multiplier",
    "epsilon_of",
    "head_file",
    "head_prefix",
    "make_private",
    "membership_inference_auc",
    "people_split",
    "plan_dp",
    "plan_for_run",
    "privacy_record",
    "records_split",
    "sample_losses",
    "sampled_clients",
    "saved_heads",
]
