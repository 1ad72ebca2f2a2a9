"""Provisioning and the checks a node makes before it connects: each mistake named with
the file and the fix, and nothing a site holds modified."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from crypto import pki
from crypto.keyfile import write_private
from crypto.keys import load_querier_key
from crypto.signing import public_hex
from fedface.cli import app
from fedface.deploy.checks import (
    check_coordinator,
    check_data,
    check_site,
    parse_node_config,
)
from fedface.deploy.provision import DeployError, describe, init_deployment, parse_hosts
from fedface.protocol import NODE_CONFIG_KEYS

runner = CliRunner()


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("dep")
    return init_deployment(root / "d", 3, ["hospital-a.example.org", "10.0.0.5"], port=9443)


@pytest.fixture
def dep(provisioned, tmp_path):
    """A private copy of the provisioned folders (tests may break it)."""
    out = tmp_path / "d"
    shutil.copytree(provisioned.root, out)
    return out


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "client_000.npz"
    z = np.zeros((2, 3, 8, 8), np.uint8)
    np.savez(path, x_train=z, y_train=np.zeros(2), x_val=z, y_val=np.zeros(2))
    return path


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes()
                     + str(p.stat().st_mode).encode())
    return h.hexdigest()


def test_layout_permissions_and_what_each_folder_holds(provisioned):
    root = provisioned.root
    m = provisioned.manifest
    assert m["sites"] == 3 and m["coordinator"]["superlink"] == "hospital-a.example.org:9443"
    secrets = [root / "ca/ca.key", root / "coordinator/tls/server.key",
               root / "coordinator/he/bundle.json", root / "coordinator/he/sign.key"] + [
        root / f"site-{k}" / f for k in range(3)
        for f in ("node/auth.key", "he/secret.key", "he/sign.key", "he/bundle.json")]
    for path in secrets:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for folder in [root / "coordinator"] + [root / f"site-{k}" for k in range(3)]:
        assert folder.stat().st_mode & 0o077 == 0
        assert json.loads((folder / "deployment.json").read_text()) == m  # self-contained
        assert "secret" in (folder / "README.md").read_text()
    # The coordinator can add encrypted updates, never decrypt: no HE secret key there.
    assert not (root / "coordinator/he/secret.key").exists()
    # Site 1 holds its own signing key only (every site's public key), and the node key
    # whose fingerprint is on record; the coordinator its own signing key and no site's.
    b = json.loads((root / "site-1/he/bundle.json").read_text())
    assert b["sender"] == 1 and "client_macs" not in b and "server_mac" not in b
    assert sorted(p.name for p in (root / "site-1/he").iterdir()) == [
        "bundle.json", "secret.key", "sign.key"]
    assert sorted(p.name for p in (root / "coordinator/he").iterdir()) == ["bundle.json", "sign.key"]
    assert b["sign_public"] == json.loads((root / "coordinator/he/bundle.json").read_text())[
        "sign_public"]
    # The analyst's folder: the querier's signing key (no HE secret), nowhere else.
    assert sorted(p.name for p in (root / "querier").iterdir()) == [
        "README.md", "key.json", "sign.key"]
    assert (root / "querier/sign.key").stat().st_mode & 0o777 == 0o600
    querier = load_querier_key(root / "querier")
    assert public_hex(querier) == b["sign_public"]["querier"]
    assert not list((root / "coordinator").rglob("querier*"))
    assert pki.check_node_key(root / "site-1/node/auth.key", root / "site-1/node/auth.pub") \
        == m["nodes"]["1"]["fingerprint"]
    # The certificate is for the coordinator's names and addresses, signed by the CA.
    cert = pki.check_server_cert(root / "coordinator/tls/server.crt",
                                 root / "coordinator/tls/server.key", root / "ca/ca.crt",
                                 hosts=["hospital-a.example.org", "10.0.0.5"])
    assert set(pki.cert_info(cert).names) == {"hospital-a.example.org", "10.0.0.5"}
    conf = (root / "coordinator/flwr/config.toml").read_text()
    assert 'address = "hospital-a.example.org:9443"' in conf and "root-certificates" in conf


def test_node_keys_are_in_the_format_flower_registers(provisioned):
    from flwr.cli.supernode.register import try_load_public_key

    pub = provisioned.root / "site-0/node/auth.pub"
    assert try_load_public_key(pub)  # Flower's own loader: an EC key on a NIST curve
    key = serialization.load_ssh_private_key(
        (provisioned.root / "site-0/node/auth.key").read_bytes(), None)
    assert key.curve.name == "secp384r1"


def test_a_second_init_refuses_without_force_and_loses_nothing(dep):
    before = tree_digest(dep)
    with pytest.raises(DeployError, match="already holds a deployment.*--force"):
        init_deployment(dep, 2)
    assert tree_digest(dep) == before
    old = json.loads((dep / "deployment.json").read_text())["id"]
    new = init_deployment(dep, 2, force=True)
    assert new.manifest["id"] != old and not (dep / "site-2").exists()


def test_an_interrupted_init_is_refused_then_replaced_with_force(tmp_path):
    out = tmp_path / "d"
    out.mkdir(mode=0o755)
    os.chmod(out, 0o755)  # the user's own folder (`--out .`)
    # What an init stopped before it wrote deployment.json leaves behind.
    (out / "coordinator/he").mkdir(parents=True)
    (out / "ca").mkdir()
    (out / "site-0/node").mkdir(parents=True)
    # A link named like a site folder, to a folder of someone else's: never followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "site.json").write_text("{}")
    (out / "site-7").symlink_to(elsewhere, target_is_directory=True)
    (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    with pytest.raises(DeployError, match=r"already provisioned \(possibly interrupted.*ca, "
                       r"coordinator, site-0, site-7.*--force.*another --out"):
        init_deployment(out, 2)
    assert tree_digest(out) == before
    prov = init_deployment(out, 2, force=True)
    assert (out / "deployment.json").exists() and not (out / "coordinator/he/he").exists()
    assert pki.check_node_key(out / "site-0/node/auth.key", out / "site-0/node/auth.pub") \
        == prov.manifest["nodes"]["0"]["fingerprint"]
    assert not os.path.lexists(out / "site-7") and (elsewhere / "site.json").read_text() == "{}"
    assert (out / "notes.txt").read_text() == "mine"
    assert out.stat().st_mode & 0o777 == 0o755  # an existing --out keeps its mode
    for folder in ("ca", "coordinator", "site-0", "site-1"):
        assert (out / folder).stat().st_mode & 0o777 == 0o700, folder
    init_deployment(tmp_path / "new", 2)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700  # one it creates is private


@pytest.mark.parametrize("kwargs, message", [
    (dict(sites=1), "at least 2 sites"),
    (dict(sites=3, hosts="https://x.org:443"), "neither a host name nor an IP"),
    (dict(sites=3, hosts=" , "), "--coordinator is empty"),
    (dict(sites=3, port=70000), "not a TCP port"),
    (dict(sites=3, days=0), "1 to 3650 days"),
])
def test_bad_provisioning_input_is_named(tmp_path, kwargs, message):
    with pytest.raises(DeployError, match=message):
        init_deployment(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x" / "deployment.json").exists()


def test_hosts_parse_names_and_addresses():
    assert parse_hosts("a.example.org, 10.0.0.1,::1") == ["a.example.org", "10.0.0.1", "::1"]
    assert parse_hosts(None) == ["localhost", "127.0.0.1"]
    # Canonical forms: as the certificate's names read back, so the checks compare equal.
    assert parse_hosts("0:0:0:0:0:0:0:1,Hospital-A.Example.ORG,::1,hospital-a.example.org") \
        == ["::1", "hospital-a.example.org"]
    assert parse_hosts(["2001:DB8:0:0::5"]) == ["2001:db8::5"]
    for bad in ("10.0.0.256", "1.2.3", "300"):
        with pytest.raises(DeployError, match=f"{bad!r} is not a valid IP address"):
            parse_hosts(f"a.example.org,{bad}")


def test_a_non_canonical_address_is_provisioned_so_the_checks_accept_it(tmp_path):
    prov = init_deployment(tmp_path / "d", 2, "0:0:0:0:0:0:0:1,Coordinator.Example.org")
    assert prov.manifest["coordinator"]["hosts"] == ["::1", "coordinator.example.org"]
    assert prov.manifest["coordinator"]["superlink"] == "[::1]:9092"
    assert sorted(check_coordinator(prov.coordinator).node_keys) == [0, 1]


def test_show_lists_fingerprints_expiry_and_holders_and_nothing_secret(provisioned):
    desc = describe(provisioned.root)
    holders = {r["holder"].split(" (")[0] for r in desc["rows"]}
    assert {"coordinator", "site 0", "site 1", "site 2", "provisioner"} <= holders
    exp = [r for r in desc["rows"] if r["expires"]]
    assert exp and all(360 < r["days_left"] <= 366 for r in exp)
    text = json.dumps(desc)
    root = provisioned.root
    secret_files = [root / "ca/ca.key", root / "coordinator/tls/server.key"] + [
        root / f"site-{k}/node/auth.key" for k in range(3)]
    for path in secret_files:
        body = [line for line in path.read_text().splitlines()
                if line.strip() and not line.startswith("-----")]
        assert len(body) >= 2 and len(body[0]) >= 40, path  # the base64 of the key
        assert not [line for line in body if line in text], path
    for key in [root / f"site-{k}/he/sign.key" for k in range(3)] + [
            root / "coordinator/he/sign.key"]:  # the hex private signing keys
        private = key.read_text().split()[-1]
        assert len(private) == 64 and private not in text
    assert "PRIVATE KEY" not in text
    site = describe(provisioned.site(2))
    assert site["kind"] == "site" and all("site 2" in r["holder"] for r in site["rows"])
    result = runner.invoke(app, ["deploy", "show", str(provisioned.coordinator), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["kind"] == "coordinator"


def test_show_names_a_damaged_file_instead_of_a_traceback(dep):
    (dep / "coordinator/tls/server.crt").write_text("junk\n")
    with pytest.raises(DeployError, match=r"coordinator/tls/server.crt is not a PEM certificate"):
        describe(dep)
    result = runner.invoke(app, ["deploy", "show", str(dep)])
    assert result.exit_code == 2 and "server.crt" in result.stdout
    assert "Traceback" not in result.stdout
    (dep / "site-1/he/bundle.json").write_text("{not json")
    with pytest.raises(DeployError, match=r"site-1/he/bundle.json is not valid JSON"):
        describe(dep / "site-1")


def _server_cert(dep: Path, ca: bool, usage) -> None:
    """Replace the coordinator's certificate and key by ones signed with the deployment's
    own CA key, of the given BasicConstraints ``ca`` and extended key usage ``usage``."""
    ca_key = serialization.load_pem_private_key((dep / "ca/ca.key").read_bytes(), None)
    ca_cert = pki.load_cert(dep / "ca/ca.crt")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bad")]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.SubjectAlternativeName(
                   [x509.DNSName("hospital-a.example.org")]), critical=False)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    tls = dep / "coordinator/tls"
    (tls / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(tls / "server.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@pytest.mark.parametrize("ca, usage, message", [
    (True, [ExtendedKeyUsageOID.SERVER_AUTH], r"is a CA certificate \(BasicConstraints ca=True\)"),
    (False, [ExtendedKeyUsageOID.CLIENT_AUTH],
     r"is not for a TLS server \(its extended key usage lacks serverAuth\)"),
])
def test_a_server_certificate_that_is_a_ca_or_not_for_servers_is_refused(dep, ca, usage,
                                                                          message):
    tls = dep / "coordinator/tls"
    _server_cert(dep, ca, usage)
    with pytest.raises(pki.PKIError, match=rf"SuperLink certificate .*server.crt {message}"):
        pki.check_server_cert(tls / "server.crt", tls / "server.key", tls / "ca.crt",
                              hosts=["hospital-a.example.org"])
    with pytest.raises(DeployError, match=message):
        check_coordinator(dep / "coordinator")
    # Without an extended key usage, a server certificate of this CA is accepted.
    _server_cert(dep, False, None)
    pki.check_server_cert(tls / "server.crt", tls / "server.key", tls / "ca.crt",
                          hosts=["hospital-a.example.org"])


def test_a_site_starts_with_its_own_node_config(dep, data):
    site = check_site(dep / "site-2", data, epsilon=4, person_level=True, anonymize="blur")
    c = site.node_config
    assert c["he-sender"] == "2" and c["he-keys"].endswith("site-2/he")
    assert c["data-path"] == str(data.resolve()) and c["dp-epsilon"] == "4"
    assert c["dp-unit"] == "person" and c["anonymize"] == "blur" and c["federation-size"] == "3"
    assert set(c) <= set(NODE_CONFIG_KEYS)
    plain = check_site(dep / "site-2", data, encrypted=False)
    assert "he-keys" not in plain.node_config


def test_what_a_site_checks_before_it_connects(dep, data, provisioned, tmp_path):
    site = dep / "site-0"
    before = tree_digest(site)
    # A key file others can read.
    os.chmod(site / "node/auth.key", 0o644)
    with pytest.raises(DeployError, match=r"auth.key is readable by other users.*chmod 600"):
        check_site(site, data)
    os.chmod(site / "node/auth.key", 0o600)
    # Missing data; a folder without exactly one prepared file; a file that is not one.
    with pytest.raises(DeployError, match="does not exist: prepare"):
        check_site(site, tmp_path / "nope.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeployError, match="no client_.*npz file"):
        check_data(tmp_path / "empty")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DeployError, match="cannot be read as a prepared data file"):
        check_site(site, tmp_path / "bad.npz")
    # An unknown node config key (a typo would drop the site's privacy cap).
    with pytest.raises(DeployError, match="dp-epsilom.*did you mean dp-epsilon"):
        parse_node_config(["dp-epsilom=8"])
    with pytest.raises(DeployError, match="set from the site folder"):
        check_site(site, data, extra={"he-sender": "1"})
    assert tree_digest(site) == before


def test_a_swapped_ca_an_expired_certificate_and_another_ceremony_are_named(dep, data, tmp_path):
    other = init_deployment(tmp_path / "other", 2)
    site = dep / "site-1"
    # The CA of another provisioning (a man in the middle's root).
    shutil.copy(other.site(1) / "tls/ca.crt", site / "tls/ca.crt")
    with pytest.raises(DeployError, match="is not this deployment's CA"):
        check_site(site, data)
    shutil.copy(dep / "ca/ca.crt", site / "tls/ca.crt")
    # Two years on, the CA has expired.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=800)
    with pytest.raises(DeployError, match="expired on .*fedface deploy init --force"):
        check_site(site, data, now=later)
    # The HE bundle of another key ceremony.
    shutil.rmtree(site / "he")
    shutil.copytree(other.site(1) / "he", site / "he")
    with pytest.raises(DeployError, match="another key ceremony"):
        check_site(site, data)
    assert check_site(site, data, encrypted=False).index == 1
    # A node key of another site.
    shutil.copy(dep / "site-2/node/auth.key", site / "node/auth.key")
    with pytest.raises(DeployError, match="is not the private key of"):
        check_site(site, data, encrypted=False)


def test_what_the_coordinator_checks(dep, tmp_path):
    assert sorted(check_coordinator(dep / "coordinator").node_keys) == [0, 1, 2]
    other = init_deployment(tmp_path / "other", 2)
    coord = dep / "coordinator"
    # A node key replaced by another's.
    shutil.copytree(coord, tmp_path / "c2")
    shutil.copy(dep / "site-0/node/auth.pub", tmp_path / "c2/nodes/site-1.pub")
    with pytest.raises(DeployError, match=r"site-1.pub .* not the key provisioned for site 1"):
        check_coordinator(tmp_path / "c2")
    # A SuperLink certificate of another CA.
    for f in ("server.crt", "server.key"):
        shutil.copy(other.coordinator / "tls" / f, coord / "tls" / f)
    with pytest.raises(DeployError, match="not signed by the CA"):
        check_coordinator(coord)
    with pytest.raises(DeployError, match="root folder, not the coordinator's"):
        check_coordinator(dep)


def test_cli_init_refuses_to_overwrite_and_supernode_dry_run_prints_the_line(tmp_path, data):
    out = tmp_path / "d"
    r = runner.invoke(app, ["deploy", "init", "--out", str(out), "--sites", "2"])
    assert r.exit_code == 0, r.stdout
    r = runner.invoke(app, ["deploy", "init", "--out", str(out), "--sites", "2"])
    assert r.exit_code == 2 and "--force" in r.stdout
    r = runner.invoke(app, ["deploy", "supernode", str(out / "site-1"), "--data", str(data),
                            "--epsilon", "8", "--dry-run"])
    assert r.exit_code == 0, r.stdout
    line = " ".join(r.stdout.split())
    assert "flower-supernode --superlink localhost:9092 --root-certificates" in line
    assert "--auth-supernode-private-key" in line and "he-sender=" in line
    assert "dp-epsilon=" in line and "insecure" not in line
    r = runner.invoke(app, ["deploy", "supernode", str(out / "site-1"), "--data", str(data),
                            "--insecure", "--dry-run"])
    assert r.exit_code == 0 and "warning" in r.stdout and "--insecure" in r.stdout
    assert "--auth-supernode-private-key" not in r.stdout
    r = runner.invoke(app, ["deploy", "superlink", str(out / "coordinator"), "--dry-run"])
    assert r.exit_code == 0
    assert "--enable-supernode-auth" in r.stdout and "--ssl-certfile" in r.stdout
    r = runner.invoke(app, ["deploy", "supernode", str(out / "site-1"), "--data", str(data),
                            "--node-config", "dp-epsilom=8", "--dry-run"])
    assert r.exit_code == 2 and "did you mean dp-epsilon" in r.stdout
    r = runner.invoke(app, ["deploy", "supernode", str(out / "coordinator"), "--data", str(data)])
    assert r.exit_code == 2 and "not a site's" in r.stdout
