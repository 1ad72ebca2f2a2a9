"""One integer vector per site: the layout every site fills the same way, so vectors add.

The querier fixes the layout before any site computes: the groups (every combination of the
group-by columns' declared categories, in order) times the query's figures
(:func:`fedface.analytics.local.figures`). A site writes its exact local figures into it,
integers as they are and sums of real columns in fixed point (``round(x * 2**frac_bits)``,
an error of at most ``2**-(frac_bits + 1)`` per row summed); a group the site does not have
stays zero. Vectors of all sites add up to the vector of the union, whatever is done to
them in between (masks that cancel, encryption that adds), and :meth:`Layout.decode` reads
the total back into figures per group. A site holding a category the querier did not declare
is refused with its name, never silently dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from fedface.analytics.local import Figure, figures
from fedface.analytics.query import QueryError, QuerySpec, Schema

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    """Where each group's figures sit in a site's vector.

    Parameters
    ----------
    groups : tuple of tuple
        The group keys, in order (``((),)`` without group-by).
    figures : tuple of Figure
    scales : tuple of int
        Per figure: 1 (counts, integer sums) or ``2**frac_bits`` (sums of real columns).
    """

    groups: tuple[tuple, ...]
    figures: tuple[Figure, ...]
    scales: tuple[int, ...]

    @classmethod
    def build(cls, spec: QuerySpec, schema: Schema, categories: dict[str, list] | None = None,
              frac_bits: int = 16) -> Layout:
        """The layout of ``spec`` on sites of ``schema``; ``categories`` lists the values of
        each group-by column (the querier must know them: a site's own values never decide
        the layout, or the layout would tell who holds what)."""
        categories = categories or {}
        missing = [g for g in spec.group_by if not categories.get(g)]
        if missing:
            raise QueryError(f"group by {', '.join(missing)}: declare the categories of "
                             "each group-by column (every site fills the same groups)")
        groups = tuple(itertools.product(*(tuple(categories[g]) for g in spec.group_by)))
        figs = tuple(figures(spec))
        real = {c for c, k in schema.columns.items() if k == "real"}
        scales = tuple(2**frac_bits if f.kind in ("sum", "sumsq") and f.column in real else 1
                       for f in figs)
        return cls(groups, figs, scales)

    @property
    def size(self) -> int:
        return len(self.groups) * len(self.figures)

    def encode(self, stats: dict[tuple, dict[str, float]]) -> np.ndarray:
        """A site's figures per group (:func:`~fedface.analytics.local.local_statistics`)
        as an int64 vector of :attr:`size`."""
        index = {g: i for i, g in enumerate(self.groups)}
        out = np.zeros((len(self.groups), len(self.figures)), dtype=np.int64)
        for key, values in stats.items():
            if key not in index:
                raise QueryError(f"the site holds the group {key!r}, which the query's "
                                 "declared categories do not list: declare it, or filter it "
                                 "out with where")
            for j, (f, scale) in enumerate(zip(self.figures, self.scales, strict=True)):
                v = values[f.name]  # integers stay exact (a float holds 53 bits)
                code = v if isinstance(v, int) and scale == 1 else round(float(v) * scale)
                if not -2**63 < code < 2**63:
                    raise QueryError(f"{f.name} of group {key!r} ({v}) does not fit 64 bits: "
                                     "narrow the query or lower frac-bits")
                out[index[key], j] = code
        return out.reshape(-1)

    def decode(self, total: np.ndarray) -> dict[tuple, dict[str, float]]:
        """The summed vector back into figures per group (groups with no row left out)."""
        total = np.asarray(total).reshape(len(self.groups), len(self.figures))
        out: dict[tuple, dict[str, float]] = {}
        for key, row in zip(self.groups, total, strict=True):
            values = {f.name: (int(v) if scale == 1 else int(v) / scale)
                      for f, v, scale in zip(self.figures, row, self.scales, strict=True)}
            if values["count"]:
                out[key] = values
        return out
