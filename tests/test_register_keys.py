"""deploy.processes.register_connection_keys against a real SuperLink: every key in one
process, each with its node id; a failure is one line that names the key (issue 21 item 10:
one `flwr` process per key registered 67 keys in 240 s)."""

from __future__ import annotations

import subprocess

import pytest

from fedshield.deploy import pki
from fedshield.deploy.processes import Children, flower_env, flwr_bin, free_port, register_connection_keys
from fedshield.privacy.errors import FedShieldError

pytestmark = pytest.mark.e2e


def test_keys_are_registered_in_one_process_and_a_failure_names_the_key(tmp_path):
    from fedshield.server.cli import CONNECTION, wait_tls, write_flower_config

    d = tmp_path / "pki"
    pki.init_pki(d, "localhost", ["127.0.0.1"], days=2, ca_days=2)
    keys = []
    for i in range(12):
        pki.connection_key_pair(f"site-{i:02d}", tmp_path / "keys")
        keys.append((tmp_path / "keys" / f"site-{i:02d}.pub", f"site-{i:02d}"))
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    write_flower_config(home, port, d / "ca.crt")
    env = flower_env(home)
    with Children() as children, open(home / "superlink.log", "ab") as log:
        link = children.start([flwr_bin("flower-superlink"), "--ssl-ca-certfile", str(d / "ca.crt"),
                               "--ssl-certfile", str(d / "server.crt"), "--ssl-keyfile", str(d / "server.key"),
                               "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                               "--host", "127.0.0.1", "--port", str(port)], env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=str(home))
        wait_tls(port, d / "ca.crt", link, home / "superlink.log")
        ids = register_connection_keys(keys[:10], env, CONNECTION)
        assert sorted(ids) == sorted(k for k, _ in keys[:10]) and len(set(ids.values())) == 10
        listed = subprocess.run([flwr_bin("flwr"), "supernode", "ls", CONNECTION, "--format", "json"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert all(str(node_id) in listed.stdout for node_id in ids.values())
        # Registered already: Flower refuses it; the error is one line naming that key.
        with pytest.raises(FedShieldError) as err:
            register_connection_keys([keys[10], keys[3]], env, CONNECTION)
        msg = str(err.value)
        assert "\n" not in msg and str(keys[3][0]) in msg and "1 of 2 registered" in msg
