"""What a node checks before it starts, so that a mistake is named before it connects.

:func:`check_coordinator` (``fedface deploy superlink``) and :func:`check_site`
(``fedface deploy supernode``) read a folder of ``fedface deploy init`` and refuse, with a
:class:`~fedface.deploy.provision.DeployError` naming the file and what to do:

- a key file readable by others, a link, or of another owner (:mod:`crypto.keyfile`);
- a CA certificate other than the deployment's (its fingerprint is in
  ``deployment.json``), a SuperLink certificate not signed by the CA, not for the
  coordinator's hosts, or not the certificate of the TLS key; any expired certificate;
- a node key pair that does not match, or a site whose key was not provisioned;
- an HE bundle of another key ceremony than the deployment's, or of another site;
- a missing or unreadable data file;
- a node config key fedface does not know (a typo such as ``dp-epsilom=8`` would
  otherwise be ignored, and with it the site's privacy cap).

Nothing in the folders is modified by a check.
"""

from __future__ import annotations

import datetime as dt
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from crypto import pki
from crypto.keyfile import KeyFileError
from crypto.keys import load_client_keys, load_server_keys
from fedface.config.privacy import DP_UNITS
from fedface.deploy.provision import (
    HE_DIR,
    NODE_KEY,
    NODE_PUB,
    NODES_DIR,
    STATE_DIR,
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    DeployError,
    folder_kind,
    read_manifest,
    read_site,
)
from fedface.protocol import (
    NODE_ANONYMIZE,
    NODE_ANONYMIZE_PRESET,
    NODE_CONFIG_KEYS,
    NODE_DATA_PATH,
    NODE_DP_DELTA,
    NODE_DP_EPSILON,
    NODE_DP_UNIT,
    NODE_FEDERATION_SIZE,
    NODE_HE_KEYS,
    NODE_HE_SENDER,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NODE_STATE_DIR,
)

# Keys a site sets itself with ``--node-config``; the rest ``fedface deploy supernode``
# derives from the site folder (its index, keys, state) and may not be overridden.
DERIVED_KEYS = (NODE_HE_KEYS, NODE_HE_SENDER, NODE_STATE_DIR, NODE_FEDERATION_SIZE)
SIMULATION_KEYS = (NODE_PARTITION_ID, NODE_NUM_PARTITIONS)
DATA_KEYS = ("x_train", "y_train", "x_val", "y_val")


def _pki(err: KeyFileError) -> DeployError:
    return DeployError(str(err))


@dataclass
class Coordinator:
    """A checked coordinator folder."""

    folder: Path
    manifest: dict
    node_keys: dict[int, Path]  # site -> its public key file (revoked ones left out)

    def path(self, rel: str) -> Path:
        return (self.folder / rel).resolve()


@dataclass
class Site:
    """A checked site folder and the node config it starts with."""

    folder: Path
    manifest: dict
    index: int
    node_config: dict[str, str] = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return (self.folder / rel).resolve()


def parse_node_config(items: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` (each item may hold several space-separated pairs) -> dict, every
    key one fedface knows."""
    out: dict[str, str] = {}
    for item in items or []:
        for pair in item.split():
            key, sep, value = pair.partition("=")
            if not sep or not key or not value:
                raise DeployError(f"--node-config {pair!r}: expected key=value (for example "
                                  f"{NODE_DP_EPSILON}=8)")
            check_config_key(key)
            out[key] = value.strip("'\"")
    return out


def check_config_key(key: str) -> None:
    """Refuse a node config key that fedface does not know, naming the ones it does."""
    if key not in NODE_CONFIG_KEYS:
        import difflib

        close = difflib.get_close_matches(key, NODE_CONFIG_KEYS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise DeployError(f"node config key {key!r} is not one fedface knows{hint}: known keys "
                          f"are {', '.join(NODE_CONFIG_KEYS)}")


def _check_ceremony(folder: Path, fingerprint: str, manifest: dict) -> None:
    """Refuse an HE bundle of another key ceremony than the deployment's."""
    if fingerprint != manifest["he"]["fingerprint"]:
        raise DeployError(f"HE bundle {folder / HE_DIR} is of another key ceremony (fingerprint "
                          f"{fingerprint}, this deployment's is {manifest['he']['fingerprint']}):"
                          " copy he/ from the same `fedface deploy init`")


def _number(value, key: str) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except ValueError:
        raise DeployError(f"node config {key}={value!r} is not a number") from None


def check_coordinator(folder: str | Path, now: dt.datetime | None = None) -> Coordinator:
    """The coordinator folder, checked as the module docstring says."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kind = folder_kind(folder)
    if kind != "coordinator":
        hint = (f"; the coordinator's is {folder / 'coordinator'}" if kind == "root" else "")
        raise DeployError(f"{folder} is a {kind} folder, not the coordinator's{hint}")
    try:
        pki.check_ca(folder / TLS_CA, manifest["ca"]["fingerprint"], now=now)
        pki.check_server_cert(folder / TLS_CERT, folder / TLS_KEY, folder / TLS_CA,
                              hosts=manifest["coordinator"]["hosts"], now=now)
        server = load_server_keys(folder / HE_DIR)
    except KeyFileError as err:
        raise _pki(err) from None
    _check_ceremony(folder, server.fingerprint, manifest)
    keys: dict[int, Path] = {}
    for pub in sorted((folder / NODES_DIR).glob("site-*.pub")):
        try:
            k = int(pub.stem.split("-", 1)[1])
        except ValueError:
            raise DeployError(f"{pub}: node key files are named site-K.pub (K the site index)"
                              ) from None
        try:
            fp = pki.public_key_fingerprint(pki.node_public_key(pub))
        except KeyFileError as err:
            raise _pki(err) from None
        expected = manifest["nodes"].get(str(k), {}).get("fingerprint")
        if expected is None:
            raise DeployError(f"{pub}: this deployment has no site {k} (sites 0 to "
                              f"{manifest['sites'] - 1}); remove the file")
        if fp != expected:
            raise DeployError(f"{pub} ({fp}) is not the key provisioned for site {k} ({expected}, "
                              "in deployment.json): copy the site's node/auth.pub from the same "
                              "`fedface deploy init`")
        keys[k] = pub
    if not keys:
        raise DeployError(f"no node keys in {folder / NODES_DIR}: every site is revoked or the "
                          "folder was emptied; re-provision with `fedface deploy init`")
    return Coordinator(folder, manifest, keys)


def check_data(path: str | Path) -> Path:
    """The site's prepared data file (``fedface prepare --clients 1``), or a folder holding
    exactly one; checked readable without loading its images."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DeployError(f"--data {path} does not exist: prepare the site's data with "
                          "`fedface prepare --data FOLDER --clients 1` and pass the "
                          "client_000.npz it writes")
    if path.is_dir():
        files = sorted(path.glob("client_*.npz"))
        if len(files) != 1:
            found = f"{len(files)} client_*.npz files" if files else "no client_*.npz file"
            raise DeployError(f"--data {path} is a folder with {found}: pass the site's one "
                              "prepared file (`fedface prepare --data FOLDER --clients 1` "
                              "names it)")
        path = files[0]
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except (OSError, zipfile.BadZipFile) as err:
        raise DeployError(f"--data {path} cannot be read as a prepared data file ({err}): "
                          "prepare it again with `fedface prepare --clients 1`") from None
    missing = [k for k in DATA_KEYS if k not in names]
    if missing:
        raise DeployError(f"--data {path} lacks {', '.join(missing)}: it is not a file of "
                          "`fedface prepare`; prepare the site's data with --clients 1")
    return path.resolve()


def check_site(folder: str | Path, data: str | Path | None, *, epsilon: float | None = None,
               delta: float | None = None, person_level: bool = False,
               anonymize: str | None = None, anonymize_preset: str | None = None,
               encrypted: bool = True, extra: dict[str, str] | None = None,
               now: dt.datetime | None = None) -> Site:
    """A site folder, checked, and the node config its SuperNode starts with."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    kind = folder_kind(folder)
    if kind != "site":
        raise DeployError(f"{folder} is a {kind} folder, not a site's: pass DIR/site-K")
    k = read_site(folder)
    if str(k) not in manifest["nodes"]:
        raise DeployError(f"{folder}: this deployment has no site {k} (sites 0 to "
                          f"{manifest['sites'] - 1}); copy the folder again")
    extra = dict(extra or {})
    flags = {NODE_DATA_PATH: data, NODE_DP_EPSILON: epsilon, NODE_DP_DELTA: delta,
             NODE_DP_UNIT: "person" if person_level else None, NODE_ANONYMIZE: anonymize,
             NODE_ANONYMIZE_PRESET: anonymize_preset}
    for key in extra:
        check_config_key(key)
        if key in DERIVED_KEYS:
            raise DeployError(f"node config {key} is set from the site folder ({folder}); "
                              "remove it from --node-config")
        if key in SIMULATION_KEYS:
            raise DeployError(f"node config {key} is the simulation's (a deployed site has "
                              "its own data file): remove it from --node-config")
        if flags.get(key) is not None:
            raise DeployError(f"node config {key} is given twice (an option and "
                              "--node-config): keep one")
    # What --node-config sets goes through the same checks as the options.
    data = extra.pop(NODE_DATA_PATH, data)
    epsilon = _number(extra.pop(NODE_DP_EPSILON, epsilon), NODE_DP_EPSILON)
    delta = _number(extra.pop(NODE_DP_DELTA, delta), NODE_DP_DELTA)
    unit = extra.pop(NODE_DP_UNIT, None)
    if unit is not None and unit not in DP_UNITS:
        raise DeployError(f"node config {NODE_DP_UNIT}={unit!r}: one of {', '.join(DP_UNITS)}")
    person_level = person_level or unit == "person"
    anonymize = extra.pop(NODE_ANONYMIZE, anonymize)
    anonymize_preset = extra.pop(NODE_ANONYMIZE_PRESET, anonymize_preset)
    if anonymize_preset and not anonymize:
        raise DeployError("an anonymizer preset without an anonymizer: add --anonymize METHOD")
    try:
        pki.check_ca(folder / TLS_CA, manifest["ca"]["fingerprint"], now=now)
        fp = pki.check_node_key(folder / NODE_KEY, folder / NODE_PUB)
    except KeyFileError as err:
        raise _pki(err) from None
    expected = manifest["nodes"][str(k)]["fingerprint"]
    if fp != expected:
        raise DeployError(f"node key {folder / NODE_KEY} ({fp}) is not the key provisioned for "
                          f"site {k} ({expected}): copy node/ from the same `fedface deploy init`")
    config: dict[str, str] = {NODE_STATE_DIR: str(folder.resolve() / STATE_DIR),
                              NODE_FEDERATION_SIZE: str(manifest["sites"])}
    if encrypted:
        try:
            keys = load_client_keys(folder / HE_DIR, k)
        except KeyFileError as err:
            raise _pki(err) from None
        _check_ceremony(folder, keys.fingerprint, manifest)
        config[NODE_HE_KEYS] = str((folder / HE_DIR).resolve())
        config[NODE_HE_SENDER] = str(k)
    if data is None:
        raise DeployError("--data is required: the site's prepared data file")
    config[NODE_DATA_PATH] = str(check_data(data))
    if epsilon is not None:
        if not epsilon > 0:
            raise DeployError(f"--epsilon {epsilon}: the site's privacy cap must be positive")
        config[NODE_DP_EPSILON] = f"{epsilon:g}"
    if delta is not None:
        if not 0 < delta < 1:
            raise DeployError(f"--delta {delta}: must be between 0 and 1")
        config[NODE_DP_DELTA] = f"{delta:g}"
    if person_level:
        config[NODE_DP_UNIT] = "person"
    if anonymize:
        from fedface.config import RunConfig

        try:
            RunConfig(anonymize=anonymize, anonymize_preset=anonymize_preset or "medium")
        except ValueError as err:
            raise DeployError(f"--anonymize {anonymize}: {err}") from None
        config[NODE_ANONYMIZE] = anonymize  # the site's strength, never the run's
        config[NODE_ANONYMIZE_PRESET] = anonymize_preset or "medium"
    config.update(extra)
    return Site(folder, manifest, k, config)
