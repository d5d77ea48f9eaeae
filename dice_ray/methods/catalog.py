"""The built-in methods, in the order runs use them, and the choice of a run's methods (``methods_for``)."""

from __future__ import annotations

from typing import Any

from dice_ray.errors import InputError
from dice_ray.hooks import Method, registered_methods
from dice_ray.methods.contributions import LEDGER_METHOD
from dice_ray.methods.dice.online import ONLINE_DICE_METHOD
from dice_ray.methods.dice.replays import REPLAYS_METHOD
from dice_ray.methods.proximal import PROXIMAL_METHOD
from dice_ray.methods.retraining import RETRAINING_METHOD
from dice_ray.methods.rewiring import REWIRING_METHOD

METHODS: list[Method] = [PROXIMAL_METHOD, LEDGER_METHOD, ONLINE_DICE_METHOD, REWIRING_METHOD, REPLAYS_METHOD,
                         RETRAINING_METHOD]


def methods_for(config: Any, extra: list[Method] | tuple[Method, ...] = ()) -> list[Method]:
    """The methods a run with ``config`` uses: the built-in ones it enables, then the registered ones
    (``hooks.register_method``) and ``extra`` (a user's, passed to the run) that it enables, in order; names must be
    unique."""
    everyone = [*METHODS, *registered_methods()]
    everyone += [m for m in extra if m not in everyone]
    chosen = [m for m in everyone if m.enabled(config)]
    names = [m.name for m in chosen]
    if len(set(names)) != len(names):
        raise InputError(f"methods: the names {sorted({n for n in names if names.count(n) > 1})} are used twice")
    return chosen
