"""Settings of an encrypted analytics query (``fedface query``, ``fedface bench query``).

The querier's choices travel signed with the query (:class:`server.analytics.Querier`);
each site's own policy (table, budget, whether it answers exact queries) is its node
config (:class:`client.analytics.SiteSettings`), never the querier's to set.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedface.config.base import FlatConfig


@dataclass
class QueryConfig(FlatConfig):
    """The querier's settings.

    Parameters
    ----------
    epsilon : float (default: 0.0)
        Differential privacy of the released statistics; 0 releases exact sums (each
        site's figures stay hidden, the total does not).
    delta : float (default: 1e-6)
    min_cell : int (default: 5)
        Groups and histogram bins with fewer rows are blanked in the answer.
    frac_bits : int (default: 16)
        Fixed-point bits of sums of real columns (an error of at most 2^-(frac_bits+1)
        per site and figure).
    mask_degree : int (default: 0)
        Mask-graph neighbours per site (0: all up to 16 sites, then 2 ceil(2 log2 n)).
    mask_threshold : float (default: 0.5)
        Shares needed to recover a dropped site's masks, as a fraction of its holders.
    max_sites : int (default: 1024)
        Largest federation the integer packing leaves room for.
    exclude_refusing : bool (default: False)
        Answer with the sites that accept the query, naming the others, instead of failing.
    """

    WHAT = "query settings"

    epsilon: float = 0.0
    delta: float = 1e-6
    min_cell: int = 5
    frac_bits: int = 16
    mask_degree: int = 0
    mask_threshold: float = 0.5
    max_sites: int = 1024
    exclude_refusing: bool = False

    def querier_settings(self) -> dict:
        """The keyword arguments of :class:`server.analytics.Querier` these settings give."""
        from crypto.masks import MaskSettings

        return {"epsilon": self.epsilon, "delta": self.delta, "min_cell": self.min_cell,
                "frac_bits": self.frac_bits, "max_sites": self.max_sites,
                "settings": MaskSettings(self.mask_degree, self.mask_threshold)}

    def problems(self) -> list[str]:
        out = []
        if self.epsilon < 0:
            out.append(f"epsilon={self.epsilon}: use a positive number, or 0 for exact sums")
        if not 0 < self.delta < 1:
            out.append(f"delta={self.delta}: use a number in (0, 1), e.g. 1e-6")
        if self.min_cell < 0:
            out.append(f"min_cell={self.min_cell}: use 0 (no suppression) or more")
        if not 0 <= self.frac_bits <= 30:
            out.append(f"frac_bits={self.frac_bits}: use 0..30")
        if not 2 <= self.max_sites <= 2 ** 14:
            out.append(f"max_sites={self.max_sites}: use 2..16384")
        return out


@dataclass
class QueryJobConfig(FlatConfig):
    """A query submitted to a deployment (``flwr run . -c analytics-request=PATH``): the
    ServerApp then runs that query instead of training, and writes the encrypted total to
    ``OUT/analytics-total.json`` for the querier to open (``fedface query-open``).

    Parameters
    ----------
    analytics_request : str (default: "")
        The query request file (``fedface query-request``), on the coordinator; empty: a
        training run.
    analytics_sites : int (default: 0)
        Sites to wait for before asking (0: those connected).
    analytics_exclude_refusing : bool (default: False)
        Answer with the sites that accept the query, naming the others.
    """

    WHAT = "query job settings"

    analytics_request: str = ""
    analytics_sites: int = 0
    analytics_exclude_refusing: bool = False

    def problems(self) -> list[str]:
        return ([f"analytics_sites={self.analytics_sites}: use 0 (those connected) or more"]
                if self.analytics_sites < 0 else [])
