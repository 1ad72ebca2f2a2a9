"""Readable tables of a run: its data, rounds, final verification, privacy, encryption."""

from __future__ import annotations

from rich.table import Table

from fedface.cli.common import console, pct
from fedface.metrics import RunDocument


def print_summary(doc: dict | RunDocument, title: str = "fedface run") -> None:
    """Readable tables of a metrics document: data, rounds, final verification."""
    run = doc if isinstance(doc, RunDocument) else RunDocument(doc)
    cfg, data = run.config, run.data
    clients = data.get("clients", [])
    console.print(
        f"\n[bold]{title}[/]: {cfg['mode']}, backbone {cfg['backbone']} + {cfg['head']} head, "
        f"{cfg['image_size']}px, {cfg['rounds']} rounds x {cfg['local_epochs']} local epochs"
    )
    if clients:
        sizes = ", ".join(str(c["train_images"]) for c in clients)
        console.print(
            f"data: {data.get('source')} - {data.get('train_identities')} training identities, "
            f"{data.get('train_images')} images over {len(clients)} institutions "
            f"(images per institution: {sizes})"
        )
    if cfg.get("anonymize", "none") != "none":
        opts = f", {cfg['anonymize_options']}" if cfg.get("anonymize_options") else ""
        console.print(f"anonymized by every institution before training: {cfg['anonymize']} "
                      f"({cfg.get('anonymize_preset', 'medium')}{opts}); test pairs clean")
    console.print(rounds_table(run.rounds))
    console.print(verification_table(run.final_reports()))
    print_privacy(run)
    print_encryption(run.encryption)
    if run.stopped:
        console.print(f"[yellow]stopped early:[/] {run.stopped}")
    console.print(f"wall time {run.wall_seconds:.0f} s; model: {run.model}")


def rounds_table(rounds: list[dict]) -> Table:
    rt = Table(title="Rounds", show_lines=False)
    for col in ("round", "loss", "val acc%", "test acc%", "excl", "sec", "MB down", "MB up"):
        rt.add_column(col, justify="right")
    for r in rounds:
        rt.add_row(str(r["round"]), f"{r['train_loss']:.3f}" if r.get("train_loss") else "-",
                   pct(r.get("val_accuracy")), pct(r.get("test_accuracy")),
                   str(r.get("num_excluded", 0)), f"{r['seconds']:.1f}", f"{r['bytes_down'] / 1e6:.1f}",
                   f"{r['bytes_up'] / 1e6:.1f}")
    return rt


def verification_table(reports: dict[str, dict]) -> Table:
    """One row per pair set: the learned model's figures and the raw-pixel reference."""
    ft = Table(title="Verification: 10-fold accuracy (threshold from the other folds), "
               "and the raw-pixel reference")
    for col in ("pairs", "n", "acc%", "AUC", "EER%", "TAR@1e-3%", "raw acc%", "gain"):
        ft.add_column(col, justify="right")
    for name, rep in reports.items():
        raw = rep.get("raw_pixels", {})
        gain = (rep["accuracy"] - raw["accuracy"]) * 100 if raw else None
        ft.add_row(name, str(rep["num_pairs"]), f"{pct(rep['accuracy'])}±{pct(rep['accuracy_std'])}",
                   f"{rep['auc']:.3f}", pct(rep["eer"]), pct(rep["tar_at_far_1e-3"]),
                   pct(raw.get("accuracy")), "-" if gain is None else f"{gain:+.1f}")
    return ft


def print_privacy(doc: dict | RunDocument) -> None:
    """Per-client epsilon spent (DP-SGD) and the central-DP epsilon, if the run had them."""
    run = doc if isinstance(doc, RunDocument) else RunDocument(doc)
    plans = run.dp_plans
    if plans:
        spent = run.dp_spent()
        cfg = run.config
        unit = cfg.get("dp_unit", "image")
        protects = ("each person, all their images" if unit == "person" else "each image")
        t = Table(title=f"DP-SGD: epsilon spent per institution (budget {cfg['dp_epsilon']} over "
                  f"{cfg['dp_rounds'] or cfg['rounds']} rounds, {cfg['dp_accountant']} "
                  f"accountant; protects {protects})")
        for col in ("institution", "epsilon spent", "delta", "noise multiplier", "steps/round",
                    "people" if unit == "person" else "images"):
            t.add_column(col, justify="right")
        for cid, p in plans.items():
            t.add_row(cid, f"{spent[cid]:.3f}" if cid in spent else "-", f"{p['delta']:g}",
                      f"{p['noise_multiplier']:.3f}", str(p["steps_per_round"]),
                      str(p.get("units", "-")))
        console.print(t)
    central = run.central_dp()
    if central:
        c = central[-1]
        short = [r for r in central if r.get("aggregated", 0) < r.get("sampled", 0)]
        console.print(f"central DP ({c['mode']}): client-level epsilon {c['epsilon']:.3f} at "
                      f"delta {c['delta']:g}, noise multiplier {c['noise_multiplier']}, "
                      f"clip {c['clip']:.3g}" +
                      (f"; {len(short)} rounds aggregated fewer clients than sampled, accounted "
                       f"at their effective noise (all replying: epsilon "
                       f"{c['epsilon_if_all_replied']:.3f})" if short else ""))


def print_encryption(enc: dict | None) -> None:
    """The encrypted run's parameters, key and joins (nothing for a plaintext run)."""
    if not enc:
        return
    lay = enc["layout"]
    console.print(
        f"encrypted aggregation: BFV n={enc['params']['poly_modulus_degree']}, "
        f"{lay['bits']}-bit values (clip {lay['clip']}), {lay['digits']} per slot, "
        f"{enc['ciphertexts_per_update']} ciphertexts per update; key {enc['fingerprint']} "
        f"(generation {enc['generation']}); {enc['joined']} of {enc['nodes']} institutions "
        "joined; the server saw no update, only the released final model")
    for e in enc.get("join_excluded", []):
        console.print(f"  [yellow]not joined[/] node {e['node']}: {e['reason'][:200]}")
