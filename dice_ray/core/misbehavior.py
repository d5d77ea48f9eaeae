"""Misbehaving participants (concepts §5): who misbehaves, and how their data or updates are corrupted.

A kind of misbehaviour is a ``Misbehavior``: it corrupts a participant's local data (``corrupt``), makes it send
θ + cΔ instead of θ + Δ (``factor``), or both. Built in: ``label-flip`` (a share of k's training labels
y → C−1−y), ``feature-noise`` (Gaussian noise of std σ added to k's training inputs), ``sign-flip`` (θ − Δ),
``scale`` (θ + cΔ), ``free-ride`` (k sends the model it received, without training: Δ = 0); c scales the trained
parameters' change only (BatchNorm's running statistics are sent as stepped: scaled, a variance could turn
negative); their options are the config section's own fields. A user's kind is a subclass registered with
``register_misbehavior(name)``, its options the constructor's keyword arguments, from ``misbehavior.options`` (the
docs' how-to "extend" has an example). Every choice is a pure function of (seed, participant), so the same
participants misbehave the same way however they are placed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from dice_ray.core.topology import Topology
from dice_ray.errors import InputError, unknown_name
from dice_ray.registry import Registry

if TYPE_CHECKING:
    from dice_ray.config import MisbehaviorConfig


class Misbehavior:
    """How a misbehaving participant trains. Override ``corrupt`` (its local data), ``factor`` (the update it
    sends), or both; a registered subclass's options are its constructor's keyword arguments, from the run config's
    ``misbehavior.options``.

    A corrupted update is θ + cΔ, with Δ = O(θ) − θ the honest local step: the form DICE's replays and its
    derivatives follow, so every method measures a user's kind as it measures the built-in ones.
    """

    name = ""  # set by ``register_misbehavior``
    # What ``corrupt`` does with class labels, if it reads the targets as such ("": it does not); such a kind is
    # refused on regression targets, in one line saying this
    class_labels_use = ""

    def corrupt(self, x: np.ndarray, y: np.ndarray, num_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Return a participant's training inputs x [n, ...] and targets y [n] as it trains on them (n ≥ 1). x and y
        are its own copies (change them in place or return new arrays of the same shapes and dtypes); ``rng`` is
        drawn from (seed, participant). Default: unchanged."""
        return x, y

    def factor(self, participant: int) -> float:
        """The factor c (a finite real number) of the update θ + cΔ that ``participant`` sends (default 1: the
        honest update)."""
        return 1.0

    @property
    def corrupts_data(self) -> bool:
        """Whether this kind changes the local data (overrides ``corrupt``)."""
        return type(self).corrupt is not Misbehavior.corrupt

    @property
    def corrupts_updates(self) -> bool:
        """Whether this kind changes the sent update (overrides ``factor``)."""
        return type(self).factor is not Misbehavior.factor


KINDS: Registry[type[Misbehavior]] = Registry("misbehaviour")
K = TypeVar("K", bound=type[Misbehavior])


def register_misbehavior(name: str) -> Callable[[K], K]:
    """Return a class decorator registering a ``Misbehavior`` subclass as kind ``name``."""
    if name == "none" or name in BUILT_IN_FIELDS:
        raise ValueError(f"misbehaviour {name!r} is built in; choose another name")
    return _registered(name)


def _registered(name: str) -> Callable[[K], K]:
    def decorator(cls: K) -> K:
        if not (isinstance(cls, type) and issubclass(cls, Misbehavior)):
            raise TypeError(f"register_misbehavior({name!r}) takes a Misbehavior subclass, not {cls!r}")
        cls.name = name
        return KINDS.add(name, cls)

    return decorator


def misbehavior_names() -> tuple[str, ...]:
    """Return ``none`` and the registered kinds (built-in ones first)."""
    return ("none", *KINDS.names())


def misbehavior(section: MisbehaviorConfig) -> Misbehavior | None:
    """The kind the run config's ``misbehavior`` section names, built with its options (a built-in kind: the
    section's own fields; None: kind ``none``). Raises ``InputError`` for an unknown kind or options its constructor
    refuses."""
    if section.kind == "none":
        return None
    if section.kind not in KINDS:
        raise InputError(unknown_name("misbehaviour", section.kind, misbehavior_names(), registry=True))
    options = kind_options(section)
    try:
        return KINDS.get(section.kind)(**options)
    except (TypeError, ValueError) as err:
        raise InputError(f"misbehavior.options {options} for {section.kind!r}: {err}") from None


def kind_options(section: MisbehaviorConfig, by_field: bool = False) -> dict:
    """The keyword arguments kind ``section.kind`` is built with: a built-in kind's from the section's own fields
    (sign-flip, free-ride and ``none``: none), a user's ``section.options``. Reads no registry: a recorded run's
    config gives them without importing the kind. ``by_field``: a built-in kind's keyed by their config fields
    (label-flip's ``flip_fraction``, not its constructor's ``fraction``), as a report names them."""
    fields = BUILT_IN_FIELDS.get(section.kind, {} if section.kind == "none" else None)
    if fields is None:
        return dict(section.options)
    return {f if by_field else arg: getattr(section, f) for arg, f in fields.items()}


def update_factors(kind: Misbehavior | None, ids: np.ndarray) -> np.ndarray | None:
    """c [len(ids)] of the updates the participants ``ids`` send (None: every one honest, c = 1). Raises
    ``InputError`` for a c that is not a finite real number."""
    if kind is None or not kind.corrupts_updates or not len(ids):
        return None
    factors = []
    for k in ids.tolist():
        c = kind.factor(int(k))
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
            raise InputError(f"misbehaviour {kind.name!r}: factor({k}) returned {c!r}, not a finite number")
        factors.append(float(c))
    return np.array(factors, np.float64)


def sent_factors(kind: Misbehavior | None, ids: np.ndarray, rows: np.ndarray, size: int) -> np.ndarray | None:
    """c [size] of every row's sent update: 1 but at ``rows``, the misbehaving participants ``ids`` (None: all 1)."""
    factors = update_factors(kind, ids)
    if factors is None:
        return None
    out = np.ones(size)
    out[rows] = factors
    return out


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


# -- the built-in kinds; their options are fields of the config's section: constructor argument -> field ----------

BUILT_IN_FIELDS: dict[str, dict[str, str]] = {"label-flip": {"fraction": "flip_fraction"},
                                              "feature-noise": {"sigma": "sigma"}, "sign-flip": {},
                                              "scale": {"factor": "factor"}, "free-ride": {}}


@_registered("label-flip")
class LabelFlip(Misbehavior):
    """A share ``fraction`` of the participant's training labels y → C−1−y."""

    class_labels_use = "turns class labels y into C-1-y"

    def __init__(self, fraction: float = 1.0) -> None:
        self.fraction = fraction

    def corrupt(self, x: np.ndarray, y: np.ndarray, num_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        flipped = rng.choice(len(y), int(round(self.fraction * len(y))), replace=False)
        y[flipped] = num_classes - 1 - y[flipped]
        return x, y


@_registered("feature-noise")
class FeatureNoise(Misbehavior):
    """Gaussian noise of std ``sigma`` added to the participant's training inputs."""

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = sigma

    def corrupt(self, x: np.ndarray, y: np.ndarray, num_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        x += (self.sigma * rng.standard_normal(x.shape)).astype(x.dtype)
        return x, y


@_registered("scale")
class Scale(Misbehavior):
    """θ + cΔ, c = ``factor``."""

    def __init__(self, factor: float = 10.0) -> None:
        self.c = factor

    def factor(self, participant: int) -> float:
        return self.c


@_registered("sign-flip")
class SignFlip(Scale):
    """θ − Δ instead of θ + Δ."""

    def __init__(self) -> None:
        super().__init__(-1.0)


@_registered("free-ride")
class FreeRide(Scale):
    """θ: the model it received, without training (Δ = 0)."""

    def __init__(self) -> None:
        super().__init__(0.0)
