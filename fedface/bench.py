"""Benchmarks that print JSON: ratios and costs measured side by side in one run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil

from fedface.config import RunConfig


class PeakMemory:
    """Samples the resident memory of this process and all its children (Ray workers)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def bench_scale(counts: list[int], overrides: dict | None = None,
                log: Callable[[str], None] = print) -> dict:
    """One federated round for each number of clients.

    The generated data set grows with the number of clients (4 identities of 8 images per
    client, at least 320 identities), so every client holds a realistic small share.
    Reports seconds for the round itself (from ``metrics.json``), wall seconds including
    the simulation engine's start, and peak resident memory of all processes.
    """
    results = []
    for n in counts:
        cfg = RunConfig.from_run_config({
            "num-clients": n, "rounds": 1, "synthetic-identities": max(320, 4 * n),
            "out": f"runs/bench-scale/{n}", "min-train-nodes": n, "eval-every": 1,
            **(overrides or {}),
        })
        from fedface.data.prepare import prepare
        from fedface.runner import run_simulation

        prepare(cfg)  # data preparation is not part of the round's cost
        t0 = time.time()
        with PeakMemory() as mem:
            doc = run_simulation(cfg)
        wall = time.time() - t0
        rnd = doc["rounds"][0]
        row = {"clients": n, "round_seconds": rnd["seconds"], "wall_seconds": round(wall, 2),
               "peak_memory_gb": round(mem.peak / 2**30, 3), "clients_ok": rnd["clients_ok"],
               "bytes_down": rnd["bytes_down"], "bytes_up": rnd["bytes_up"]}
        log(f"{n} clients: {row}")
        results.append(row)
    return {"benchmark": "scale", "backbone": results and cfg.backbone,
            "image_size": cfg.image_size, "cpus": psutil.cpu_count(), "results": results,
            "fits_24gb": all(r["peak_memory_gb"] < 24 for r in results)}
