"""goplug: out-of-process plugins for Python, in any language, on GoPlug's wire format.

Application side: :class:`PluginRegistry` discovers plugins announced in a directory, loads them
and hands out :class:`PluginHandle` objects to call them. Plugin side: :class:`Plugin` serves
methods and sends notifications. :mod:`goplug.aio` offers the same with asyncio.

Every public name is importable from here. Each is loaded on first use, so a plugin process that
imports only :class:`Plugin` never loads the registry side (start-up time matters for plugins).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from goplug.callbacks import (
        CallbackSettings as CallbackSettings,
    )
    from goplug.client import (
        ClientSettings as ClientSettings,
    )
    from goplug.client import (
        Subscription as Subscription,
    )
    from goplug.errors import (
        CallbackNotFound as CallbackNotFound,
    )
    from goplug.errors import (
        CallTimeout as CallTimeout,
    )
    from goplug.errors import (
        ConfigError as ConfigError,
    )
    from goplug.errors import (
        GoPlugError as GoPlugError,
    )
    from goplug.errors import (
        MethodNotFound as MethodNotFound,
    )
    from goplug.errors import (
        NotifyTimeout as NotifyTimeout,
    )
    from goplug.errors import (
        PluginAlreadyLoaded as PluginAlreadyLoaded,
    )
    from goplug.errors import (
        PluginAlreadyRunning as PluginAlreadyRunning,
    )
    from goplug.errors import (
        PluginConnectionError as PluginConnectionError,
    )
    from goplug.errors import (
        PluginNotDiscovered as PluginNotDiscovered,
    )
    from goplug.errors import (
        PluginNotLoaded as PluginNotLoaded,
    )
    from goplug.errors import (
        PluginStartError as PluginStartError,
    )
    from goplug.errors import (
        ProtocolError as ProtocolError,
    )
    from goplug.errors import (
        RegistryClosed as RegistryClosed,
    )
    from goplug.errors import (
        RemoteError as RemoteError,
    )
    from goplug.launcher import (
        LaunchSettings as LaunchSettings,
    )
    from goplug.launcher import (
        PluginProcess as PluginProcess,
    )
    from goplug.plugin import (
        Plugin as Plugin,
    )
    from goplug.plugin import (
        PluginSettings as PluginSettings,
    )
    from goplug.plugin import (
        serve as serve,
    )
    from goplug.registry import (
        PluginEvent as PluginEvent,
    )
    from goplug.registry import (
        PluginHandle as PluginHandle,
    )
    from goplug.registry import (
        PluginRegistry as PluginRegistry,
    )
    from goplug.registry import (
        PluginState as PluginState,
    )
    from goplug.registry import (
        RegistrySettings as RegistrySettings,
    )
    from goplug.server import (
        ServerSettings as ServerSettings,
    )
    from goplug.tls import (
        TLSConfig as TLSConfig,
    )
    from goplug.wire.http import (
        Limits as Limits,
    )

__version__ = "0.1.0"

_WHERE = {
    "CallbackSettings": "goplug.callbacks",
    "ClientSettings": "goplug.client",
    "Subscription": "goplug.client",
    "CallbackNotFound": "goplug.errors",
    "CallTimeout": "goplug.errors",
    "ConfigError": "goplug.errors",
    "GoPlugError": "goplug.errors",
    "MethodNotFound": "goplug.errors",
    "NotifyTimeout": "goplug.errors",
    "PluginAlreadyLoaded": "goplug.errors",
    "PluginAlreadyRunning": "goplug.errors",
    "PluginConnectionError": "goplug.errors",
    "PluginNotDiscovered": "goplug.errors",
    "PluginNotLoaded": "goplug.errors",
    "PluginStartError": "goplug.errors",
    "ProtocolError": "goplug.errors",
    "RegistryClosed": "goplug.errors",
    "RemoteError": "goplug.errors",
    "LaunchSettings": "goplug.launcher",
    "PluginProcess": "goplug.launcher",
    "Plugin": "goplug.plugin",
    "PluginSettings": "goplug.plugin",
    "serve": "goplug.plugin",
    "PluginEvent": "goplug.registry",
    "PluginHandle": "goplug.registry",
    "PluginRegistry": "goplug.registry",
    "PluginState": "goplug.registry",
    "RegistrySettings": "goplug.registry",
    "ServerSettings": "goplug.server",
    "TLSConfig": "goplug.tls",
    "Limits": "goplug.wire.http",
}

__all__ = [
    "CallTimeout",
    "CallbackNotFound",
    "CallbackSettings",
    "ClientSettings",
    "ConfigError",
    "GoPlugError",
    "LaunchSettings",
    "Limits",
    "MethodNotFound",
    "NotifyTimeout",
    "Plugin",
    "PluginAlreadyLoaded",
    "PluginAlreadyRunning",
    "PluginConnectionError",
    "PluginEvent",
    "PluginHandle",
    "PluginNotDiscovered",
    "PluginNotLoaded",
    "PluginProcess",
    "PluginRegistry",
    "PluginSettings",
    "PluginStartError",
    "PluginState",
    "ProtocolError",
    "RegistryClosed",
    "RegistrySettings",
    "RemoteError",
    "ServerSettings",
    "Subscription",
    "TLSConfig",
    "serve",
]


def __getattr__(name: str) -> object:
    module_name = _WHERE.get(name)
    if module_name is None:
        raise AttributeError(f"module 'goplug' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
