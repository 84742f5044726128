"""``goplug new``: a ready plugin project in Python, JavaScript or Go.

Each project holds the plugin (methods Hello, Echo, Upper, Fail and Notify; the last four let
the conformance suite exercise it), a test that runs the conformance suite on it, and a README
that says how to run both. A project passes its own test as generated.

The templates are in ``goplug/templates/<language>/`` (``$name``-style placeholders). The
JavaScript and Go projects use the libraries in this repository's ``sdk/`` directory: the
generated ``package.json`` and ``go.mod`` point at them.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

from goplug.errors import ConfigError
from goplug.wire.pconf import check_name

__all__ = ["LANGUAGES", "create_project", "sdk_dir"]

LANGUAGES = ("python", "js", "go")
_TEMPLATES = Path(__file__).resolve().parent / "templates"


def sdk_dir(language: str) -> Path:
    """The library of ``language`` in the source checkout goplug runs from.

    Raises ConfigError when goplug does not run from a checkout that holds ``sdk/``.
    """
    path = Path(__file__).resolve().parents[2] / "sdk" / language
    marker = path / ("package.json" if language == "js" else "go.mod")
    if not marker.is_file():
        raise ConfigError(
            f"the {language} plugin library (sdk/{language}) is not next to this goplug: "
            "run goplug new from a source checkout of goplug"
        )
    return path


def create_project(name: str, language: str, namespace: str = "", directory: str = "") -> Path:
    """Write a plugin project for ``name`` into ``directory`` (default: ``./<name>``).

    Raises ConfigError for an invalid name, an unknown language, a missing library or a
    directory that exists and is not empty. Returns the project directory.
    """
    check_name(name, "name", plugin_side=True)
    check_name(namespace, "namespace", plugin_side=True)
    if not name.isidentifier():
        raise ConfigError(f"invalid name {name!r}: use letters, digits and _ (an identifier)")
    if language not in LANGUAGES:
        raise ConfigError(f"unknown language {language!r}: one of {', '.join(LANGUAGES)}")
    target = Path(directory or name).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} exists and is not an empty directory")
    values = {
        "name_py": repr(name),
        "namespace_py": repr(namespace),
        "name_json": json.dumps(name),
        "namespace_json": json.dumps(namespace),
        "label": f"{name}@{namespace}" if namespace else name,
        "package": name.lower().replace("_", "-") + "-plugin",
        "sdk": str(sdk_dir(language)) if language != "python" else "",
    }
    source = _TEMPLATES / language
    templates = sorted(p for p in source.rglob("*.tmpl") if p.is_file())
    try:
        target.mkdir(parents=True, exist_ok=True)
        for template in templates:
            out = target / template.relative_to(source).with_suffix("")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(Template(template.read_text()).substitute(values))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot write the project into {target}: {reason}") from None
    return target
