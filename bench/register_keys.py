"""Registering the sites' connection keys with the SuperLink: one `flwr` process per key
(before) against one process for all of them (`deploy.processes.register_connection_keys`).

    .venv/bin/python bench/register_keys.py [--keys 1000] [--old-keys 20]

A real `flower-superlink` on loopback with TLS and SuperNode authentication, started as
`fedshield server` starts it; `--keys` fresh P-384 connection keys registered in one batch,
and `--old-keys` more the old way (`flwr supernode register KEY.pub` per key; at ~3.6 s a
key on this 2-core machine the old way is extrapolated to `--keys`, not run: 1,000 keys
would take an hour). Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--old-keys", type=int, default=20)
    args = ap.parse_args()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedshield.deploy.pki import init_pki
    from fedshield.deploy.processes import (
        Children,
        flower_env,
        flwr_bin,
        free_port,
        register_connection_keys,
        run_flower_cli,
    )
    from fedshield.server.cli import CONNECTION, wait_tls, write_flower_config

    tmp = Path(tempfile.mkdtemp(prefix="register-keys-"))
    pki = tmp / "pki"
    init_pki(pki, "localhost", ["127.0.0.1"], days=2, ca_days=2)
    keys = []
    for i in range(args.keys + args.old_keys):
        pub = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path = tmp / f"site-{i:05d}.pub"
        path.write_bytes(pub + b"\n")
        keys.append(path)
    port = free_port()
    home = tmp / "home"
    home.mkdir()
    write_flower_config(home, port, pki / "ca.crt")
    env = flower_env(home)
    with Children() as children, open(home / "superlink.log", "ab") as log:
        link = children.start([flwr_bin("flower-superlink"), "--ssl-ca-certfile", str(pki / "ca.crt"),
                               "--ssl-certfile", str(pki / "server.crt"), "--ssl-keyfile", str(pki / "server.key"),
                               "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                               "--host", "127.0.0.1", "--port", str(port)], env, stdout=log,
                              stderr=subprocess.STDOUT, cwd=str(home))
        wait_tls(port, pki / "ca.crt", link, home / "superlink.log")
        t0 = time.perf_counter()
        ids = register_connection_keys([(k, k.stem) for k in keys[:args.keys]], env, CONNECTION)
        batch = time.perf_counter() - t0
        assert len(set(ids.values())) == args.keys
        t0 = time.perf_counter()
        for k in keys[args.keys:]:
            run_flower_cli([flwr_bin("flwr"), "supernode", "register", str(k), CONNECTION, "--name", k.stem],
                           env, f"registering connection key {k}")
        old = (time.perf_counter() - t0) / max(1, args.old_keys)
    print(f"one process, {args.keys} keys: {batch:.1f} s ({1000 * batch / args.keys:.1f} ms a key)")
    print(f"one `flwr` per key, {args.old_keys} keys: {old:.2f} s a key -> {args.keys} keys ~{old * args.keys:.0f} s "
          f"({old * args.keys / batch:.0f}x); 10,000 keys ~{old * 10000 / 3600:.1f} h before, "
          f"~{batch * 10 / 60:.1f} min after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
