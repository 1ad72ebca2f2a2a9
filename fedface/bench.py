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


def bench_dp(backbones: tuple[str, ...] = ("tinyface", "mobilefacenet-dp"), image_size: int = 64,
             batch_size: int = 64, classes: int = 100, steps: int = 8, repeats: int = 3,
             grad_sample_mode: str = "hooks", threads: int = 2,
             log: Callable[[str], None] = print) -> dict:
    """Seconds per local step of DP-SGD and of non-private training, side by side.

    Both run :func:`fedface.training.train_epochs` (augmentation, forward, backward, SGD
    with momentum) on the same random chips; DP-SGD adds Opacus' Poisson sampling,
    per-sample gradients, clipping and noise. The two alternate ``repeats`` times in
    blocks of ``steps`` steps and the medians are compared, so machine noise hits both.
    ``mobilefacenet-dp`` is MobileFaceNet with GroupNorm and ReLU.
    """
    import numpy as np
    import torch

    from fedface.models import build_backbone, build_head, count_parameters
    from fedface.privacy import make_private, plan_dp
    from fedface.training import make_optimizer, train_epochs

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    n = batch_size * (steps + 2) * 4
    x = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n)
    plan = plan_dp(n, epsilon=8.0, rounds=10, local_epochs=1, batch_size=batch_size)
    rows = []
    for name in backbones:
        def models(name=name):
            torch.manual_seed(0)
            return (build_backbone(name, input_size=image_size),
                    build_head("softmax", 128, classes))

        fixed = [torch.arange(i * batch_size, (i + 1) * batch_size) for i in range(steps + 1)]
        times = {"plain": [], "dp": []}
        for _ in range(repeats):
            backbone, head = models()  # non-private: shuffled full batches
            res = train_epochs(backbone, head, x, y, batch_size=batch_size,
                               batches=lambda g, f=fixed: iter(f))
            times["plain"].append(res.seconds / res.steps)
            backbone, head = models()  # DP-SGD: Poisson batches through Opacus
            opt = make_optimizer(backbone, head, 0.1, 0.9, 5e-4)
            private = make_private(backbone, head, opt, plan, grad_sample_mode=grad_sample_mode)
            drawn = [b for b, _ in zip(private.batches(), range(steps + 1))]
            res = train_epochs(backbone, head, x, y, optimizer=private.optimizer,
                               batches=lambda g, d=drawn: iter(d), forward=private.forward)
            times["dp"].append(res.seconds / res.steps)
        plain, dp = float(np.median(times["plain"])), float(np.median(times["dp"]))
        row = {"backbone": name, "parameters": count_parameters(models()[0]),
               "plain_ms_per_step": round(1000 * plain, 2), "dp_ms_per_step": round(1000 * dp, 2),
               "dp_step_ratio": round(dp / plain, 3),
               "plain_ms_all": [round(1000 * t, 1) for t in times["plain"]],
               "dp_ms_all": [round(1000 * t, 1) for t in times["dp"]]}
        log(f"{name}: {row}")
        rows.append(row)
    return {"benchmark": "dp", "image_size": image_size, "batch_size": batch_size,
            "grad_sample_mode": grad_sample_mode, "threads": threads,
            "steps_per_block": steps, "repeats": repeats, "results": rows,
            "dp_step_ratio": rows[0]["dp_step_ratio"] if rows else None,
            "target_ratio": 1.5}
