"""Run configuration, by capability.

- :mod:`fedface.config.base`: :class:`FlatConfig`, the typed view of Flower's flat
  ``run_config`` every config shares (reading, writing, coercion, collect-all
  validation).
- :mod:`fedface.config.run`: :class:`RunConfig`, everything that defines a training
  run (data, model, federation, strategy), shared by the CLI, the ServerApp and the
  ClientApp.
- :mod:`fedface.config.privacy`, :mod:`fedface.config.encryption`: the valid values and
  refused combinations of each capability's settings.
"""

from fedface.config.analytics import QueryJobConfig
from fedface.config.base import FlatConfig, coerce
from fedface.config.privacy import ACCOUNTANTS, CENTRAL_DP_MODES, DP_UNITS, GRAD_SAMPLE_MODES
from fedface.config.run import DEFAULT_CACHE_ENV, STRATEGY_NAMES, RunConfig, default_cache_dir

#: Every config Flower carries in its flat ``run_config``: their keys must not collide,
#: and ``pyproject.toml``'s ``[tool.flwr.app.config]`` lists them all (a test checks).
FLOWER_CONFIGS: tuple[type[FlatConfig], ...] = (RunConfig, QueryJobConfig)


def own_part(cls: type[FlatConfig], run_config: dict) -> dict:
    """The entries of Flower's ``run_config`` that are not another of
    :data:`FLOWER_CONFIGS`'s keys (so ``cls.from_run_config`` still refuses a typo)."""
    others = {k for c in FLOWER_CONFIGS if c is not cls for k in c().to_run_config()}
    return {k: v for k, v in run_config.items() if k.replace("_", "-") not in others}


__all__ = [
    "ACCOUNTANTS", "CENTRAL_DP_MODES", "DEFAULT_CACHE_ENV", "DP_UNITS", "FLOWER_CONFIGS", "FlatConfig",
    "GRAD_SAMPLE_MODES", "QueryJobConfig", "RunConfig", "STRATEGY_NAMES", "coerce",
    "default_cache_dir", "own_part",
]
