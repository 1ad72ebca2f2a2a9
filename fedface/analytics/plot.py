"""A figure of a query's histograms (``fedface query --plot PATH``)."""

from __future__ import annotations

from pathlib import Path


def plot_histograms(result: dict, path: str | Path) -> Path:
    """One panel per histogram of ``result`` (:meth:`server.analytics.QueryResult.to_dict`),
    one bar series per group; blanked (small) bins drawn empty. Refused when the query
    asks no histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict) and "counts" in v})
    if not names:
        raise ValueError("--plot draws histograms, and this query asks none: add "
                         "histogram(column; edges) to it")
    group_by = result["spec"].get("group_by", [])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        series = [r for r in rows if name in r]
        width = 0.8 / max(1, len(series))
        for i, r in enumerate(series):
            h = r[name]
            edges, counts = h["edges"], [c if c is not None else 0 for c in h["counts"]]
            x = [j + i * width for j in range(len(counts))]
            label = ", ".join(str(r[g]) for g in group_by) or "all sites"
            ax.bar(x, counts, width=width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(edges) - 1)])
        ax.set_xticklabels([f"{edges[j]:g}-{edges[j + 1]:g}" for j in range(len(edges) - 1)],
                           rotation=30, fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("rows (summed over sites)")
        if len(series) > 1:
            ax.legend(fontsize=8)
    eps = result.get("epsilon") or 0
    fig.suptitle(f"fedface query: {len(result['sites'])} sites"
                 + (f", epsilon {eps:g}" if eps else ", exact sums"), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
