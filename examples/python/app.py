"""GoPlug's example application, in Python: use the plugin Do@Test.

Start the plugin, then the application, on the same directory:

    python examples/python/do_plugin.py ./plugins &
    python examples/python/app.py ./plugins

The application waits for Do@Test to be loaded, lists its methods, executes each one, pings
it, registers the callback ``callBack`` and waits for one notification, then unloads the
plugin (which keeps running: unloading only sends it /Stop) and closes the registry.
"""

from __future__ import annotations

import sys
import threading

from goplug import GoPlugError, PluginEvent, PluginRegistry

NAME, NAMESPACE = "Do", "Test"
WAIT = 30.0


def main(argv: list[str]) -> int:
    location = argv[1] if len(argv) > 1 else "./plugins"
    loaded = threading.Event()

    def on_event(event: PluginEvent) -> None:
        print(f"registry: {event.kind} {event.handle.label} {event.reason}".rstrip())
        if event.kind == "loaded" and (event.name, event.namespace) == (NAME, NAMESPACE):
            loaded.set()

    with PluginRegistry(location, auto_discover=True) as registry:
        registry.add_listener(on_event)
        if registry.is_loaded(NAME, NAMESPACE):  # loaded before the listener was added
            loaded.set()
        print(f"waiting for {NAME}@{NAMESPACE} in {registry.location} ...")
        if not loaded.wait(WAIT):
            print(f"{NAME}@{NAMESPACE} was not loaded within {WAIT:g} s; is the plugin running?")
            print(f"  python examples/python/do_plugin.py {location}")
            return 1
        plugin = registry.get_plugin(NAME, NAMESPACE)
        if plugin is None:
            print(f"{NAME}@{NAMESPACE} went away")
            return 1

        try:
            print(f"methods: {plugin.methods}")
            for method in plugin.methods:
                output = plugin.execute(method, b"hello from the application")
                print(f"execute {method}: {output!r}")

            print(f"ping: {plugin.ping() * 1000:.3f} ms")

            received = threading.Event()

            def callBack(data: bytes) -> None:
                print(f"callback callBack: {data!r}")
                received.set()

            plugin.register_callback(callBack)  # the name is the function's: "callBack"
            print("registered the callback callBack; waiting for a notification ...")
            if not received.wait(5.0):
                print("no notification within 5 s")
                return 1

            registry.unload_plugin(plugin)
            print(f"unloaded {plugin.label}: loaded={registry.is_loaded(NAME, NAMESPACE)}")
        except GoPlugError as exc:
            print(f"error: {type(exc).__name__}: {exc}")
            return 1
    print("registry closed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
