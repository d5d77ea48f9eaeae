"""dice-ray: decentralized (gossip) learning at scale on Ray, and the data influence cascade (DICE).

The Python API (``api.py``)::

    import dice_ray
    run = dice_ray.run(dice_ray.RunConfig(nodes=16, rounds=30), engine="local")
    run.rounds.head()

``run`` / ``resume`` / ``open_run`` return a ``Run`` (tables as pandas DataFrames, the manifest, the reports);
``RunConfig`` is the validated run configuration (one-line ``InputError`` on bad input).
"""

__version__ = "0.1.0"

from dice_ray.api import Run, as_config, open_run, resume, run  # noqa: E402
from dice_ray.config import RunConfig  # noqa: E402
from dice_ray.errors import InputError  # noqa: E402

__all__ = ["InputError", "Run", "RunConfig", "__version__", "as_config", "open_run", "resume", "run"]
