"""The goplug plugin of the TLS rows: ``tls_plugin.py LOCATION NAME CERTDIR [COUNT]``.

``bench_plugin.py``'s plugin (``Echo`` and the rest), in namespace ``Bench``, listening on TCP
on loopback (``tcp://127.0.0.1:0``, a free port) with mutual TLS: ``CERTDIR/ca.pem`` is the CA
and ``CERTDIR/plugin.pem``/``plugin.key`` its own certificate, and it requires a client
certificate from that CA. LOCATION is a plugin directory (the ``.pconf`` carries ``Url
https://127.0.0.1:PORT``) or ``etcd://HOST:PORT/PREFIX`` (announced at ``PREFIX/Bench/NAME`` on
a lease). With COUNT the process hosts that many plugins named NAME0, NAME1, ..., each on its
own port. It prints ``ready`` once every plugin it hosts is announced.
"""

import os
import sys

from _watchdog import exit_with_parent
from bench_plugin import build

from goplug import TLSConfig
from goplug.plugin import serve

NAMESPACE = "Bench"


def main() -> None:
    location, name, certs = sys.argv[1], sys.argv[2], sys.argv[3]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    exit_with_parent()
    tls = TLSConfig(
        ca=os.path.join(certs, "ca.pem"),
        cert=os.path.join(certs, "plugin.pem"),
        key=os.path.join(certs, "plugin.key"),
    )
    names = [name] if count == 0 else [f"{name}{i}" for i in range(count)]
    plugins = [build(location, n, NAMESPACE, url="tcp://127.0.0.1:0", tls=tls) for n in names]
    try:
        for p in plugins:
            p.start()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        serve(*plugins)  # until SIGTERM, then stops them all
    finally:
        for p in reversed(plugins):
            p.stop()


if __name__ == "__main__":
    main()
