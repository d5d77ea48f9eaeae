"""The built-in methods, in the order runs use them, and the choice of a run's methods (``methods_for``)."""

from __future__ import annotations

from typing import Any

from dice_ray.errors import InputError
from dice_ray.hooks import Method, check_names, registered_methods, tables_of
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


def check_methods(extra: list[Method] | tuple[Method, ...] = ()) -> None:
    """Refuse, in one line (``InputError``), the registered methods and a run's ``extra`` ones (``dice_ray.run(...,
    methods=)``) that would be mixed up with others: a name used twice, or that is a built-in method's or a run config
    field (its section would replace the built-in one), a hook or driver named otherwise than its method
    (``hooks.check_names``), or a table another method, or the run, writes."""
    from dice_ray.config import RunConfig
    from dice_ray.results import TABLES

    users = [*registered_methods(), *(m for m in extra if m not in registered_methods())]
    names = [m.name for m in users]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"methods: the names {twice} are used twice")
    taken = {table: f"dice-ray's {table}.parquet" for table in TABLES}
    for method in users:
        if method.name in {m.name for m in METHODS} or method.name in RunConfig.model_fields:
            raise InputError(f"method {method.name!r} is a built-in method or run config field; choose another name")
        try:
            check_names(method)
        except ValueError as err:
            raise InputError(str(err)) from None
        clash = next((table for table in tables_of(method) if table in taken), None)
        if clash is not None:
            raise InputError(f"method {method.name!r}: table {clash!r} is {taken[clash]}; choose another name")
        taken |= {table: f"method {method.name!r}'s" for table in tables_of(method)}
