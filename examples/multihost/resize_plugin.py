"""A plugin for other hosts: announced in etcd, served over TCP with mutual TLS.

python resize_plugin.py ETCD_LOCATION CERTDIR [ADVERTISE]

ETCD_LOCATION is etcd://HOST:2379/PREFIX; CERTDIR is what `goplug tls init CERTDIR` made (its
plugin certificate must name ADVERTISE, the address the application reaches this host at,
127.0.0.1 by default). Runs until SIGINT or SIGTERM, then revokes its announcement.
"""

from __future__ import annotations

import sys

import goplug
from goplug.tls import dev_configs


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    location, certdir = sys.argv[1], sys.argv[2]
    advertise = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
    plugin = goplug.Plugin(
        location,
        "Resize",
        "Img",
        url="tcp://0.0.0.0:0",  # any free port, on every interface
        advertise=advertise,
        tls=dev_configs(certdir)["plugin"],
    )

    @plugin.method
    def Halve(data: bytes) -> bytes:
        return data[: len(data) // 2]

    @plugin.method
    def Shout(data: bytes) -> bytes:
        try:
            plugin.notify("shouted", data.upper())
        except goplug.CallbackNotFound:
            return b"nobody listens yet"
        return b"ok"

    plugin.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
