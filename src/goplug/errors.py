"""Every error goplug raises: one hierarchy under :class:`GoPlugError`."""

from __future__ import annotations

__all__ = [
    "CallTimeout",
    "CallbackNotFound",
    "ConfigError",
    "GoPlugError",
    "MethodNotFound",
    "NotifyTimeout",
    "PluginAlreadyLoaded",
    "PluginAlreadyRunning",
    "PluginConnectionError",
    "PluginNotDiscovered",
    "PluginNotLoaded",
    "PluginStartError",
    "ProtocolError",
    "RegistryClosed",
    "RemoteError",
]


class GoPlugError(Exception):
    """Base class of every error raised by goplug."""


class ConfigError(GoPlugError):
    """A `.pconf` file, a plugin setting or a name is invalid.

    When the problem is in a file, :attr:`path` names it.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class PluginNotDiscovered(GoPlugError):
    """No plugin with that name and namespace has announced itself."""


class PluginAlreadyLoaded(GoPlugError):
    """The plugin is already loaded in this registry."""


class PluginNotLoaded(GoPlugError):
    """The operation needs a loaded plugin, and this one is not (unloaded, lost or never loaded)."""


class PluginAlreadyRunning(GoPlugError):
    """A live plugin already owns the socket this plugin wants to listen on."""


class PluginStartError(GoPlugError):
    """A launched plugin did not come up: it exited, or did not announce itself in time.

    :attr:`exit_code` is its exit status (negative: killed by that signal; None: it was still
    running and was stopped); :attr:`stderr_tail` holds the last lines it wrote to stderr.
    """

    def __init__(
        self, message: str, exit_code: int | None = None, stderr_tail: list[str] | None = None
    ) -> None:
        tail = stderr_tail or []
        text = message
        if tail:
            text += "\nlast lines of its stderr:\n" + "\n".join("  " + line for line in tail)
        super().__init__(text)
        self.exit_code = exit_code
        self.stderr_tail = tail


class PluginConnectionError(GoPlugError):
    """The plugin could not be reached, or its connection broke before the answer was complete."""


class ProtocolError(GoPlugError):
    """The peer sent bytes that break the wire protocol (or exceed a limit)."""


class MethodNotFound(GoPlugError):
    """The plugin has no method of that name."""


class CallTimeout(GoPlugError):
    """The plugin did not answer within the call's timeout; the connection was discarded."""


class CallbackNotFound(GoPlugError):
    """No application has registered a callback of that name with this plugin."""


class NotifyTimeout(GoPlugError):
    """A subscriber's queue stayed full for the whole notify timeout (back-pressure)."""


class RegistryClosed(GoPlugError):
    """The registry was closed while the operation was waiting, or before it started."""


class RemoteError(GoPlugError):
    """The plugin's method raised an exception.

    :attr:`remote_type`, :attr:`remote_message` and :attr:`remote_traceback` carry what the plugin
    reported; :attr:`status` is the HTTP status it answered with.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        status: int = 500,
    ) -> None:
        super().__init__(f"{remote_type}: {remote_message}" if remote_message else remote_type)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.status = status

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            return f"{text}\n--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        return text
