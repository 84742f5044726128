"""goplug: out-of-process plugins for Python, in any language, on GoPlug's wire format.

Application side: :class:`PluginRegistry` discovers plugins announced in a directory, loads them
and hands out :class:`PluginHandle` objects to call them. Plugin side: :class:`Plugin` serves
methods and sends notifications. :mod:`goplug.aio` offers the same with asyncio.
"""

from goplug.callbacks import CallbackSettings
from goplug.client import ClientSettings, Subscription
from goplug.errors import (
    CallbackNotFound,
    CallTimeout,
    ConfigError,
    GoPlugError,
    MethodNotFound,
    NotifyTimeout,
    PluginAlreadyLoaded,
    PluginAlreadyRunning,
    PluginConnectionError,
    PluginNotDiscovered,
    PluginNotLoaded,
    ProtocolError,
    RegistryClosed,
    RemoteError,
)
from goplug.plugin import Plugin, PluginSettings, serve
from goplug.registry import (
    PluginEvent,
    PluginHandle,
    PluginRegistry,
    PluginState,
    RegistrySettings,
)
from goplug.server import ServerSettings
from goplug.wire.http import Limits

__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
    "CallbackNotFound",
    "CallbackSettings",
    "ClientSettings",
    "ConfigError",
    "GoPlugError",
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
    "PluginRegistry",
    "PluginSettings",
    "PluginState",
    "ProtocolError",
    "RegistryClosed",
    "RegistrySettings",
    "RemoteError",
    "ServerSettings",
    "Subscription",
    "serve",
]
