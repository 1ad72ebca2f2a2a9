"""Differential privacy: DP-SGD on clients (Opacus), budgets and ledgers, central DP,
and the membership-inference audit.

- :func:`plan_dp` turns a client's budget (epsilon at delta, over the rounds it may
  join) into a noise multiplier; :class:`PrivacyLedger` accounts every round trained and
  persists it; :func:`make_private` wraps backbone, head and optimizer (Opacus).
- :mod:`fedface.privacy.central`: client-level DP, server- or client-side.
- :func:`membership_inference_auc`: the loss-threshold attack.
"""

from fedface.config import CENTRAL_DP_MODES  # valid combinations: RunConfig.validate
from fedface.privacy.attacks import membership_inference_auc, sample_losses
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
)
from fedface.privacy.engine import (
    GRAD_SAMPLE_MODES,
    PrivateTraining,
    check_dp_compatible,
    make_private,
)

__all__ = [
    "ACCOUNTANTS",
    "CENTRAL_DP_MODES",
    "DPPlan",
    "GRAD_SAMPLE_MODES",
    "PrivacyBudgetExhausted",
    "PrivacyConfigError",
    "PrivacyLedger",
    "PrivateTraining",
    "central_delta",
    "central_epsilon",
    "check_dp_compatible",
    "check_run",
    "clip_and_noise_update",
    "default_delta",
    "epsilon_of",
    "make_private",
    "membership_inference_auc",
    "plan_dp",
    "plan_for_run",
    "sample_losses",
]
