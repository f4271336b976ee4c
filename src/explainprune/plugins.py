"""Pruners from other packages: the entry-point group ``explainprune.pruners``.

An installed package declares ``name = "module:attr"`` under ``[project.entry-points."explainprune.pruners"]``,
``attr`` a subclass of ``explainprune.pruning.Pruner`` (``score(vlm, prompt)`` or ``keep``, optional ``layer``
and ``overhead_flops``). ``get_pruner(name)`` and ``available()`` then find it with no edit to explainprune.

Lazy: the package metadata is read on the first look-up of a name that is not built in (or on
``available()``), and a plug-in's module is imported only when it is asked for (``available()`` imports
them all). A plug-in that fails to import, is not a Pruner, or clashes (a built-in name, or one name in two
packages) names its package: a ``PluginWarning`` from ``available()`` (the built-in methods keep working),
a ``PluginError`` only when that name is asked for. ``reset()`` forgets what was read (after installing a
package in a running process, and in tests).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

GROUP = "explainprune.pruners"


class PluginError(ValueError):
    """A plug-in pruner that cannot be used (its package is named in the message)."""


class PluginWarning(UserWarning):
    """A plug-in pruner left out of ``available()`` (its package is named in the message)."""


@dataclass
class _State:
    entries: dict[str, list[metadata.EntryPoint]] | None = None  # name -> entry points (metadata only)
    loaded: dict[str, type] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)  # name -> why it cannot be used
    warned: set[str] = field(default_factory=set)


_STATE = _State()


def reset() -> None:
    """Forget the entry points read and the plug-ins loaded (the next look-up reads them again)."""
    _STATE.__init__()


def _package(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown package"


def _describe(ep: metadata.EntryPoint) -> str:
    return f"'{ep.name} = {ep.value}' of package {_package(ep)}"


def entries() -> dict[str, list[metadata.EntryPoint]]:
    """Entry points of the group by name (read once from the installed packages' metadata; nothing imported).
    The same package seen twice on ``sys.path`` counts once."""
    if _STATE.entries is None:
        found: dict[str, list[metadata.EntryPoint]] = {}
        for ep in metadata.entry_points(group=GROUP):
            same = [e for e in found.get(ep.name, []) if e.value == ep.value and _package(e) == _package(ep)]
            if not same:
                found.setdefault(ep.name, []).append(ep)
        _STATE.entries = found
    return _STATE.entries


def names() -> list[str]:
    """Names the installed plug-ins declare (metadata only: for help texts; nothing is imported)."""
    return sorted(entries())


def _load(name: str, builtin: set[str], base: type) -> type:
    """The plug-in class for ``name``; PluginError (naming the package) when it cannot be used."""
    if name in _STATE.loaded:
        return _STATE.loaded[name]
    if name in _STATE.problems:
        raise PluginError(_STATE.problems[name])
    eps = entries()[name]
    try:
        if name in builtin:
            raise PluginError(f"pruner plug-in {_describe(eps[0])} is not used: {name!r} is a built-in method "
                              "(the plug-in must choose another name)")
        if len(eps) > 1:
            raise PluginError(f"pruner plug-in name {name!r} is declared by several packages: "
                              f"{'; '.join(_describe(e) for e in eps)}; uninstall all but one")
        ep = eps[0]
        try:
            obj = ep.load()
        except Exception as err:  # any import-time failure of someone else's package
            raise PluginError(f"pruner plug-in {_describe(ep)} failed to load ({type(err).__name__}: {err}); "
                              f"reinstall or uninstall {_package(ep).split()[0]}") from None
        _check_class(obj, ep, base)
    except PluginError as err:
        _STATE.problems[name] = str(err)
        raise
    _STATE.loaded[name] = obj
    return obj


def _check_class(obj: Any, ep: metadata.EntryPoint, base: type) -> None:
    """``obj`` must subclass ``base`` (the Pruner protocol, handed in by pruning.base: no import back to it)."""
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginError(f"pruner plug-in {_describe(ep)} is not a subclass of explainprune.pruning.Pruner "
                          f"(got {obj!r})")
    if obj.score is base.score and obj.keep is base.keep:
        raise PluginError(f"pruner plug-in {_describe(ep)} implements neither score(vlm, prompt) nor "
                          "keep(vlm, prompt, ratio)")


def find(name: str, builtin: set[str], base: type) -> type | None:
    """The plug-in class registered as ``name`` (imported now), None when no installed package declares it.
    Raises PluginError naming the package for a plug-in that fails or clashes."""
    if name in builtin or name not in entries():
        return None
    return _load(name, builtin, base)


def load_all(builtin: set[str], base: type) -> dict[str, type]:
    """Every usable plug-in (imported now), by name; each unusable one gives one PluginWarning."""
    usable = {}
    for name in entries():
        try:
            usable[name] = _load(name, builtin, base)
        except PluginError as err:
            if name not in _STATE.warned:
                _STATE.warned.add(name)
                warnings.warn(str(err), PluginWarning, stacklevel=3)
    return {k: v for k, v in usable.items() if k not in builtin}
