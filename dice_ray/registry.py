"""Names a user registers things under: models, losses, misbehaviour kinds and data sets, one ``Registry`` each.

Each kind keeps its own decorator (``register_model``, ``register_loss``, ...), which checks what it is given; the
registry holds the entries by name, in registration order, and answers what the config and the run's recorded
``imports`` ask of any kind: the names, the module that registered a name, and one line for an unknown name.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from dice_ray.errors import InputError, unknown_name

T = TypeVar("T")


def defining_module(obj: Any) -> str:
    """The module that defines a registered callable (a ``functools.partial``'s function)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return getattr(obj, "__module__", None) or type(obj).__module__


class Registry(Generic[T]):
    """Entries of one kind (``what``: "model", "loss", ...) by name, the built-in ``entries`` first."""

    def __init__(self, what: str, entries: Mapping[str, T] | None = None):
        self.what = what
        self._entries: dict[str, T] = dict(entries or {})

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name`` (replacing an earlier one of that name); return it."""
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def module(self, name: str) -> str | None:
        """The module that registered ``name`` (None: no such name)."""
        return defining_module(self._entries[name]) if name in self._entries else None

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name is an ``InputError`` listing the known ones."""
        if name not in self._entries:
            raise InputError(unknown_name(self.what, name, self.names(), registry=True))
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries
