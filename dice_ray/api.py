"""The Python API: run a simulation, resume one, open a finished run — for notebooks and scripts.

    import dice_ray

    config = dice_ray.RunConfig(nodes=16, rounds=30, influence={"enabled": True, "hops": 2})
    run = dice_ray.run(config, engine="local")        # or engine="ray" (the default)
    run.rounds.groupby("round").heldout_acc.mean()     # every table is a pandas DataFrame
    run.alignment()                                    # the analyze reports, as DataFrames

``run`` and ``resume`` return a ``Run``: a handle on the run directory. Tables are read when first asked for
(``run.rounds``, ``run.table("dice")``); ``run.manifest`` is the run's ``manifest.json``. The command line
(``python -m dice_ray.simulate``, ``dice-ray simulate``) is a thin layer over these functions.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from dice_ray.checkpoint import RoundTables
from dice_ray.config import RunConfig, build_config, load_config, read_recorded, refuse_idle_settings
from dice_ray.errors import InputError, NoTable
from dice_ray.hooks import Method, registered_methods
from dice_ray.results import TABLES, kept_topology_file
from dice_ray.rundir import MANIFEST, not_a_run, plain, read_manifest, read_table

__all__ = ["Run", "run", "resume", "open_run", "as_config"]

if TYPE_CHECKING:
    from dice_ray.reports import Cascade, Contributions

ENGINES = ("ray", "local")


def _check_engine(engine: Any, section: str) -> None:
    """Refuse an ``engine=`` argument other than 'ray' or 'local'; one that is not a string was likely meant as the
    config's engine section, which ``section`` says how to set."""
    if engine not in ENGINES:
        hint = f"; {section}" if not isinstance(engine, str) else ""
        raise InputError(f"engine {engine!r} is unknown: the engine= argument picks {' or '.join(ENGINES)}{hint}")


class Run:
    """A run directory: its manifest, its result tables (pandas, read on first use) and its reports.

    Every table is an attribute (``run.rounds``, ``run.dice``) except those named like a report method
    (``alignment``, ``cascade``, ``anomaly``, ``contributions``), which ``run.table(name)`` reads."""

    def __init__(self, path: str | Path):
        _check_path(path)
        self.path = Path(path).resolve()  # absolute: the handle outlives a change of working directory
        if not self.path.exists():
            raise InputError(f"run directory {str(self.path)!r} does not exist")
        if not (self.path / MANIFEST).is_file():
            raise not_a_run(self.path)
        self._tables: dict[str, pd.DataFrame] = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, tables={self.tables()})"

    @property
    def manifest(self) -> dict[str, Any]:
        """The run's ``manifest.json`` (read anew each time: a running run updates it); one that is not a run's
        manifest: an ``InputError``."""
        return read_manifest(self.path)

    @property
    def status(self) -> str:
        """'running', 'complete', 'failed' or 'interrupted'."""
        return self.manifest.get("status", "unknown")

    @property
    def config(self) -> RunConfig:
        """The resolved ``RunConfig`` the run was started with, read without importing the modules it names (see
        ``config.read_recorded``)."""
        return read_recorded(self.manifest["config"], f"run {str(self.path)!r}")

    def tables(self) -> list[str]:
        """Names of the tables this run has written (``rounds``, ``nodes``, ``dice``, …); of a run that has not
        finished, also those its checkpoints committed rows of (see ``table``)."""
        names = {p.stem for p in self.path.glob("*.parquet")}
        if self.status != "complete":
            names |= RoundTables(self.path, {}).written()
        return sorted(names)

    def table(self, name: str) -> pd.DataFrame:
        """Return table ``name`` (see ``dice_ray.results``) as a DataFrame; read once, then cached. Of a run that has
        not finished (running, interrupted or failed), a table written round by round (``rounds``, ``proximal``,
        ``contributions``, ...) holds the rows written so far, read anew on every call: those of every checkpoint,
        and those written after it (at least every 10 s, and when the run stops), which a resume rolls back to the
        checkpoint it continues from."""
        if name not in self._tables:
            path = self.path / f"{name}.parquet"
            if not path.is_file():
                status = self.status  # the manifest, read once
                committed = None if status == "complete" else RoundTables(
                    self.path, {name: TABLES[name]} if name in TABLES else {}).committed(name)
                if committed is not None:
                    return plain(committed).to_pandas()  # not kept: a running run commits more
                unfinished = "" if status == "complete" else (
                    f"; the run is {status} and no checkpoint has committed its rows yet")
                raise NoTable(f"run {str(self.path)!r} has no {name} table (it has: "
                                 f"{', '.join(self.tables()) or 'none'}{unfinished})")
            self._tables[name] = read_table(path).to_pandas()
        return self._tables[name]

    def __dir__(self) -> list[str]:
        """The attributes, the tables the run has written among them (``run.rounds``, ``run.dice``, ...)."""
        return sorted({*super().__dir__(), *(name for name in self.tables() if name.isidentifier())})

    def __getattr__(self, name: str) -> pd.DataFrame:
        if name in TABLES or (not name.startswith("_") and name in self.tables()):
            return self.table(name)  # a built-in table, or one a user's method wrote
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- the reports (``dice_ray.reports``; ``python -m dice_ray.analyze`` prints them), as data ----------------
    # Each computes from the run's tables and writes nothing unless ``write``: then its tables and PNGs go into the
    # run directory, the files ``python -m dice_ray.analyze`` writes.

    def alignment(self, write: bool = False) -> pd.DataFrame:
        """Return DICE-E against DICE-GT: one row per (``hops``, ``quantity``, ``variant``) with ``probes``,
        ``pearson``, ``spearman``, ``kendall`` and ``relative_error`` (NaN where undefined); with ``write``, also
        write ``alignment.parquet`` and ``alignment_hop{r}.png``."""
        from dice_ray.reports import alignment_report, write_report

        report = alignment_report(self.path)
        if write:
            write_report(report, self.path)
        return report.table

    def cascade(self, write: bool = False) -> Cascade:
        """Return the cascade report (``dice_ray.reports.Cascade``): mean |influence| by hop distance (``decay``),
        the pairwise influence I_{j→k} (``pairwise``, ``matrix``), its relation to position and its reciprocity;
        with ``write``, also write ``cascade.parquet``, ``pairwise.parquet`` and their PNGs."""
        from dice_ray.reports import cascade_report, write_report

        report = cascade_report(self.path)
        if write:
            write_report(report, self.path)
        return report

    def anomaly(self, horizons: list[int] | None = None, write: bool = False) -> pd.DataFrame:
        """Return the detection of misbehaving neighbours by proximal influence and the baselines: one row per
        (``horizon``, ``method``) with ROC AUC, precision and detection delay (``dice_ray.reports.detection``);
        ``horizons``: rounds before which scores count (default 5, 10, 20 and the whole run). With ``write``, also
        write ``anomaly.parquet`` and ``anomaly_roc.png``."""
        from dice_ray.reports import detection_report, write_report

        report = detection_report(self.path, horizons)
        if write:
            write_report(report, self.path)
        return report.table

    def retrain(self, loo: bool = False, shapley: int | None = None, local: bool = False,
                allow_imports: bool = False) -> None:
        """Write the leave-one-out (``loo``) and Shapley (``shapley`` permutations) tables this run lacks, retraining
        now (the ``retraining`` method's stage: Ray tasks, or here if ``local``); a run that did not finish training
        is refused first. The run's config imports the modules it names only with ``allow_imports``."""
        from dice_ray.methods.retraining import Retraining, retraining_changes
        from dice_ray.reports.inputs import read_frame
        from dice_ray.runner import run_stage

        if shapley is not None and (not isinstance(shapley, numbers.Integral) or isinstance(shapley, bool)):
            raise InputError(f"shapley (--shapley) {shapley!r}: a number of permutations, an integer")
        if shapley is not None and shapley < 1:
            raise InputError(f"shapley (--shapley) {shapley}: needs at least 1 permutation")
        read_frame(self.path, "nodes", "not a finished run")  # refused before any retraining
        changes = retraining_changes(self.path, loo, shapley)
        if changes:
            run_stage(self.path, Retraining, changes, local, allow_imports)

    def contributions(self, loo: bool = False, shapley: int | None = None, local: bool = False,
                      allow_imports: bool = False, write: bool = False) -> Contributions:
        """Return the contributions report (``dice_ray.reports.Contributions``): the ledger's ranking per
        participant (``table``) with its agreement with leave-one-out and Shapley where computed (a run without the
        ledger: the ranking by leave-one-out, else Shapley, and their agreement). With ``loo`` /
        ``shapley`` (permutations), the run's missing ``loo.parquet`` / ``shapley.parquet`` are retrained first
        (Ray tasks, or here if ``local``), importing the modules the run's config names only with
        ``allow_imports``. With ``write``, also write ``contributions_report.parquet`` and its PNGs."""
        from dice_ray.reports import contributions_report, write_report

        self.retrain(loo, shapley, local, allow_imports)
        report = contributions_report(self.path)
        if write:
            write_report(report, self.path)
        return report


def open_run(path: str | Path) -> Run:
    """Return the ``Run`` of an existing run directory (finished or not)."""
    return Run(path)


def _check_path(path: Any) -> None:
    """Refuse a run directory argument that is not a path (a str or ``os.PathLike``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"a run directory is a path (str or pathlib.Path), not {type(path).__name__} {path!r}")


def _check_methods(methods: Any) -> None:
    """Refuse ``methods`` given to a run that are not ``Method``s or have options but are not registered, in one
    line (the run checks them beside the registered ones: ``methods.catalog.check_methods``)."""
    if not all(isinstance(m, Method) for m in methods):
        raise InputError(f"methods are dice_ray.Method objects, not {methods!r}")
    unregistered = [m.name for m in methods if m.options is not None and m not in registered_methods()]
    if unregistered:
        raise InputError(f"method {unregistered[0]!r} has options: register it with dice_ray.register_method before "
                         "its config is built (its section is part of the run config)")


def _check_callbacks(on_round: Any) -> None:
    """Refuse an ``on_round`` that cannot be called (found after the run directory was written, at round 0)."""
    if on_round is not None and not callable(on_round):
        raise InputError(f"on_round is called after every round with (metrics, engine): {on_round!r} cannot be "
                         "called")


def as_config(config: RunConfig | Mapping[str, Any] | str | Path | None = None, **fields: Any) -> RunConfig:
    """Return a validated ``RunConfig`` from a config object, a nested dict or a YAML file, with top-level
    ``fields`` (e.g. ``nodes=64``, ``optim={"lr": 0.1}``) merged over it; bad input raises ``InputError``."""
    if isinstance(config, RunConfig):
        data = config.model_dump(mode="json")
    elif isinstance(config, (str, Path)):
        data = load_config(config)
    elif config is None or isinstance(config, Mapping):
        data = json.loads(json.dumps(dict(config or {})))
    else:
        raise InputError(f"a config is a RunConfig, a dict or a YAML file's path, not {type(config).__name__} "
                         f"{config!r}")
    for key, value in fields.items():
        if isinstance(value, Mapping) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return build_config(data)


def run(config: RunConfig | Mapping[str, Any] | str | Path | None = None, *, engine: str = "ray",
        save_states: bool = False, on_round: Callable[[Any, Any], None] | None = None,
        methods: list[Method] | tuple = (), **fields: Any) -> Run:
    """Run the simulation of ``config`` (see ``as_config``) and return its ``Run``.

    ``engine``: 'ray' (participant-group actors on the connected or a local Ray) or 'local' (this process).
    ``save_states``: also write every participant's final state (``states.npy``). ``on_round(metrics, engine)`` is
    called after every round with its ``dice_ray.engine.RoundMetrics`` (losses and accuracies per participant) and
    the engine; what it raises stops the run, which is marked interrupted (``KeyboardInterrupt``) or failed and can
    be resumed. ``methods``: your own ``dice_ray.Method``s (round hooks), run after the built-in ones the config
    enables; each writes its tables beside the others.

    Bad input raises ``InputError`` before any work, settings among ``fields`` that would do nothing in this run
    included (as the command line refuses such flags; a config file or dict may keep them). A run that diverges
    raises ``FloatingPointError`` naming the round and participants, its last good checkpoint kept.
    """
    from dice_ray.experiment import prepare
    from dice_ray.runner import run_directory, simulate

    _check_engine(engine, "the config's engine section is set with RunConfig(engine={...}) or "
                          "as_config(..., engine={...})")
    _check_callbacks(on_round)
    if not isinstance(save_states, bool):
        raise InputError(f"save_states is True or False, not {save_states!r}")
    _check_methods(methods)
    config = as_config(config, **fields)
    refuse_idle_settings(config, {name: name for name in _dotted(fields)}, engine)
    path = run_directory(config)  # fixed now: a default name from the clock is taken once
    config = config.model_copy(update={"output": config.output.model_copy(update={"out": str(path)})})
    experiment = prepare(config)  # simulate joins Ray (and checks what it needs) before anything is written
    return Run(simulate(config, engine, save_states, experiment, on_round=on_round, methods=methods))


def _dotted(fields: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the settings ``fields`` give (``optim={"lr": 0.1}``: ``optim.lr``)."""
    names = []
    for key, value in fields.items():
        names += _dotted(value, f"{prefix}{key}.") if isinstance(value, Mapping) and value else [f"{prefix}{key}"]
    return names


def resume(path: str | Path, *, engine: str | None = None, on_round: Callable[[Any, Any], None] | None = None,
           methods: list[Method] | tuple = (), allow_imports: bool = False, **placement: Any) -> Run:
    """Continue the interrupted run in ``path`` from its last checkpoint, with its own config; ``placement``
    may change only where it runs (dotted names of ``config.RESUME_FIELDS`` with '__' for '.', e.g.
    ``engine__actors=2``); it joins the Ray cluster ``engine__address`` names (else ``RAY_ADDRESS``, else a local
    Ray), never the one the run recorded. ``methods``: the same user methods the run was started with. A run whose
    config names modules to import (``imports``, ``model.import_module``) is refused, naming them, unless
    ``allow_imports``: resume only a run you trust."""
    from dice_ray.experiment import prepare
    from dice_ray.runner import resume_config, simulate

    _check_path(path)
    _check_callbacks(on_round)
    _check_methods(methods)
    changes = {key.replace("__", "."): value for key, value in placement.items()}
    config, manifest = resume_config(Path(path), changes, allow_imports)
    engine = engine or manifest.get("engine", "ray")
    _check_engine(engine, "a resume changes only where it runs, with keywords such as engine__actors=2")
    refuse_idle_settings(config, {name: name for name in changes}, engine)
    experiment = prepare(config, kept_topology_file(Path(path), manifest))
    return Run(simulate(config, engine, bool(manifest.get("save_states", False)), experiment, resume=True,
                        on_round=on_round, methods=methods))
