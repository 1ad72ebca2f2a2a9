"""``fedface deploy``: provision a deployment, show it, start its SuperLink and SuperNodes,
revoke a site. A thin layer over :mod:`fedface.deploy`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedface.cli.common import console
from fedface.errors import UserError, user_errors

deploy_app = typer.Typer(no_args_is_help=True, help="Deployment across hospitals: a real "
                         "Flower SuperLink and SuperNodes with TLS and node authentication.")

INSECURE_WARNING = ("[bold yellow]warning:[/] --insecure: no TLS and no node authentication. "
                    "Anyone on the network can read the traffic and join as a node; use it "
                    "only on a closed test network, never with real faces.")


def _say(text: str) -> None:
    console.print(f"[cyan]fedface:[/] {text}", soft_wrap=True, highlight=False)


@deploy_app.command("init")
def init(
    out: Annotated[Path, typer.Option("--out", help="Folder to write (coordinator/, site-K/, "
                                      "ca/).")],
    sites: Annotated[int, typer.Option(help="Number of sites (SuperNodes).")],
    coordinator: Annotated[str, typer.Option(
        help="The SuperLink's host names and addresses, comma-separated (into its "
        "certificate; the first is the address sites connect to).")] = "localhost,127.0.0.1",
    port: Annotated[int, typer.Option(help="The SuperLink's port.")] = 9092,
    days: Annotated[int, typer.Option(help="Validity of the certificates, in days.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Replace a deployment already in "
                                        "--out (its keys are lost).")] = False,
) -> None:
    """Provision a deployment: CA, the SuperLink's TLS certificate, one node key pair per
    site, the HE key bundles; one folder per recipient, each with a README."""
    from fedface.deploy.provision import DeployError, init_deployment

    with user_errors(DeployError):
        prov = init_deployment(out, sites, coordinator, port=port, days=days, force=force)
    m = prov.manifest
    console.print(f"Deployment {m['id']}: {sites} sites, SuperLink at "
                  f"{m['coordinator']['superlink']}", highlight=False)
    console.print("Hand out each folder to its recipient only, over a private channel:")
    console.print(f"  the coordinator: {prov.coordinator}/", soft_wrap=True, highlight=False)
    for k in range(sites):
        console.print(f"  site {k}: {prov.site(k)}/", soft_wrap=True, highlight=False)
    console.print(f"  keep offline: {prov.root / 'ca'}/ (the CA's key)", soft_wrap=True,
                  highlight=False)
    console.print(f"Then: `fedface deploy superlink {prov.coordinator}` on the coordinator and "
                  f"`fedface deploy supernode {prov.site(0)} --data PATH` on each site.",
                  soft_wrap=True, highlight=False)


@deploy_app.command("show")
def show(folder: Annotated[Path, typer.Argument(help="DIR, DIR/coordinator or DIR/site-K.")],
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Fingerprints, expiry dates, and which site holds which key (nothing secret)."""
    from fedface.deploy.provision import DeployError, describe

    with user_errors(DeployError):
        desc = describe(folder)
    if as_json:
        print(json.dumps(desc, indent=1))
        return
    m = desc["manifest"]
    t = Table(title=f"Deployment {m['id']} ({desc['kind']} folder {folder}): {m['sites']} sites, "
              f"SuperLink {m['coordinator']['superlink']}")
    for col in ("holder", "item", "fingerprint", "expires"):
        t.add_column(col, overflow="fold")
    for r in desc["rows"]:
        left = r["days_left"]
        exp = r["expires"][:10] + (f" ({left:.0f} d)" if left is not None else "")
        if left is not None and left < 30:
            exp = f"[red]{exp}[/]"
        t.add_row(r["holder"], r["item"], r["fingerprint"], exp)
    console.print(t)
    console.print("Secrets stay with their holder: " + "; ".join(
        sorted({f"{r['holder']}: {r['secret']}" for r in desc["rows"] if r["secret"]})),
        soft_wrap=True, highlight=False)
    console.print(f"HE key ceremony {m['he']['fingerprint']} (generation {m['he']['generation']})",
                  highlight=False)


@deploy_app.command("superlink")
def superlink(
    folder: Annotated[Path, typer.Argument(help="The coordinator's folder (DIR/coordinator).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int | None, typer.Option(help="Port (default: the provisioned one).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node "
                                           "authentication (closed test networks only).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and print the commands; "
                                          "start nothing.")] = False,
) -> None:
    """Start the SuperLink with TLS and node authentication, and register every site's
    provisioned public key. Prints the lines it runs."""
    from fedface.deploy import launch
    from fedface.deploy.checks import check_coordinator
    from fedface.deploy.provision import TLS_CA, DeployError, address, write_flwr_config

    with user_errors(DeployError):
        coord = check_coordinator(folder)
        port = int(port or coord.manifest["coordinator"]["port"])
        connect = address(coord.manifest["coordinator"]["hosts"][0], port)
        if insecure:
            console.print(INSECURE_WARNING, soft_wrap=True)
        cmd = launch.superlink_command(coord, host, port, insecure=insecure)
        env = launch.flwr_env(launch.flwr_home(coord.folder))
    _say("running: " + launch.shell_line(cmd, env))
    _say("then, for each site K: " + launch.shell_line(
        launch.register_command(coord.folder / "nodes" / "site-K.pub"), env))
    if dry_run:
        return
    _say(f"Flower's Control API (register nodes, submit runs) and Runtime API (the ServerApp's "
         f"side) share port {port} and have no account authentication in the open-source "
         "SuperLink: let only the sites and the machine that submits runs reach it (firewall)")
    (coord.folder / "state").mkdir(exist_ok=True, mode=0o700)
    write_flwr_config(coord.folder, connect, None if insecure else coord.path(TLS_CA))

    def ready(proc) -> None:
        import time

        probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        end = time.monotonic() + 60
        while not _port_open(probe, port):
            if proc.poll() is not None:
                raise UserError(f"flower-superlink exited (code {proc.returncode}) before it "
                                f"listened on port {port}: see its lines above (a port in use?)")
            if time.monotonic() > end:
                raise UserError(f"flower-superlink does not listen on port {port} after 60 s")
            time.sleep(0.5)
        if not insecure:
            with user_errors(DeployError):
                launch.register_nodes(coord, env, say=_say)
        _say(f"SuperLink ready at {connect}. Submit a run from the project folder with: "
             f"FLWR_HOME={env['FLWR_HOME']} flwr run . fedface --stream -c \"out='/abs/path' "
             f"num-clients={len(coord.node_keys)}\"")

    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if _port_open(probe, port):
        raise UserError(f"port {port} is already in use on this machine (another SuperLink?): "
                        "stop it, or pass --port")
    code, tail = launch.run_foreground(cmd, env, started=ready)
    if code not in (0, -15, 130, 143):
        raise UserError(f"flower-superlink exited with code {code}; its last lines:\n{tail}")


def _port_open(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@deploy_app.command("supernode")
def supernode(
    folder: Annotated[Path, typer.Argument(help="This site's folder (DIR/site-K).")],
    data: Annotated[Path | None, typer.Option(
        help="The site's prepared data file (`fedface prepare --data FOLDER --clients 1`).")
        ] = None,
    epsilon: Annotated[float | None, typer.Option(
        help="The most DP epsilon this site lets a run spend (refuses runs above it).")] = None,
    delta: Annotated[float | None, typer.Option(help="The largest DP delta it allows.")] = None,
    person_level: Annotated[bool, typer.Option("--person-level", help="Allow only "
                                               "person-level DP-SGD.")] = False,
    anonymize: Annotated[str | None, typer.Option(
        help="Anonymize this site's faces before training, whatever the run says "
        "(blur, mosaic, mask, dppix, ksame, cloak, scramble).")] = None,
    anonymize_preset: Annotated[str | None, typer.Option(help="low, medium or high.")] = None,
    he: Annotated[bool, typer.Option("--he/--no-he", help="Send updates encrypted only "
                                     "(default), or also take part in plaintext runs.")] = True,
    node_config: Annotated[list[str] | None, typer.Option(
        "--node-config", help="More node config, key=value (checked against the keys "
        "fedface knows).")] = None,
    superlink_address: Annotated[str | None, typer.Option(
        "--superlink", help="HOST:PORT of the SuperLink (default: site.json).")] = None,
    local_port: Annotated[int | None, typer.Option(
        help="Port of the node's local ClientApp API (default 9094 + site index).")] = None,
    max_retries: Annotated[int, typer.Option(help="Tries to reach the SuperLink.")] = 10,
    max_wait: Annotated[float, typer.Option(help="Seconds to keep trying.")] = 120.0,
    insecure: Annotated[bool, typer.Option("--insecure", help="No TLS, no node "
                                           "authentication (closed test networks only).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and print the command; "
                                          "start nothing.")] = False,
) -> None:
    """Check this site's folder, keys and data, then start its SuperNode with TLS, node
    authentication and the site's node config. Prints the line it runs."""
    from fedface.deploy import launch
    from fedface.deploy.checks import check_site, parse_node_config
    from fedface.deploy.provision import TLS_CA, DeployError

    with user_errors(DeployError):
        extra = parse_node_config(node_config)
        site = check_site(folder, data, epsilon=epsilon, delta=delta, person_level=person_level,
                          anonymize=anonymize, anonymize_preset=anonymize_preset, encrypted=he,
                          extra=extra)
        target = superlink_address or _site_superlink(folder)
        launch.split_address(target)
        if max_retries < 1 or max_wait <= 0:
            raise DeployError("--max-retries and --max-wait must be positive")
        if insecure:
            console.print(INSECURE_WARNING, soft_wrap=True)
        cmd = launch.supernode_command(site, target, insecure=insecure, local_port=local_port)
        env = launch.flwr_env(launch.flwr_home(site.folder))
    _say("running: " + launch.shell_line(cmd, env))
    if dry_run:
        return
    import time

    (site.folder / "state").mkdir(exist_ok=True, mode=0o700)
    with user_errors(DeployError):
        launch.preflight(target, None if insecure else site.path(TLS_CA), max_retries, max_wait)
    start = time.monotonic()
    while True:
        code, tail = launch.run_foreground(cmd, env)
        if code in (0, -15, 130, 143):
            return
        waited = time.monotonic() - start
        # A node restarted within about a minute is refused until its previous session's
        # heartbeat lapses: try again within the budget before calling it a refusal.
        if launch.activation_refused(tail) and waited + ACTIVATION_RETRY < max_wait:
            _say(f"the SuperLink did not activate this node ({waited:.0f} s so far); trying "
                 f"again in {ACTIVATION_RETRY} s")
            time.sleep(ACTIVATION_RETRY)
            continue
        raise UserError(launch.explain_exit(code, site, tail, waited))


REVOKE_UNCONFIRMED = 3  # exit code: revoked here, not (yet) on the SuperLink
ACTIVATION_RETRY = 10  # seconds between two starts of a node the SuperLink did not activate


def _site_superlink(folder: Path) -> str:
    import json as _json

    from fedface.deploy.provision import SITE_FILE, DeployError

    try:
        return str(_json.loads((Path(folder) / SITE_FILE).read_text())["superlink"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DeployError(f"{Path(folder) / SITE_FILE} names no SuperLink ({err!r}): copy the "
                          "site folder again, or pass --superlink HOST:PORT") from None


@deploy_app.command("revoke")
def revoke(
    folder: Annotated[Path, typer.Argument(help="The coordinator's folder.")],
    site: Annotated[int, typer.Option(help="The site whose node key is revoked.")],
) -> None:
    """Revoke a site's node key: it is no longer registered at start, and is unregistered
    from the running SuperLink (its node is refused from then on)."""
    import shutil

    from fedface.deploy import launch
    from fedface.deploy.checks import check_coordinator
    from fedface.deploy.provision import NODES_DIR, REVOKED_DIR, DeployError

    with user_errors(DeployError):
        coord = check_coordinator(folder)
        if site not in coord.node_keys:
            raise DeployError(f"site {site} has no active key in {folder / NODES_DIR} (sites "
                              f"with keys: {sorted(coord.node_keys)})")
        (coord.folder / REVOKED_DIR).mkdir(exist_ok=True)
        shutil.move(str(coord.node_keys[site]), str(coord.folder / REVOKED_DIR / f"site-{site}.pub"))
        nodes = launch.read_nodes(coord)
        env = launch.flwr_env(launch.flwr_home(coord.folder))
        if str(site) not in nodes:
            _say(f"site {site}'s key is revoked here and will not be registered again; fedface "
                 "has no record of its node id on the SuperLink (state/nodes.json), so if the "
                 "SuperLink's database already admits it, unregister it there with `flwr "
                 "supernode list` / `flwr supernode unregister NODE_ID fedface`")
            raise typer.Exit(REVOKE_UNCONFIRMED) from None
        node_id = nodes[str(site)]
        try:
            launch.unregister(env, node_id)
        except DeployError as err:
            _say(f"site {site}'s key is revoked here, but the SuperLink did not confirm ({err}): "
                 "it is unregistered when `fedface deploy superlink` next starts")
            raise typer.Exit(REVOKE_UNCONFIRMED) from None
        nodes.pop(str(site))
        launch.write_nodes(coord, nodes)
    _say(f"site {site}'s node key is revoked: node {node_id} unregistered; the SuperLink "
         "refuses it from now on")
