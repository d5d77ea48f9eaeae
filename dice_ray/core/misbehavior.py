"""Misbehaving participants (concepts §5): who misbehaves, and how their data or updates are corrupted.

A kind of misbehaviour is a ``Misbehavior``: it corrupts a participant's local data (``corrupt``), makes it send
θ + cΔ instead of θ + Δ (``factor``), or both. Built in: ``label-flip`` (a share of k's training labels
y → C−1−y), ``feature-noise`` (Gaussian noise of std σ added to k's training inputs), ``sign-flip`` (θ − Δ),
``scale`` (θ + cΔ), ``free-ride`` (k sends the model it received, without training: Δ = 0). A user adds one with
the decorator::

    from dice_ray import Misbehavior, register_misbehavior

    @register_misbehavior("backdoor")
    class Backdoor(Misbehavior):
        def __init__(self, target: int = 0, share: float = 0.5):  # options: misbehavior.options
            self.target, self.share = target, share

        def corrupt(self, x, y, num_classes, rng):
            hit = rng.random(len(y)) < self.share
            x[hit, ..., :2, :2] = x.max()  # a bright corner patch
            y[hit] = self.target
            return x, y

and selects it with ``--misbehavior backdoor --set misbehavior.options.target=3`` (the module defining it listed
in the config's ``imports``, ``--imports``). Every choice is a pure function of (seed, participant), so the same
participants misbehave the same way however they are placed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from dice_ray.core.models import defining_module
from dice_ray.core.topology import Topology
from dice_ray.errors import InputError

if TYPE_CHECKING:
    from dice_ray.config import MisbehaviorConfig


class Misbehavior:
    """How a misbehaving participant trains. Override ``corrupt`` (its local data), ``factor`` (the update it
    sends), or both; the constructor's keyword arguments are the run config's ``misbehavior.options``.

    A corrupted update is θ + cΔ, with Δ = O(θ) − θ the honest local step: the form DICE's replays and its
    derivatives follow, so every method measures a user's kind as it measures the built-in ones.
    """

    name = ""  # set by ``register_misbehavior``

    def corrupt(self, x: np.ndarray, y: np.ndarray, num_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return a participant's training inputs x [n, ...] and targets y [n] as it trains on them. x and y are
        its own copies (change them in place or return new arrays of the same shapes and dtypes); ``rng`` is drawn
        from (seed, participant). Default: unchanged."""
        return x, y

    def factor(self, participant: int) -> float:
        """The factor c of the update θ + cΔ that ``participant`` sends (default 1: the honest update)."""
        return 1.0

    @classmethod
    def from_config(cls, section: MisbehaviorConfig) -> Misbehavior:
        """The kind as the run config's ``misbehavior`` section configures it: ``options`` as keyword arguments."""
        return cls(**section.options)

    @property
    def corrupts_data(self) -> bool:
        """Whether this kind changes the local data (overrides ``corrupt``)."""
        return type(self).corrupt is not Misbehavior.corrupt

    @property
    def corrupts_updates(self) -> bool:
        """Whether this kind changes the sent update (overrides ``factor``)."""
        return type(self).factor is not Misbehavior.factor


_REGISTRY: dict[str, type[Misbehavior]] = {}
K = TypeVar("K", bound=type[Misbehavior])


def register_misbehavior(name: str) -> Callable[[K], K]:
    """Return a class decorator registering a ``Misbehavior`` subclass as kind ``name``."""
    if name == "none":
        raise ValueError("misbehaviour 'none' means nobody misbehaves; choose another name")

    def decorator(cls: K) -> K:
        if not (isinstance(cls, type) and issubclass(cls, Misbehavior)):
            raise TypeError(f"register_misbehavior({name!r}) takes a Misbehavior subclass, not {cls!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def misbehavior_names() -> tuple[str, ...]:
    """Return ``none`` and the registered kinds (built-in ones first)."""
    return ("none", *_REGISTRY)


def misbehavior_module(name: str) -> str | None:
    """The module that registered kind ``name`` (None: ``none`` or no such kind)."""
    return defining_module(_REGISTRY[name]) if name in _REGISTRY else None


def misbehavior(section: MisbehaviorConfig) -> Misbehavior | None:
    """The kind the run config's ``misbehavior`` section names, built with its options (None: kind ``none``).
    Raises ``InputError`` for an unknown kind or options its constructor refuses."""
    if section.kind == "none":
        return None
    if section.kind not in _REGISTRY:
        raise InputError(f"misbehaviour {section.kind!r} is unknown; choose one of {', '.join(misbehavior_names())}")
    cls = _REGISTRY[section.kind]
    try:
        return cls.from_config(section)
    except (TypeError, ValueError) as err:
        raise InputError(f"misbehavior.options {dict(section.options)} for {section.kind!r}: {err}") from None


def update_factors(kind: Misbehavior | None, ids: np.ndarray) -> np.ndarray | None:
    """c [len(ids)] of the updates the participants ``ids`` send (None: every one honest, c = 1)."""
    if kind is None or not kind.corrupts_updates or not len(ids):
        return None
    return np.array([kind.factor(int(k)) for k in ids], np.float64)


def corrupt_data(kind: Misbehavior, x: np.ndarray, y: np.ndarray, num_classes: int, seed: int,
                 participant: int) -> tuple[np.ndarray, np.ndarray]:
    """Return copies of participant ``participant``'s training inputs x [n, ...] and labels y [n] as ``kind``
    corrupts them, with its random numbers drawn from (seed, participant)."""
    rng = np.random.default_rng([seed, participant, 104729])
    new_x, new_y = kind.corrupt(x.copy(), y.copy(), num_classes, rng)
    new_x, new_y = np.asarray(new_x), np.asarray(new_y)
    if new_x.shape != x.shape or new_y.shape != y.shape or new_x.dtype != x.dtype or new_y.dtype != y.dtype:
        raise InputError(f"misbehaviour {kind.name!r} returned data of shapes {new_x.shape}, {new_y.shape} "
                         f"({new_x.dtype}, {new_y.dtype}); participant {participant} had {x.shape}, {y.shape} "
                         f"({x.dtype}, {y.dtype})")
    return new_x, new_y


def misbehaving_participants(kind: str, nodes: int, count: int, selection: str, topology: Topology,
                             seed: int, ids: list[int] | None = None) -> np.ndarray:
    """Return the sorted ids of the misbehaving participants (empty for kind ``none``).

    selection: ``random`` (``count`` drawn from ``seed``), ``ids`` (exactly ``ids``), or ``degree``
    (the ``count`` participants with the most in-neighbours in W^0, ties by id).
    """
    if kind == "none":
        return np.zeros(0, np.int64)
    if selection == "ids":
        return np.array(sorted(set(ids or [])), np.int64)
    if selection == "degree":
        degree = np.asarray(topology.adjacency(0).sum(axis=1)).ravel()
        order = np.lexsort((np.arange(nodes), -degree))
        return np.sort(order[:count]).astype(np.int64)
    rng = np.random.default_rng([seed, 7919])
    return np.sort(rng.choice(nodes, count, replace=False)).astype(np.int64)


# -- the built-in kinds; their options are fields of the config's section (flip_fraction, sigma, factor) -------------

@register_misbehavior("label-flip")
class LabelFlip(Misbehavior):
    """A share ``fraction`` of the participant's training labels y → C−1−y."""

    def __init__(self, fraction: float = 1.0) -> None:
        self.fraction = fraction

    @classmethod
    def from_config(cls, section: MisbehaviorConfig) -> Misbehavior:
        return cls(section.flip_fraction)

    def corrupt(self, x: np.ndarray, y: np.ndarray, num_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        flipped = rng.choice(len(y), int(round(self.fraction * len(y))), replace=False)
        y[flipped] = num_classes - 1 - y[flipped]
        return x, y


@register_misbehavior("feature-noise")
class FeatureNoise(Misbehavior):
    """Gaussian noise of std ``sigma`` added to the participant's training inputs."""

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = sigma

    @classmethod
    def from_config(cls, section: MisbehaviorConfig) -> Misbehavior:
        return cls(section.sigma)

    def corrupt(self, x: np.ndarray, y: np.ndarray, num_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x += (self.sigma * rng.standard_normal(x.shape)).astype(x.dtype)
        return x, y


class _Factor(Misbehavior):
    """The participant sends θ + cΔ with one c for all."""

    c = 1.0

    def factor(self, participant: int) -> float:
        return self.c


@register_misbehavior("sign-flip")
class SignFlip(_Factor):
    """θ − Δ instead of θ + Δ."""

    c = -1.0

    @classmethod
    def from_config(cls, section: MisbehaviorConfig) -> Misbehavior:
        return cls()


@register_misbehavior("scale")
class Scale(_Factor):
    """θ + cΔ, c = ``factor``."""

    def __init__(self, factor: float = 10.0) -> None:
        self.c = factor

    @classmethod
    def from_config(cls, section: MisbehaviorConfig) -> Misbehavior:
        return cls(section.factor)


@register_misbehavior("free-ride")
class FreeRide(_Factor):
    """θ: the model it received, without training (Δ = 0)."""

    c = 0.0

    @classmethod
    def from_config(cls, section: MisbehaviorConfig) -> Misbehavior:
        return cls()


def built_in_kinds() -> tuple[str, ...]:
    """The kinds registered by dice-ray itself (their options are the section's own fields, not ``options``)."""
    return tuple(name for name, cls in _REGISTRY.items() if cls.__module__ == __name__)

