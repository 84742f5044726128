"""An application using plugins announced in etcd.

python app.py ETCD_LOCATION CERTDIR

Waits for Resize@Img, calls it over mutual TLS, receives one notification, and leaves the
plugin running (closing a registry never stops plugins it did not launch).
"""

from __future__ import annotations

import sys
import threading
import time

import goplug
from goplug.tls import dev_configs


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    location, certdir = sys.argv[1], sys.argv[2]
    with goplug.PluginRegistry(location, tls=dev_configs(certdir)["registry"]) as registry:
        deadline = time.monotonic() + 10
        while not registry.is_loaded("Resize", "Img"):
            if time.monotonic() > deadline:
                print("Resize@Img did not show up in etcd within 10 s", file=sys.stderr)
                return 1
            time.sleep(0.05)
        handle = registry.get_plugin("Resize", "Img")
        assert handle is not None
        print("loaded", handle.label, "from", handle.conf.url if handle.conf else "?")
        print("Halve:", handle.execute("Halve", b"0123456789").decode())
        shouted = threading.Event()

        def on_shouted(data: bytes) -> None:
            print("notified:", data.decode())
            shouted.set()

        handle.register_callback(on_shouted, "shouted")
        # The subscription reaches the plugin with the callback's first poll: until then the
        # plugin has nobody to notify, so ask again until one arrives.
        deadline = time.monotonic() + 5
        while not shouted.is_set() and time.monotonic() < deadline:
            handle.execute("Shout", b"hello from afar")
            shouted.wait(0.2)
        return 0 if shouted.is_set() else 1


if __name__ == "__main__":
    sys.exit(main())
