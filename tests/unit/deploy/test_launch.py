"""The pre-flight check of the SuperLink's address, the Flower command lines, the ClientApp's
own check of its node config, and lost nodes in a round's record."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from flwr.app import Context, Error, Message, RecordDict

from client.task import client_config
from fedface.deploy.checks import check_coordinator, check_site
from fedface.deploy.launch import preflight, superlink_command, supernode_command
from fedface.deploy.provision import DeployError, init_deployment
from server.screening import exchange


@pytest.fixture(scope="module")
def prov(tmp_path_factory):
    return init_deployment(tmp_path_factory.mktemp("dep") / "d", 2, ["127.0.0.1", "localhost"])


@pytest.fixture
def data(tmp_path):
    """A prepared data file as `fedface prepare` writes it (tiny)."""
    import numpy as np

    path = tmp_path / "client_000.npz"
    z = np.zeros((1, 3, 4, 4), np.uint8)
    np.savez(path, x_train=z, y_train=z[:, 0, 0, 0], x_val=z, y_val=z[:, 0, 0, 0])
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_that_never_answers_is_named_after_the_retry_budget():
    waits = []
    with pytest.raises(DeployError, match=r"did not answer after 3 tries.*--max-retries"):
        preflight(f"127.0.0.1:{closed_port()}", None, max_retries=3, max_wait=60,
                  sleep=waits.append)
    assert waits == [0.5, 1.0]  # backing off, never hanging
    with pytest.raises(DeployError, match="not HOST:PORT"):
        preflight("hospital-a", None)


def tls_server(cert, key):
    """A one-shot TLS server on loopback with ``cert``; returns its port."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def test_the_superlinks_certificate_must_be_of_the_sites_ca(prov, tmp_path):
    coord = prov.coordinator
    port = tls_server(coord / "tls/server.crt", coord / "tls/server.key")
    preflight(f"127.0.0.1:{port}", prov.site(0) / "tls/ca.crt", max_retries=1)  # accepted
    other = init_deployment(tmp_path / "other", 2, ["127.0.0.1"])
    port = tls_server(other.coordinator / "tls/server.crt", other.coordinator / "tls/server.key")
    with pytest.raises(DeployError, match="does not accept.*tls/ca.crt"):
        preflight(f"127.0.0.1:{port}", prov.site(0) / "tls/ca.crt", max_retries=5)


def test_the_command_lines_have_tls_and_node_auth_unless_insecure(prov, data):
    coord = check_coordinator(prov.coordinator)
    cmd = superlink_command(coord, "0.0.0.0", 9092)
    assert {"--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile",
            "--enable-supernode-auth", "--database"} <= set(cmd)
    assert "--insecure" not in cmd
    insecure = superlink_command(coord, "0.0.0.0", 9092, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    site = check_site(prov.site(1), data)
    cmd = supernode_command(site, "127.0.0.1:9092")
    assert cmd[cmd.index("--root-certificates") + 1].endswith("site-1/tls/ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1].endswith("site-1/node/auth.key")
    node_config = cmd[cmd.index("--node-config") + 1]
    assert 'he-sender="1"' in node_config and "data-path=" in node_config
    assert cmd[cmd.index("--port") + 1] == "9095"  # 9094 + site index: two sites, one host
    assert "--max-retries" not in cmd  # Flower reconnects for as long as the node lives


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_the_clientapp_refuses_a_node_config_key_it_does_not_know():
    with pytest.raises(ValueError, match="dp-epsilom.*fix the SuperNode's --node-config"):
        client_config(context({"dp-epsilom": 8.0}), None)
    cfg = client_config(context({"anonymize": "blur", "anonymize-preset": "high"}), None)
    assert (cfg.anonymize, cfg.anonymize_preset) == ("blur", "high")  # the site's policy
    # The run cannot weaken it: neither its method nor its preset applies.
    run = Context(run_id=1, node_id=7, node_config={"anonymize": "blur"}, state=RecordDict(),
                  run_config={"anonymize": "none", "anonymize-preset": "low"})
    cfg = client_config(run, None)
    assert (cfg.anonymize, cfg.anonymize_preset) == ("blur", "medium")
    assert client_config(context({"partition-id": 0, "num-partitions": 3}), None).anonymize == "none"


class LosingGrid:
    """A grid whose SuperLink answers for a node it lost, as Flower's does."""

    def send_and_receive(self, msgs, timeout):
        for i, m in enumerate(msgs):
            m.metadata.__dict__["_message_id"] = f"m{i}"
        ok = Message(RecordDict(), reply_to=msgs[0])
        lost = Message(Error(code=5, reason="Node Unavailable"), reply_to=msgs[1])
        lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id
        return [ok, lost]


def test_a_reply_made_by_the_superlink_for_a_lost_node_names_that_node(flower_task):
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 22)]
    replies = exchange(LosingGrid(), msgs, 10)
    assert [int(r.metadata.src_node_id) for r in replies] == [11, 22]
    assert replies[1].has_error() and replies[1].error.code == 5


def test_a_certificate_for_another_name_is_named_as_such(tmp_path):
    only_ip = init_deployment(tmp_path / "ip", 2, ["127.0.0.1"])
    port = tls_server(only_ip.coordinator / "tls/server.crt",
                      only_ip.coordinator / "tls/server.key")
    with pytest.raises(DeployError, match="certificate is not for 'localhost'"):
        preflight(f"localhost:{port}", only_ip.site(0) / "tls/ca.crt", max_retries=1)


def test_node_config_given_as_text_gets_the_checks_of_the_options(prov, data):
    site = prov.site(0)
    for extra, message in [({"dp-epsilon": "abc"}, "not a number"),
                           ({"dp-epsilon": "-1"}, "must be positive"),
                           ({"dp-unit": "hospital"}, "one of image, person"),
                           ({"anonymize": "bogus"}, "--anonymize bogus"),
                           ({"anonymize-preset": "high"}, "preset without an anonymizer"),
                           ({"partition-id": "0"}, "the simulation's"),
                           ({"he-sender": "1"}, "set from the site folder")]:
        with pytest.raises(DeployError, match=message):
            check_site(site, data, extra=extra)
    with pytest.raises(DeployError, match="given twice"):
        check_site(site, data, epsilon=8, extra={"dp-epsilon": "4"})
    ok = check_site(site, data, extra={"dp-epsilon": "4", "dp-unit": "person"})
    assert ok.node_config["dp-epsilon"] == "4" and ok.node_config["dp-unit"] == "person"


def test_a_refused_activation_is_told_from_a_network_failure(prov, data):
    from fedface.deploy.launch import explain_exit

    site = check_site(prov.site(1), data)
    refused = explain_exit(1, site, "[code: 2004] Failed to activate SuperNode.", 70)
    assert "refused to activate site 1's node key" in refused and "revoke" in refused
    assert "already connected" in refused and "70 s" in refused
    lost = explain_exit(1, site, "Failed to initialize the connection to the SuperLink.\n"
                                 "[Errno 111] Connection refused")
    assert "could not connect" in lost and "refused to activate" not in lost


def test_bench_deploy_writes_its_json_and_table(monkeypatch, tmp_path):
    import json

    from typer.testing import CliRunner

    from fedface.cli import app
    from fedface.deploy import bench

    row = {"mode": "simulation", "encrypted": False, "rounds": 2, "seconds_per_round": 2.0,
           "payload_bytes_per_round": 10, "loopback_bytes_per_round": 5,
           "loopback_over_payload": 0.5, "job_wall_seconds": 9.0, "clients_ok": [3, 3]}
    fake = {"bench": "deploy", "sites": 3, "machine": "2 cores", "rows": [row],
            "setting": {"synthetic_identities": 60, "synthetic_images": 6, "image_size": 32,
                        "rounds": 2, "local_epochs": 1},
            "deployed_over_simulation": {"plaintext": {"seconds_per_round": 6.0,
                                                       "payload_bytes_per_round": 1.0,
                                                       "extra_seconds_per_round": 10.0}}}
    monkeypatch.setattr(bench, "run", lambda *a, **kw: dict(fake))
    out = tmp_path / "bench_deploy.json"
    res = CliRunner().invoke(app, ["bench", "deploy", "--json", str(out), "--quick"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["rows"] == [row]
    table = out.with_suffix(".md").read_text()
    assert "| simulation | no | 2.0 |" in table and "6.0x seconds per round (+10.0 s)" in table
