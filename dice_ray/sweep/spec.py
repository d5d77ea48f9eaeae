"""A sweep file: a base run config, a space over its fields, and how to search that space.

```yaml
base: {config: configs/alignment.yaml, rounds: 20}   # a run config dict; `config:` loads a file first
space:                                               # dotted run-config field -> one distribution
  optim.lr: {grid: [0.01, 0.05, 0.1]}                #   grid / choice: these values
  optim.batch_size: {choice: [8, 16]}
search: grid                                         # grid: every combination; optuna: num_samples draws
out: runs/sweeps/lr-batch
```

With ``search: optuna`` (``num_samples`` draws, a ``metric`` to optimize) a space may also hold
``{loguniform: [low, high]}``, ``{uniform: [low, high]}`` and ``{int: [low, high]}``.

Everything is validated before any trial starts: every candidate value is applied to the base config and
the result must be a valid ``RunConfig`` (an unknown field or a value out of range is one ``InputError``
line). Trials of a grid are enumerated here, in a fixed order, with stable ids, so a resumed sweep knows
which of them have finished.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dice_ray.config import (
    RunConfig,
    build_config,
    bundled_file,
    given_or_bundled,
    idle_settings,
    load_config,
    read_yaml,
    set_dotted,
)
from dice_ray.errors import InputError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "int")
Scalar = bool | int | float | str | None
Placement = list[dict[str, float]]  # a trial's placement-group bundles (``bundles``)


class PlotSpec(BaseModel):
    """The summary plot beside trials.parquet: each metric of ``y`` against the field ``x``, one line per
    value of the field ``by`` (means over the trials that share them)."""

    model_config = ConfigDict(extra="forbid")
    x: str
    y: list[str] = Field(min_length=1)
    by: str | None = None
    logx: bool = False


class SweepSpec(BaseModel):
    """A sweep file, validated (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    base: dict[str, Any] = Field(default_factory=dict, description="run config; `config: FILE` loads a file first")
    space: dict[str, dict[str, list[Scalar]]] = Field(min_length=1, description="dotted field -> distribution")
    search: Literal["grid", "optuna"] = "grid"
    num_samples: int | None = Field(None, ge=1, strict=True, description="optuna: number of trials")
    metric: str | None = Field(None, description="optuna: the trial metric to optimize")
    mode: Literal["max", "min"] = "max"
    seed: int = Field(0, ge=0, strict=True, description="seed of the Optuna sampler (trial seeds come from the "
                                                         "configs)")
    max_concurrent: int = Field(2, ge=1, strict=True, description="trials running at once")
    out: str = Field(min_length=1, description="sweep directory")
    metrics: list[str] | None = Field(None, min_length=1, description="trial metric groups to compute (default: "
                                                                       "all)")
    cpus_per_actor: float = Field(1.0, ge=1, allow_inf_nan=False,
                                  description="CPUs per participant-group actor of a trial, unless the trial's config "
                                              "sets engine.cpus_per_actor")
    nodes_per_actor: int = Field(256, ge=1, description="participants per actor when the trial's config sets no "
                                                        "engine.actors")
    plot: PlotSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        for field, dist in self.space.items():
            _check_distribution(field, dist, self.search)
        if self.search == "optuna":
            if self.num_samples is None or self.metric is None:
                raise ValueError("search optuna needs num_samples and metric")
        elif self.num_samples is not None:
            raise ValueError("num_samples applies to search optuna; a grid runs every combination once (sweep "
                             "the seed field for repeats)")
        else:
            trials = math.prod(len(next(iter(dist.values()))) for dist in self.space.values())
            if trials > MAX_GRID_TRIALS:  # each a whole run; listing 3 million of them alone took 8 minutes
                raise ValueError(f"space: a grid of {trials:,} trials, more than {MAX_GRID_TRIALS:,}: sweep fewer "
                                 "values, or search optuna with num_samples")
        return self


def _check_distribution(field: str, dist: dict[str, list[Scalar]], search: str) -> None:
    if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ValueError(f"space.{field}: expected one of {', '.join(f'{{{d}: [...]}}' for d in DISTRIBUTIONS)}, "
                         f"got {dist}")
    kind, values = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        if not values:
            raise ValueError(f"space.{field}: {kind} needs at least one value")
        twice = [v for v, times in Counter(values).items() if times > 1]  # by value: 8 and 8.0 are one
        if twice:  # a grid would run those trials twice; a choice would draw the value twice as often
            raise ValueError(f"space.{field}: {kind} lists {twice[0]!r} twice")
        return
    if search == "grid":
        raise ValueError(f"space.{field}: {kind} needs search optuna; a grid takes grid or choice values")
    if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise ValueError(f"space.{field}: {kind} expects [low, high] numbers, got {values}")
    low, high = values
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"space.{field}: {kind} expects finite low < high, got {values}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"space.{field}: loguniform needs low > 0, got {values}")
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ValueError(f"space.{field}: int expects integer bounds, got {values}")


@dataclass(frozen=True)
class Trial:
    """One grid point: its stable id and its values of the swept fields."""

    trial_id: str
    params: dict[str, Scalar]


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the spec, the resolved base config dict, for a grid every trial, and the swept
    values checked up front (``examples``: every grid point, or each candidate value of each field, the others at
    their first); ``needs``: each distinct set of placement-group bundles the examples reserve, with the values of
    one example that reserves it."""

    spec: SweepSpec
    base: dict[str, Any]
    grid: list[Trial]
    examples: list[dict[str, Scalar]]
    needs: list[tuple[dict[str, Scalar], Placement]] = dataclasses.field(default_factory=list)

    @property
    def out(self) -> Path:
        """The sweep directory."""
        return Path(self.spec.out)

    @cached_property
    def params(self) -> dict[str, dict[str, Scalar]]:
        """A grid trial's values by its id."""
        return {t.trial_id: t.params for t in self.grid}

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed sweep must share with the one it resumes (its trials' numbers depend on these)."""
        spec = self.spec.model_dump(mode="json")
        return {"base": self.base, **{k: spec[k] for k in ("space", "search", "metric", "mode", "seed", "metrics",
                                                             "cpus_per_actor", "nodes_per_actor")}}

    def trial_config(self, params: dict[str, Scalar], run_dir: Path) -> RunConfig:
        """Return the run config of a trial: base, the trial's values, its run directory, no progress bar,
        and the placement its Ray Tune reservation is sized from (see ``bundles``)."""
        data = _with(self.base, params)
        set_dotted(data, "output.out", str(run_dir))
        set_dotted(data, "output.progress", False)
        set_dotted(data, "output.overwrite", True)  # an interrupted trial resumes, or is rerun, in place
        config = build_config(data)
        engine = config.engine
        actors = min(engine.actors or math.ceil(config.nodes / self.spec.nodes_per_actor), config.nodes)
        cpus = engine.cpus_per_actor or self.spec.cpus_per_actor
        if cpus < 1 and config.influence.enabled:
            raise InputError(f"sweep: engine.cpus_per_actor {cpus:g} < 1 leaves no room in a trial for its influence "
                             "tasks (1 CPU each)")
        return config.model_copy(update={"engine": engine.model_copy(update={"actors": actors,
                                                                             "cpus_per_actor": cpus})})


def bundles(config: RunConfig) -> list[dict[str, float]]:
    """Return the placement-group bundles a trial of ``config`` reserves: an empty head bundle for the trial
    itself (it only drives), then one bundle per participant-group actor. Influence tasks (1 CPU each) run
    in the actors' bundles after training, so ``trial_config`` refuses less than 1 CPU per actor for them."""
    engine = config.engine
    actor = {"CPU": float(engine.cpus_per_actor or 1.0), "GPU": float(engine.gpus_per_actor)}
    return [{}] + [dict(actor) for _ in range(engine.actors or 1)]


def trial_id(index: int, params: dict[str, Scalar]) -> str:
    """Return a grid trial's id: its position in the grid and a hash of its values (a changed space gives
    new ids, so a resumed sweep never mistakes another trial's result for this one's)."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    return f"{index:04d}-{digest}"


def _spec_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"sweep: unknown key {where!r}"
    loc = first["loc"]
    if loc[:1] == ("space",) and len(loc) == 5:  # a value none of a space value's types takes (a list, a mapping)
        return (f"sweep: space.{loc[1]}: {loc[2]} value {first['input']!r} is not a number, text, true/false or null "
                "(a field that takes a list cannot be swept)")
    return f"sweep: {where + ': ' if where else ''}{msg}"


def bundled_sweep(name: str) -> Path:
    """Return the path of the bundled sweep ``name`` (``"lr_batch"`` or ``"lr_batch.yaml"``), whatever the working
    directory: the repository's ``sweeps/`` beside the installed package, as ``dice_ray.bundled_config`` finds a run
    config. Raise ``InputError`` naming the bundled sweeps if there is no such file."""
    return bundled_file("sweeps", "sweep", name)


def base_config_path(given: str, sweep_folder: Path) -> Path:
    """The file ``base.config`` names: as given (relative to the working directory), else relative to the sweep
    file's folder, else the bundled run config of that name where it is named as the repository's sweeps name theirs
    (``configs/alignment.yaml``): a sweep then reads the same base from any working directory. Else as given (and
    ``load_config`` says it does not exist)."""
    path = Path(given)
    if not path.is_absolute() and not path.exists() and (sweep_folder / path).exists():
        return sweep_folder / path
    return given_or_bundled(path, "configs", "config")


def _base_config(base: dict[str, Any], sweep_folder: Path) -> dict[str, Any]:
    base = copy.deepcopy(base)
    path = base.pop("config", None)
    if path is None:
        return base
    if not isinstance(path, str):
        raise InputError(f"sweep: base: config: expected a file path, got {type(path).__name__} {path!r}")
    data = load_config(base_config_path(path, sweep_folder))
    for key, value in _dotted_items(base):
        set_dotted(data, key, value)
    return data


def _dotted_items(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items += _dotted_items(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _with(base: dict[str, Any], params: dict[str, Scalar]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for field, value in params.items():
        set_dotted(data, field, value)
    return data


def _candidates(dist: dict[str, Any]) -> list[Any]:
    """The values a space field's distribution checks up front: a grid's or choice's values, a range's bounds, and
    a real range's point a third of the way in (no integer there: an integer field refuses it now, not at a draw)."""
    kind, values = next(iter(dist.items()))
    if kind in ("grid", "choice"):
        return values
    if kind == "int":
        return [int(v) for v in values]
    low, high = map(float, values)
    inside = low * (high / low) ** (1 / 3) if kind == "loguniform" else low + (high - low) / 3
    return [low, inside if inside != round(inside) else math.nextafter(inside, high), high]


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> Sweep:
    """Return the validated ``Sweep`` of a sweep file (``overrides``: top-level keys replacing the file's, as
    the command line gives them); raise ``InputError`` naming the first problem."""
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise InputError(f"sweep file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as err:
        raise InputError(_spec_error(err)) from None
    first = {field: _candidates(dist)[0] for field, dist in spec.space.items()}  # each field's first value
    try:
        base = _base_config(spec.base, path.parent)
    except InputError as err:
        raise InputError(f"sweep: base: {err}") from None
    try:
        build_config(base)
    except InputError as err:
        try:  # a base may leave to the space what it needs (misbehavior.fraction of a fraction sweep)
            build_config(_with(base, first))
        except InputError:
            raise InputError(f"sweep: base: {err}") from None
    examples = []
    for field, dist in spec.space.items():
        if field.startswith(("output.", "engine.address")):
            raise InputError(f"sweep: space.{field}: the sweep sets {field} itself")
        for value in _candidates(dist):
            example = {**first, field: value}  # the other fields at their first values: one may need another
            try:
                build_config(_with(base, example))
            except InputError as err:
                raise InputError(f"sweep: space.{field} = {value!r}: {err}") from None
            examples.append(example)
    largest = _largest_trial(spec.space, first)
    if largest is not None:  # a search may draw every sizing field's largest value at once: it must fit too
        try:
            build_config(_with(base, largest))
            examples.append(largest)
        except InputError:  # (a combination that cannot be built is a trial that fails, not one that waits)
            pass
    grid = []
    if spec.search == "grid":
        fields = list(spec.space)
        for index, values in enumerate(itertools.product(*(next(iter(spec.space[f].values())) for f in fields))):
            params = dict(zip(fields, values, strict=True))
            grid.append(Trial(trial_id(index, params), params))
        examples = [t.params for t in grid]
    columns, measured, needs = _survey(Sweep(spec, base, grid, examples))
    sweep = Sweep(spec, base, grid, examples, needs)
    _check_names(spec, columns, measured)
    params = sweep.examples[0] if sweep.examples else {}
    first = sweep.trial_config(params, Path("check"))  # the first trial's config, built once for both checks
    _check_metrics_reach_trials(sweep, first)
    _check_prepares(first, params)
    return sweep


# The fields that size a trial's reservation (``bundles``: actors x CPUs and GPUs per actor, and the participants
# the default plan spreads): a search's drawn trial with all of them at their largest must fit the cluster.
SIZING_FIELDS = ("nodes", "engine.actors", "engine.cpus_per_actor", "engine.gpus_per_actor")


def _largest_trial(space: dict[str, dict[str, Any]], first: dict[str, Scalar]) -> dict[str, Scalar] | None:
    """The swept values with every sizing field (``SIZING_FIELDS``) of the space at its largest candidate and the
    others at their first values, if two or more sizing fields are swept (one alone: checked value by value)."""
    largest = {}
    for field in SIZING_FIELDS:
        numbers = [v for v in _candidates(space[field]) if isinstance(v, int | float) and not isinstance(v, bool)] \
            if field in space else []
        if numbers:
            largest[field] = max(numbers)
    return {**first, **largest} if len(largest) > 1 else None


MAX_GRID_TRIALS = 100_000  # trials of one grid sweep
SURVEY_BAR = 2000  # checking more examples than this shows a progress bar (about 1 s per 10,000 here)


def _survey(sweep: Sweep) -> tuple[set[str], set[str], list[tuple[dict[str, Scalar], Placement]]]:
    """Build the run config of every example once (of a grid: every trial), refusing one that cannot be built
    with one line naming its values; return what the later checks need: the metric columns the trials report, the
    metric groups that measure something in some trial, and each distinct placement the trials reserve."""
    from tqdm import tqdm

    from dice_ray.sweep.metrics import METRICS, metric_columns

    spec = sweep.spec
    for name in spec.metrics or []:
        if name not in METRICS:
            raise InputError(f"sweep: metrics: {name!r} is unknown; choose from {', '.join(METRICS)}")
    columns: set[str] = set()
    measured: set[str] = set()
    needs: dict[str, tuple[dict[str, Scalar], Placement]] = {}
    idle: dict[str, str] | None = None  # swept fields that do nothing in every trial so far, with why
    for params in tqdm(sweep.examples, desc="checking trials", unit="trial", leave=False,
                       disable=len(sweep.examples) <= SURVEY_BAR):
        try:
            config = sweep.trial_config(params, Path("check"))
        except InputError as err:
            message = str(err)
            raise InputError(message if message.startswith("sweep:") else f"sweep: trial {params}: {message}") from None
        columns.update(metric_columns(config, spec.metrics))
        measured.update(name for name in spec.metrics or [] if metric_columns(config, [name]))
        need = bundles(config)
        needs.setdefault(json.dumps(need), (params, need))
        here = idle_settings(config, spec.space)
        idle = here if idle is None else {name: why for name, why in idle.items() if name in here}
    if idle:
        name, why = next(iter(idle.items()))
        raise InputError(f"sweep: space.{name} does nothing in any trial: it {why}")
    return columns, measured, list(needs.values())


def _check_prepares(first: RunConfig, params: dict[str, Scalar]) -> None:
    """The first trial's run (``first``, of the swept values ``params``) must prepare (its data, partition, topology
    file, model outputs), as ``simulate`` checks before it starts: what the base config gets wrong is then one line
    before Ray starts, not a sweep of failed trials that exits 0. (A value only some trials take that cannot run
    fails those trials, recorded.)"""
    from dice_ray.experiment import prepare

    try:
        prepare(first)
    except InputError as err:
        raise InputError(f"sweep: trial {params}: {err}") from None


def _check_metrics_reach_trials(sweep: Sweep, first: RunConfig) -> None:
    """Trials run in Ray workers, which import the modules a trial's config names (``first``: the first trial's; the
    base's ``imports``), not the script: a metric group, model, data set, loss or misbehaviour the script registers
    (``__main__``) is refused, one from a module the imports do not list gets a warning line (every trial would fail,
    some after their whole simulation, otherwise)."""
    from dice_ray.config import check_worker_module, check_workers_register, modules_named
    from dice_ray.registry import defining_module
    from dice_ray.sweep.metrics import METRICS

    listed = modules_named(first)
    try:
        for name in sweep.spec.metrics or METRICS:
            check_worker_module("sweep metric", name, defining_module(METRICS[name].compute), listed, "base.imports")
        check_workers_register(first, data_in_workers=True, field="base.imports")  # each trial prepares its data
    except InputError as err:
        raise InputError(f"sweep: {err}") from None


def _check_names(spec: SweepSpec, columns: set[str], measured: set[str]) -> None:
    """Metric groups, the optimized metric and the plot's fields must exist: ``columns``, the metric columns the
    trials report; ``measured``, the groups of ``spec.metrics`` that measure something in some trial."""
    for name in spec.metrics or []:
        if name not in measured:
            raise InputError(f"sweep: metrics: {name!r} measures nothing in these trials (what it reads is off in "
                             "every trial's config)")
    if spec.metric is not None and spec.metric not in columns:
        raise InputError(f"sweep: metric {spec.metric!r} is not reported by these trials; they report "
                         f"{', '.join(sorted(columns)) or 'no metrics'}")
    if spec.plot is not None:
        for field in (spec.plot.x, spec.plot.by):
            if field is not None and field not in spec.space:
                raise InputError(f"sweep: plot: {field!r} is not a field of the space ({', '.join(spec.space)})")
        if spec.plot.logx:  # a log axis drops what is not a positive number, without a word
            values = [v for listed in spec.space[spec.plot.x].values() for v in listed]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values):
                raise InputError(f"sweep: plot: logx needs positive numbers on the x axis; {spec.plot.x} takes "
                                 f"{values}")
        for metric in spec.plot.y:
            if metric not in columns | {"wall_seconds"}:
                raise InputError(f"sweep: plot: {metric!r} is not reported by these trials; they report "
                                 f"{', '.join(sorted(columns | {'wall_seconds'}))}")
