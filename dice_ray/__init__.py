"""dice-ray: decentralized (gossip) learning at scale on Ray, and the data influence cascade (DICE).

The Python API (``api.py``)::

    import dice_ray
    run = dice_ray.run(dice_ray.RunConfig(nodes=16, rounds=30), engine="local")
    run.rounds.head()

``run`` / ``resume`` / ``open_run`` return a ``Run`` (tables as pandas DataFrames, the manifest, the reports);
``RunConfig`` is the validated run configuration (one-line ``InputError`` on bad input); ``bundled_config(name)`` the
path of a config of ``configs/`` from any working directory. The seams for your own work: ``register_model``,
``register_dataset``, ``register_loss`` / ``Loss``, ``register_misbehavior`` / ``Misbehavior``, and methods as round
hooks and stages after training (``RoundHook``, ``DriverHook``, ``Stage``, ``Method``; see ``dice_ray.hooks``) with
their own options (a ``Section``, ``register_method``).
"""

from dice_ray.version import __version__  # noqa: E402, I001 (first: the modules below may read it)
from dice_ray.api import Run, as_config, open_run, resume, run  # noqa: E402
from dice_ray.config import RunConfig, bundled_config  # noqa: E402
from dice_ray.core.losses import Loss, register_loss  # noqa: E402
from dice_ray.core.misbehavior import Misbehavior, register_misbehavior  # noqa: E402
from dice_ray.core.models import register_model  # noqa: E402
from dice_ray.data import register_dataset  # noqa: E402
from dice_ray.errors import InputError  # noqa: E402
from dice_ray.hooks import (  # noqa: E402
    DriverHook,
    Inbox,
    Method,
    RoundHook,
    Route,
    Router,
    RowsDriver,
    Stage,
    register_method,
)
from dice_ray.sections import Section  # noqa: E402

__all__ = ["DriverHook", "Inbox", "InputError", "Loss", "Method", "Misbehavior", "RoundHook", "Route", "Router",
           "RowsDriver", "Run", "RunConfig", "Section", "Stage", "__version__", "as_config", "bundled_config",
           "open_run", "register_dataset", "register_loss", "register_method", "register_misbehavior",
           "register_model", "resume", "run"]


def __getattr__(name: str):
    """``dice_ray.reports`` after ``import dice_ray`` alone, imported when first read (it brings matplotlib)."""
    if name == "reports":
        import importlib

        return importlib.import_module("dice_ray.reports")
    raise AttributeError(f"module 'dice_ray' has no attribute {name!r}")
