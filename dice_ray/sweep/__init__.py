"""Sensitivity sweeps: many simulations over a space of run-config fields, on Ray Tune.

``spec.py`` reads and validates a sweep file, ``runner.py`` runs its trials on Ray Tune (grid or Optuna),
``metrics.py`` computes each trial's numbers from its run directory, ``records.py`` keeps the sweep
directory (one result per finished trial, ``trials.parquet``) and ``plot.py`` draws the summary plot.
``python -m dice_ray.sweep SWEEP.yaml`` is the command line (``dice_ray/cli/sweep.py``).
"""

from dice_ray.sweep.metrics import METRICS, register_metric
from dice_ray.sweep.runner import run_sweep
from dice_ray.sweep.spec import Sweep, bundled_sweep, load_sweep

__all__ = ["METRICS", "Sweep", "bundled_sweep", "load_sweep", "register_metric", "run_sweep"]
