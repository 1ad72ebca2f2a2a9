"""Benchmarks that print JSON: ratios and costs measured side by side in one run."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import psutil

from fedface.config import RunConfig
from fedface.metrics import RunDocument, write_json


def record_bench(bench: Callable[[], dict], json_path: str | os.PathLike) -> dict:
    """Run one benchmark; its result gets ``bench_seconds`` (the whole wall time) and is
    written to ``json_path``."""
    t0 = time.time()
    res = bench()
    res["bench_seconds"] = round(time.time() - t0, 1)
    write_json(json_path, res)
    return res


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
             modes: tuple[str, ...] = ("bk", "hooks"), threads: tuple[int, ...] = (1, 2),
             log: Callable[[str], None] = print) -> dict:
    """Seconds per local step of DP-SGD and of non-private training, side by side.

    All run :func:`fedface.training.train_epochs` (augmentation, forward, backward, SGD
    with momentum) on the same random chips; DP-SGD adds Poisson sampling, per-sample
    clipping and noise, computed by each of ``modes`` (``bk``: fedface's book-keeping,
    the default; ``hooks``: Opacus' per-sample gradients). Plain and DP blocks of
    ``steps`` steps alternate ``repeats`` times and the medians are compared, so machine
    noise hits all alike. Each backbone is timed with every thread count of ``threads``:
    1 is what a simulated client uses (``num-cpus-per-client=1``). ``dp_step_ratio`` is
    the first mode's ratio on the first backbone at the first thread count.
    ``mobilefacenet-dp`` is MobileFaceNet with GroupNorm and ReLU.
    """
    import numpy as np
    import torch

    from fedface.models import build_backbone, build_head, count_parameters
    from fedface.privacy import make_private, plan_dp
    from fedface.training import make_optimizer, train_epochs

    rng = np.random.default_rng(0)
    n = batch_size * (steps + 2) * 4
    x = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n)
    plan = plan_dp(n, epsilon=8.0, rounds=10, local_epochs=1, batch_size=batch_size)
    rows = []
    for name, n_threads in [(b, t) for b in backbones for t in threads]:
        torch.set_num_threads(n_threads)

        def models(name=name):
            torch.manual_seed(0)
            return (build_backbone(name, input_size=image_size),
                    build_head("softmax", 128, classes))

        fixed = [torch.arange(i * batch_size, (i + 1) * batch_size) for i in range(steps + 1)]
        times: dict[str, list[float]] = {"plain": [], **{m: [] for m in modes}}
        used = {}
        for _ in range(repeats):
            # Each block: one warm-up step (first-step allocations), then `steps` timed.
            backbone, head = models()  # non-private: full batches
            opt = make_optimizer(backbone, head, 0.1, 0.9, 5e-4)
            for part in (fixed[:1], fixed[1:]):
                res = train_epochs(backbone, head, x, y, batch_size=batch_size, optimizer=opt,
                                   batches=lambda g, f=part: iter(f))
            times["plain"].append(res.seconds / res.steps)
            for mode in modes:  # DP-SGD: Poisson batches, clipping, noise
                backbone, head = models()
                opt = make_optimizer(backbone, head, 0.1, 0.9, 5e-4)
                private = make_private(backbone, head, opt, plan, grad_sample_mode=mode)
                used[mode] = private.mode
                drawn = [b for b, _ in zip(private.batches(), range(steps + 1))]
                for part in (drawn[:1], drawn[1:]):
                    res = train_epochs(backbone, head, x, y, optimizer=private.optimizer,
                                       batches=lambda g, d=part: iter(d),
                                       forward=private.forward)
                times[mode].append(res.seconds / res.steps)
        plain = float(np.median(times["plain"]))
        row = {"backbone": name, "threads": n_threads,
               "parameters": count_parameters(models()[0]),
               "plain_ms_per_step": round(1000 * plain, 2),
               "plain_ms_all": [round(1000 * t, 1) for t in times["plain"]]}
        for mode in modes:
            dp = float(np.median(times[mode]))
            row[f"{mode}_ms_per_step"] = round(1000 * dp, 2)
            row[f"{mode}_step_ratio"] = round(dp / plain, 3)
            row[f"{mode}_ms_all"] = [round(1000 * t, 1) for t in times[mode]]
            row[f"{mode}_ran_as"] = used[mode]
        row["dp_step_ratio"] = row[f"{modes[0]}_step_ratio"]
        log(f"{name}: {row}")
        rows.append(row)
    return {"benchmark": "dp", "image_size": image_size, "batch_size": batch_size,
            "modes": list(modes), "threads": list(threads), "steps_per_block": steps,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "repeats": repeats, "results": rows,
            "dp_step_ratio": rows[0]["dp_step_ratio"] if rows else None,
            "target_ratio": 1.5}


def bench_he(clients: int = 8, synthetic_params: int = 10_000_000, round_check: bool = True,
             rounds: int = 3, log: Callable[[str], None] = print,
             mask_sizes: tuple[int, ...] = (8, 32, 100)) -> dict:
    """Encrypted vs plaintext aggregation, side by side in one run.

    For the default backbone, ``mobilefacenet`` and a synthetic update of
    ``synthetic_params`` values: seconds to encrypt (per client), aggregate (``clients``
    updates) and decrypt, against the plaintext path (float32 record, weighted mean);
    bytes up and down per client and their ratio to float32; the largest error of the
    decrypted weighted mean against the exact one, next to the documented bound. With
    ``round_check``, the default model's federated rounds on the embedded data set, run
    plain, encrypted and encrypted with masks alternately (twice each), give
    ``round_time_ratio_vs_plain`` and ``masked_round_time_ratio_vs_plain`` (median round
    seconds, the first round of each run left out as warm-up) and the final accuracy of
    each. ``masks``: the masking protocol at ``mask_sizes`` institutions
    (:func:`_mask_scaling`).
    """
    import tempfile

    import numpy as np

    from crypto.keys import init_keys, load_client_keys, load_server_keys
    from crypto.packing import float_keys
    from crypto.update import (
        Quantization,
        add_updates,
        aggregate_error_bound,
        decrypt_aggregate,
        encrypt_update,
        open_update,
    )
    from fedface.models import build_backbone
    from fedface.protocol import numpy_record

    default = RunConfig()
    tmp = tempfile.TemporaryDirectory(prefix="fedface-bench-he-")
    init_keys(tmp.name, clients)
    server = load_server_keys(tmp.name)
    keys = [load_client_keys(tmp.name, k) for k in range(clients)]
    quant = Quantization(max_clients=max(16, clients))
    rng = np.random.default_rng(0)

    def shapes(name: str) -> dict[str, np.ndarray]:
        if name.startswith("synthetic"):
            return {"update": np.zeros(synthetic_params, np.float32)}
        model = build_backbone(name, input_size=default.image_size)
        return {k: v.detach().numpy() for k, v in model.state_dict().items()}

    rows = []
    for name in (default.backbone, "mobilefacenet", f"synthetic-{synthetic_params // 10**6}M"):
        like = shapes(name)
        fk = float_keys(like)
        n = sum(like[k].size for k in fk)
        # Update-like values: mostly small, a few large (clipped share is reported).
        deltas = [{k: (rng.standard_normal(like[k].shape) * 0.02).astype(np.float32) for k in fk}
                  for _ in range(clients)]
        sizes = rng.integers(100, 1000, clients)
        scales = sizes / sizes.max()
        # Plaintext path: float32 records up, weighted mean, one record down.
        t0 = time.time()
        records = [numpy_record(d) for d in deltas]
        plain_up = records[0].count_bytes()
        t1 = time.time()
        exact = {k: sum(float(w) * d[k].astype(np.float64) for w, d in zip(sizes, deltas))
                 / sizes.sum() for k in fk}
        t2 = time.time()
        # Encrypted path.
        envs, enc_times = [], []
        for key, d, s, size in zip(keys, deltas, scales, sizes):
            te = time.time()
            env, _ = encrypt_update(key, d, fk, quant, scale=float(s), num_examples=int(size),
                                    train_steps=1, run="bench", server_round=1, rng=rng)
            enc_times.append(time.time() - te)
            envs.append(env)
        t3 = time.time()
        opened = [open_update(server, e, run="bench", server_round=1) for e in envs]
        agg = add_updates(server, opened, [1] * clients, run="bench", server_round=1,
                          max_units=quant.max_clients)
        t4 = time.time()
        mean, _ = decrypt_aggregate(keys[0], agg, like, fk, run="bench", server_round=1)
        t5 = time.time()
        err = max(float(np.abs(mean[k] - exact[k]).max()) for k in fk)
        up, down = envs[0].nbytes, agg.nbytes
        row = {"update": name, "values": int(n), "float32_bytes": int(4 * n),
               "plain_record_bytes": int(plain_up),
               "plain_serialize_s": round(t1 - t0, 4), "plain_aggregate_s": round(t2 - t1, 4),
               "encrypt_s_per_client": round(float(np.median(enc_times)), 4),
               "aggregate_s": round(t4 - t3, 4), "decrypt_s": round(t5 - t4, 4),
               "ciphertexts_per_update": len(envs[0].chunks),
               "bytes_up_per_client": int(up), "bytes_down_per_client": int(down),
               "wire_ratio_vs_float32": round(up / (4 * n), 4),
               "wire_ratio_down_vs_float32": round(down / (4 * n), 4),
               "max_abs_error": err, "error_bound": aggregate_error_bound(agg),
               "noise_budget_bits_left": keys[0].context.noise_budget(agg.chunks[0])}
        log(f"{name}: {row}")
        rows.append(row)
    out = {"benchmark": "he", "clients": clients,
           "params": server.context.params.to_dict(),
           "quantization": {"bits": quant.bits, "clip": quant.clip,
                            "max_clients": quant.max_clients},
           "results": rows,
           "wire_ratio_vs_float32": rows[0]["wire_ratio_vs_float32"],
           "targets": {"wire_ratio_vs_float32": 2.0, "round_time_ratio_vs_plain": 1.2,
                       "accuracy_gap_points": 0.5}}
    out["masks"] = _mask_scaling(mask_sizes, log)
    m8 = next((r for r in out["masks"] if r["institutions"] == 8), None)
    if m8 is not None:
        out["masked_wire_ratio_vs_float32"] = m8["wire_ratio_up_vs_float32"]["masked"]
    out["targets"].update(masked_wire_ratio_vs_float32=1.05, masked_round_time_ratio_vs_plain=1.25)
    if round_check:
        out.update(_he_rounds(tmp.name, rounds, log))
    tmp.cleanup()
    return out


def _mask_scaling(sizes: tuple[int, ...], log: Callable[[str], None]) -> list[dict]:
    """The masking protocol at ``sizes`` institutions on the default model's update
    (:class:`fedface.runner.MaskedFederation`: real keys, shares and ciphertexts, the
    parties run one after the other): per institution the seconds to mask and encrypt
    and the bytes of setup, upload and download, masked vs unmasked vs plaintext; the
    server's seconds to add and unmask. A round's compute is modelled as the slowest
    institution plus the server plus one decryption (institutions work in parallel)."""
    import tempfile

    import numpy as np

    from crypto.keys import init_keys
    from crypto.packing import flatten, float_keys, pack, quantize
    from crypto.update import Quantization
    from fedface.models import build_backbone
    from fedface.runner import MaskedFederation

    default = RunConfig()
    model = build_backbone(default.backbone, input_size=default.image_size)
    like = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    fk = float_keys(like)
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="fedface-bench-masks-") as tmp:
            init_keys(tmp, n)
            fed = MaskedFederation(tmp, n)
            quant = Quantization(max_clients=max(16, n))
            rng = np.random.default_rng(n)
            layout = quant.layout(sum(like[k].size for k in fk), fed.keys[0])
            slots = {}
            for k in range(n):
                delta = {key: (rng.standard_normal(like[key].shape) * 0.02).astype(np.float32)
                         for key in fk}
                slots[k] = pack(quantize(flatten(delta, fk), layout, rng)[0], layout)
            t_plain = time.perf_counter()
            total = sum(slots[k].astype(np.float64) for k in range(n))  # the plaintext sum
            t_plain = time.perf_counter() - t_plain
            enc_s, cts = [], {}
            for k in range(n):
                t0 = time.perf_counter()
                cts[k] = fed.keys[k].context.encrypt(slots[k])
                enc_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            plain_sum = fed.server.context.weighted_sum(list(cts.values()), [1] * n)
            sum_s = time.perf_counter() - t0
            ct_bytes = sum(len(c) for c in cts[0])
            t0 = time.perf_counter()
            expected = fed.keys[0].context.decrypt(plain_sum)
            dec_s = time.perf_counter() - t0
            del cts, plain_sum
            masked = fed.send(slots, range(n))
            summed = fed.unmask(masked)
            exact = bool(np.array_equal(fed.keys[0].context.decrypt(summed), expected)
                         and np.array_equal(expected.astype(np.float64), total))
            values = sum(like[k].size for k in fk)
            f32 = 4 * values
            mask_s = float(np.max(list(fed.mask_seconds.values())))
            row = {
                "institutions": n, "degree": max(len(v) for v in fed.coord.neighbours.values()),
                "values": int(values), "ciphertexts": int(layout.ciphertexts),
                "setup_bytes_per_institution": int(np.median(fed.setup_bytes)),
                "bytes_up_per_institution": {
                    "plain": f32, "unmasked": ct_bytes,
                    "masked": ct_bytes + int(np.median(list(fed.up_bytes.values())))},
                "unmask_bytes_per_institution": int(np.median(list(fed.unmask_bytes.values()))),
                "wire_ratio_up_vs_float32": {
                    "unmasked": round(ct_bytes / f32, 4),
                    "masked": round(float(ct_bytes + np.median(list(fed.up_bytes.values()))
                                           + np.median(list(fed.unmask_bytes.values()))) / f32,
                                    4)},
                "institution_seconds": {"unmasked": round(float(np.max(enc_s)), 4),
                                        "masked": round(mask_s, 4)},
                "server_seconds": {"plain": round(t_plain, 4), "unmasked": round(sum_s, 4),
                                   "masked": round(fed.server_seconds, 4)},
                "round_compute_seconds": {
                    "unmasked": round(float(np.max(enc_s)) + sum_s + dec_s, 4),
                    "masked": round(mask_s + fed.server_seconds + dec_s, 4)},
                "masked_sum_exact": exact}
            log(f"masks at {n} institutions: {row}")
            rows.append(row)
    return rows


def _he_rounds(key_dir: str, rounds: int, log: Callable[[str], None]) -> dict:
    """Real federated rounds of the default model, plain and encrypted alternately."""
    import numpy as np

    from fedface.data.prepare import prepare
    from fedface.runner import run_simulation

    base = RunConfig(rounds=rounds, out="runs/bench-he/plain")
    prepare(base)
    seconds: dict[str, list[float]] = {"plain": [], "encrypted": [], "masked": []}
    docs: dict[str, dict] = {}
    for rep in range(2):
        for mode in ("plain", "encrypted", "masked"):
            cfg = base.replace(out=f"runs/bench-he/{mode}-{rep}",
                               he_keys=key_dir if mode != "plain" else "",
                               he_masks=mode == "masked")
            doc = run_simulation(cfg)
            seconds[mode] += [r["seconds"] for r in doc["rounds"][1:]]
            docs[mode] = doc
            log(f"{mode} run {rep}: rounds {[r['seconds'] for r in doc['rounds']]}")

    def final(doc: dict) -> float:
        return RunDocument(doc).final_report()["accuracy"]

    def per_client(doc: dict, key: str) -> float:
        run = RunDocument(doc)
        return run.last_round[key] / max(1, run.config["num_clients"])

    plain, enc = float(np.median(seconds["plain"])), float(np.median(seconds["encrypted"]))
    masked = float(np.median(seconds["masked"]))
    return {"round_seconds_plain": round(plain, 3), "round_seconds_encrypted": round(enc, 3),
            "round_seconds_masked": round(masked, 3),
            "round_time_ratio_vs_plain": round(enc / plain, 3),
            "masked_round_time_ratio_vs_plain": round(masked / plain, 3),
            "masked_setup": docs["masked"]["encryption"].get("masks", {}),
            "masked_mask_bytes_per_client_per_round": {
                k: round(v / max(1, RunDocument(docs["masked"]).config["num_clients"]))
                for k, v in docs["masked"]["rounds"][-1]["encryption"]["masks"]["bytes"].items()},
            "round_bytes_up_per_client": {m: per_client(d, "bytes_up") for m, d in docs.items()},
            "round_bytes_down_per_client": {m: per_client(d, "bytes_down")
                                            for m, d in docs.items()},
            "round_bytes_ratio_vs_plain": round(
                (docs["encrypted"]["rounds"][-1]["bytes_up"]
                 + docs["encrypted"]["rounds"][-1]["bytes_down"])
                / (docs["plain"]["rounds"][-1]["bytes_up"]
                   + docs["plain"]["rounds"][-1]["bytes_down"]), 4),
            "final_accuracy_plain": final(docs["plain"]),
            "final_accuracy_encrypted": final(docs["encrypted"]),
            "final_accuracy_masked": final(docs["masked"]),
            "accuracy_gap_points": round(100 * (final(docs["plain"])
                                                - final(docs["encrypted"])), 2),
            "round_rounds": rounds}
