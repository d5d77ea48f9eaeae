"""The run configuration: typed sections with defaults, validated before any work starts.

A config is data: ``configs/*.yaml`` files hold it, ``--key value`` options override it, and the
resolved config is written to each run's ``manifest.json``. Every field has a default, so an empty
config runs on the embedded data. This module holds the simulated world's sections (topology, data, model,
optimizer, misbehaviour) and where it runs (engine, output); each method declares its own section beside its code
(``methods/dice/options.py``: influence; ``methods/proximal.py``, ``rewiring.py``, ``contributions.py``: the ledger)
and checks its own rules between sections (``Section.check``). Problems (types, ranges, unknown keys, names of
topologies, data sets, models, optimizers) become one-line ``InputError`` messages that name the field.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from dice_ray.core.losses import LOSSES
from dice_ray.core.misbehavior import BUILT_IN_FIELDS, KINDS, misbehavior, misbehavior_names
from dice_ray.core.models import MODELS, model_names
from dice_ray.core.population import OPTIMIZERS, OptimizerSpec
from dice_ray.core.topology import MATRIX_SUFFIXES, TIME_VARYING, TOPOLOGIES
from dice_ray.core.topology import WEIGHT_RULES as MIXING_RULES
from dice_ray.data import DATASETS, SCHEMES, WEIGHT_RULES, dataset_names
from dice_ray.errors import InputError, absent, first_line, unknown_name
from dice_ray.hooks import registered_methods
from dice_ray.methods.contributions import LedgerConfig
from dice_ray.methods.dice.options import InfluenceConfig
from dice_ray.methods.proximal import ProximalConfig
from dice_ray.methods.rewiring import RewiringConfig
from dice_ray.sections import RECORDED, FieldError, IdList, Ids, Section, comma_list, did_you_mean, one_line


def _one_of(what: str, choices: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> AfterValidator:
    """A validator accepting only ``choices`` (or what ``choices()`` returns then: a registry); its error names
    ``what`` and lists them."""

    def check(value: str) -> str:
        if callable(choices) and RECORDED.get():
            return value  # a name the recorded config's modules would register: not imported, so not checked
        names = choices() if callable(choices) else choices
        if value not in names:
            raise ValueError(unknown_name(what, value, names, registry=callable(choices)))
        return value

    return AfterValidator(check)


class TopologyConfig(Section):
    """Communication graph and mixing matrix W^t (concepts §1)."""

    name: Annotated[str, _one_of("topology", TOPOLOGIES)] = Field(
        "exponential", description=f"graph: {', '.join(TOPOLOGIES)}")
    weights: Annotated[str, _one_of("weight rule", MIXING_RULES)] = Field(
        "uniform", description=f"weight rule of a static graph: {', '.join(MIXING_RULES)} (a time-varying topology "
                               "and a W file set their own)")
    p: float | None = Field(None, gt=0, le=1, description="edge probability for erdos-renyi "
                                                           "(default 2 ln(N)/N)")
    rows: int | None = Field(None, ge=1, description="rows of a grid or torus (default: most square)")
    file: str | None = Field(None, description="edge list (.txt/.csv) or W matrix (.npy/.npz) for 'file'")
    directed: bool = Field(False, description="edges of an edge-list file are directed (src -> dst); not for a W "
                                              "file")


class ShrinkConfig(Section):
    """Participants holding less data: a seeded ``fraction`` of each listed participant's training samples is
    dropped (unused by anyone). Fraction 1 leaves none: such a participant takes no local step (Δ = 0) but
    still gossips."""

    ids: IdList = Field([], description="participants whose training data shrinks")
    fraction: float = Field(0.5, ge=0, le=1, description="share of their training samples dropped")


class DataConfig(Section):
    """Data set, partition over participants, and the held-out batch z′."""

    dataset: Annotated[str, _one_of("data set", dataset_names)] = Field(
        "mnist5k", description=f"data set: {', '.join(dataset_names())}, or one added with register_dataset")
    data_dir: str | None = Field(None, description="folder holding mnist/fashion-mnist/cifar10/cifar100/"
                                                   "tiny-imagenet in torchvision's layout")
    download: bool = Field(False, description="download the data set into data_dir if missing")
    partition: Annotated[str, _one_of("partition", SCHEMES)] = Field(
        "iid", description=f"partition scheme: {', '.join(SCHEMES)}")
    alpha: float = Field(0.5, gt=0, allow_inf_nan=False, description="Dirichlet concentration (partition=dirichlet)")
    shards_per_node: int = Field(2, ge=1, description="shards per participant (partition=shards)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of each participant's data held "
                                                             "out as its validation split")
    heldout_size: int = Field(500, ge=1, description="size of the shared held-out batch z′, drawn from the "
                                                     "test split (all of it where that is smaller: digits has "
                                                     "360; the manifest's data.heldout is the size used)")
    participant_weights: Annotated[str, _one_of("participant weights", WEIGHT_RULES)] = Field(
        "uniform", description="q_k: uniform or data-size")
    shrink: ShrinkConfig = Field(default_factory=ShrinkConfig,
                                 description="drop a share of some participants' training data")
    synthetic_samples: int = Field(10_000, ge=2, le=10_000_000, description="samples of 'synthetic'")
    synthetic_classes: int = Field(10, ge=2, le=10_000, description="classes of 'synthetic'")
    synthetic_shape: tuple[int, ...] = Field(
        (1, 8, 8), min_length=1, max_length=3,
        description="input shape of 'synthetic' (C, H, W for the image models, e.g. [3, 32, 32]; any for an MLP)")

    @field_validator("synthetic_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not all(0 < d <= 4096 for d in v):
            raise ValueError(f"every dimension must lie in 1..4096, got {list(v)}")
        return v


class ModelConfig(Section):
    """Model architecture and how participants' models are initialized and vectorized."""

    name: Annotated[str, _one_of("model", model_names)] = Field(
        "mlp", description="model from the registry (mlp, mlp-tanh, logreg, cnn, resnet18, …)")
    init: Literal["same", "independent"] = Field("same", description="same initial model for all, or one "
                                                                     "per participant")
    vectorize: Literal["auto", "vmap", "loop"] = Field(
        "auto", description="vmap over participants or a Python loop over them (same numbers to float "
                            "rounding); auto is vmap: 3-8x faster than the loop here for the MLP and the CNN "
                            "on 8x8 inputs, within 10% either way for the CNN on 28x28")
    conv: Literal["auto", "native", "unfold", "channels-last"] = Field(
        "auto", description="how stacked participants' 2-D convolutions compute: native (one grouped convolution "
                            "under vmap), unfold (im2col and one batched matrix product: 1.4-2x faster on an H200, "
                            "slower on CPUs), channels-last (the grouped convolution on minibatches laid out "
                            "channels-last: 0.88x a CNN round's time on CPUs with a step's passes in turn, no gain "
                            "with them side by side, and its numbers move by float32 rounding with the actor "
                            "count), auto (unfold on CUDA devices, else native)")
    pool: Literal["auto", "native", "gather"] = Field(
        "auto", description="how stacked participants' 2-D max poolings compute: native (PyTorch's pooling under "
                            "vmap), gather (each window's maximum found by the channels-last kernel, then gathered; in "
                            "evaluation, which no derivative goes through, the maximum of the windows' strided views: "
                            "the same numbers, bit for bit, faster on CPUs), auto (gather on CPUs)")
    import_module: str | None = Field(None, description="module to import first (registers custom models)")
    loss: Annotated[str, _one_of("loss", LOSSES.names)] = Field(
        "cross-entropy", description="the per-sample loss every participant minimizes and influence is measured "
                                     "on: cross-entropy, mse, or one added with register_loss")


class OptimConfig(Section):
    """Local optimizer O_k and minibatch size (shared by all participants)."""

    name: Annotated[str, _one_of("optimizer", OPTIMIZERS)] = Field(
        "sgd", description=f"optimizer: {', '.join(OPTIMIZERS)}")
    lr: float = Field(0.05, description="learning rate η (> 0)")
    batch_size: int = Field(8, ge=1, description="minibatch size |z_k^t|")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum (optimizer=momentum)")
    nesterov: bool = Field(False, description="Nesterov momentum (optimizer=momentum)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    eps: float = Field(1e-8, gt=0, le=1, description="Adam epsilon")
    weight_decay: float = Field(0.0, ge=0, le=1e3, description="L2 weight decay λ")

    @field_validator("lr")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (0 < v <= 1e3):  # also rejects NaN and inf
            raise ValueError(f"learning rate must be a positive number no larger than 1000, got {v}")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"Adam betas must lie in [0, 1), got {v}")
        return v

    def spec(self) -> OptimizerSpec:
        """Return the ``OptimizerSpec`` the population steps with."""
        return OptimizerSpec(self.name, self.lr, self.momentum, self.nesterov, tuple(self.betas), self.eps,
                             self.weight_decay)


# Default GPU share of a DICE-GT replay or retraining task when the run's actors use GPUs: four tasks per GPU. A
# replay steps the few participants a probe's cascade has reached, so one task alone leaves most of a GPU idle while
# its host code (scipy rows of W, the per-hop loop) runs; four overlap that, and each keeps a quarter of the GPU's
# memory for its window and CUDA context. A share is at most 1 (Ray's rule for fractions; a task uses one device).
TASK_GPU_SHARE = 0.25


class EngineConfig(Section):
    """Placement on Ray: how many participant-group actors, and their CPUs/GPUs."""

    actors: int | None = Field(None, ge=1, description="participant-group actors (default: one per machine, "
                                                       "or per GPU share); capped at the node count")
    cpus_per_actor: float | None = Field(None, gt=0, allow_inf_nan=False,
                                         description="CPUs reserved per actor (default: the smallest machine's CPUs "
                                                     "with one actor per machine, else the cluster's CPUs / actors)")
    gpus_per_actor: float = Field(0.0, ge=0, allow_inf_nan=False, description="GPUs per actor; fractions share a GPU")
    gpus_per_task: float | None = Field(
        None, ge=0, le=1, description=f"GPU share of each DICE-GT replay and retraining task, on CUDA when > 0 "
                                      f"(default: {TASK_GPU_SHARE} when gpus_per_actor > 0, else 0: on the CPU)")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="float32 mode of the local step: fp32 (IEEE, TF32 off: a GPU run equals the CPU run to "
                            "float32 rounding), tf32 (the local step's CUDA matmuls and convolutions in TF32), bf16 "
                            "(the local step autocast to bfloat16); evaluation, replays and the methods' "
                            "derivatives stay IEEE float32")
    cuda_graphs: bool = Field(True, description="on a GPU, replay each local step from one CUDA graph (one launch "
                                                "per round instead of one per kernel; the same numbers)")
    transport: Literal["auto", "object_store", "cuda_ipc"] = Field(
        "auto", description="how half-steps (and hooks' messages) travel between participant-group actors: auto "
                            "(CUDA IPC between actors sharing a GPU where a probe at start gets through, the object "
                            "store otherwise), "
                            "object_store (always; from a GPU a host round trip per round), cuda_ipc (every pair of "
                            "actors must share a GPU, else an error at start)")
    address: str | None = Field(None, description="Ray cluster address (default: a local Ray on 127.0.0.1)")
    max_recoveries: int = Field(3, ge=0, le=1000, description="actor or machine failures a run recovers from "
                                                             "(restore the last checkpoint, replay) before it gives up")
    restart_timeout: float = Field(600.0, gt=0, allow_inf_nan=False,
                                   description="seconds to wait for restarted actors after a failure")

    @model_validator(mode="after")
    def _cuda_ipc_needs_gpus(self) -> EngineConfig:
        if self.transport == "cuda_ipc" and self.gpus_per_actor == 0:
            raise ValueError("transport 'cuda_ipc' moves half-steps between actors sharing a GPU, but gpus_per_actor "
                             "is 0 (the actors compute on CPUs): use auto or object_store, or give the actors GPUs")
        return self

    def task_gpus(self) -> float:
        """GPUs each DICE-GT replay and retraining task asks Ray for: ``gpus_per_task``, by default
        ``TASK_GPU_SHARE`` when the run's actors use GPUs and 0 (CPU tasks) when they do not."""
        if self.gpus_per_task is not None:
            return self.gpus_per_task
        return TASK_GPU_SHARE if self.gpus_per_actor > 0 else 0.0


class OutputConfig(Section):
    """Where results go and how often participants are evaluated."""

    out: str | None = Field(None, min_length=1, description="run directory (default runs/<time>-<topology>-n<N>)")
    eval_every: int = Field(5, ge=1, description="evaluate every k rounds (and after the last)")
    overwrite: bool = Field(False, description="replace an existing run directory (one with a manifest.json: "
                                                "never another folder's files)")
    checkpoint_every: int = Field(50, ge=0, description="save the simulation state every k rounds (0: never); "
                                                        "--resume and failure recovery continue from the last one")
    keep_checkpoints: bool = Field(False, description="keep the run's checkpoints/ after it completes")
    progress: bool = Field(True, description="show a progress bar")
    log: list[Literal["tensorboard", "mlflow"]] = Field([], description="experiment trackers that also get the "
                                                        "per-round metrics (comma-separated; docs: how-to/tracking)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                                       "sqlite:///<run directory>/mlflow.db; a resume does not "
                                                       "take the one a run recorded)")

    @field_validator("log", mode="before")
    @classmethod
    def _split_log(cls, value: Any) -> Any:
        return comma_list(value)


class MisbehaviorConfig(Section):
    """Participants that misbehave, and how (concepts §5). Off with kind ``none``."""

    kind: Annotated[str, _one_of("misbehaviour", misbehavior_names)] = Field(
        "none", description=f"how misbehaving participants corrupt their data or updates: none, "
                            f"{', '.join(BUILT_IN_FIELDS)}, or one added with register_misbehavior")
    count: int | None = Field(None, ge=0, description="how many participants misbehave")
    fraction: float | None = Field(None, ge=0, le=1, description="or which share of them (rounded)")
    selection: Literal["random", "ids", "degree"] = Field("random", description="random, the given ids, or "
                                                                                 "the highest in-degree first")
    ids: Ids = Field(None, description="participants that misbehave (selection ids)")
    flip_fraction: float = Field(1.0, ge=0, le=1, description="label-flip: share of local labels flipped")
    sigma: float = Field(1.0, ge=0, le=1e3, description="feature-noise: std of the noise added to inputs")
    factor: float = Field(10.0, ge=-1e3, le=1e3, description="scale: the factor c of the sent update θ + cΔ")
    options: dict[str, JsonValue] = Field({}, description="a kind added with register_misbehavior: its class's "
                                                          "keyword arguments (--set misbehavior.options.NAME=VALUE)")

    def number(self, nodes: int) -> int:
        """How many of ``nodes`` participants misbehave."""
        if self.kind == "none":
            return 0
        if self.selection == "ids":
            return len(set(self.ids or []))  # a recorded config of an earlier version may repeat one
        if self.fraction is not None:
            return int(round(self.fraction * nodes))
        return self.count or 0


# The built-in methods' sections of the run config, each declared beside its method's code (a registered user method's
# section is named by the method).
METHOD_SECTIONS = ("influence", "proximal", "rewiring", "ledger")

# Fields a resumed run may change: where and how it runs, never what it computes.
RESUME_FIELDS = ("engine.address", "engine.actors", "engine.cpus_per_actor", "engine.gpus_per_actor",
                 "engine.transport", "output.progress", "output.keep_checkpoints", "output.checkpoint_every")


def import_modules(names: list[str]) -> None:
    """Import ``names`` (modules that register models, data sets, losses, misbehaviours or methods); raise
    ``InputError``."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise FieldError(("imports",), f"module {name!r} cannot be imported: {err}") from None
        except Exception as err:  # the module's own code failed (a SyntaxError, an error it raises): its one line
            raise FieldError(("imports",), f"module {name!r} failed as it was imported: "
                                           f"{first_line(err, named=True)}") from None


def modules_in(data: dict[str, Any]) -> list[str]:
    """The modules a config not yet validated (a nested dict) names: ``imports``, then ``model.import_module`` (values
    of the wrong type are left for validation to report)."""
    names = data.get("imports") or []
    model = data.get("model")
    module = model.get("import_module") if isinstance(model, dict) else getattr(model, "import_module", None)
    names = names if isinstance(names, list) and all(isinstance(n, str) for n in names) else []
    return [*names, *([module] if isinstance(module, str) and module else [])]


def check_workers_register(config: RunConfig, data_in_workers: bool = False, field: str = "imports") -> None:
    """Check that Ray workers will know the model, loss and misbehaviour ``config`` names, and with
    ``data_in_workers`` its data set (a sweep's trials load it; a run's actors and tasks receive the arrays from the
    driver): they look each up by name after importing the config's ``imports`` (``load_imports``; ``field``: where
    the message says they are listed). One registered by the script itself (``__main__``, which the workers do not
    import) raises ``InputError``, before any work (the run would fail inside its actors); one defined in a module
    the imports do not cover gets a warning line (another listed module may still register it)."""
    listed = modules_named(config)
    named = [("model", config.model.name, MODELS.module(config.model.name)),
             ("loss", config.model.loss, LOSSES.module(config.model.loss)),
             ("misbehaviour", config.misbehavior.kind, KINDS.module(config.misbehavior.kind))]
    if data_in_workers:
        named.insert(1, ("data set", config.data.dataset, DATASETS.module(config.data.dataset)))
    for kind, name, module in named:
        check_worker_module(kind, name, module, listed, field)


def check_worker_module(kind: str, name: str, module: str | None, listed: list[str], field: str = "imports") -> None:
    """Whether Ray workers, which import the modules ``listed`` (the config field ``field``), will know the ``kind``
    ``name`` that ``module`` registered: one registered by the script itself (``__main__``) raises ``InputError``;
    one from a module the list does not cover gets a warning line."""
    if module is None or module == "dice_ray" or module.startswith("dice_ray."):
        return
    if module == "__main__":  # (a script the imports list registers its names again, as its module, on import)
        local = ", or run with the local engine" if field == "imports" else ""
        raise InputError(f"{kind} {name!r} is registered by the script itself, which Ray workers do not run: "
                         f"move it into a module and list that in {field}{local}")
    if not any(module == m or module.startswith(f"{m}.") or m.startswith(f"{module}.") for m in listed):
        flag = f", --imports {module}" if field == "imports" else ""
        print(f"warning: {kind} {name!r} is defined in the module {module}, which the config's {field} do not "
              f"list: unless a listed module registers it, Ray workers will not know it ({field}: [{module}]{flag})",
              file=sys.stderr)


def load_imports(config: RunConfig) -> None:
    """Import the modules a run config names (``imports``, ``model.import_module``): in the driver before the run,
    and in every Ray worker that builds participants or replays them."""
    import_modules(modules_named(config))


class RunConfig(Section):
    """A whole simulation: one of these fully determines a run's numbers (with its seed). The simulated world (the
    participants, their data, model, optimizer, topology, misbehaviour), where it runs (engine, output) and the
    methods' sections: the built-in ones below (``METHOD_SECTIONS``) and one per registered user method with options
    (``hooks.register_method``), named by the method."""

    model_config = ConfigDict(extra="allow", strict=False, validate_assignment=True)

    imports: list[str] = Field([], description="modules imported before the config is checked, and in every Ray "
                                               "worker: they register custom models, data sets, losses and methods")
    seed: int = Field(0, ge=0, lt=2**32, description="random seed (init, partitions, minibatches, W^t)")
    nodes: int = Field(16, ge=2, le=1_000_000, description="number of participants N")
    rounds: int = Field(100, ge=1, le=10_000_000, description="communication rounds T")
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    misbehavior: MisbehaviorConfig = Field(default_factory=MisbehaviorConfig)
    proximal: ProximalConfig = Field(default_factory=ProximalConfig)
    rewiring: RewiringConfig = Field(default_factory=RewiringConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)

    @model_validator(mode="before")
    @classmethod
    def _import_first(cls, data: Any) -> Any:
        """Import ``imports`` (and ``model.import_module``) before the fields are checked: they register names
        (and methods, whose sections are then validated: ``_user_sections``). Not
        for a recorded config (``read_recorded``): reading a run imports nothing it names."""
        if isinstance(data, dict) and not RECORDED.get():
            import_modules(modules_in(data))
        return cls._user_sections(data)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.topology.name == "file" and not self.topology.file:
            raise ValueError("topology 'file' needs topology.file (--topology-file PATH)")
        rows = self.topology.rows
        if self.topology.name in ("grid", "torus") and rows is not None and self.nodes % rows:
            raise ValueError(f"topology.rows (--grid-rows) {rows} does not divide nodes (--nodes) {self.nodes}: a "
                             f"{self.topology.name} needs rows x columns = nodes")
        bad = self.misbehavior
        if bad.kind != "none":
            if bad.selection == "ids" and not bad.ids:
                raise ValueError("misbehavior.selection 'ids' needs misbehavior.ids")
            if bad.selection != "ids" and bad.ids:
                raise ValueError(f"misbehavior.ids are used with selection 'ids', not {bad.selection!r}")
            given = [f"misbehavior.{name}" for name in ("count", "fraction") if getattr(bad, name) is not None]
            if bad.selection == "ids" and given:
                raise ValueError(f"misbehavior.ids name who misbehaves; {given[0]} would be ignored: give one")
            if len(given) == 2:
                raise ValueError("misbehavior.count and misbehavior.fraction both say how many misbehave: give one")
            if bad.selection != "ids" and bad.count is None and bad.fraction is None:
                raise ValueError(f"misbehavior.kind {bad.kind!r} needs how many misbehave: misbehavior.count "
                                 "(--misbehaving N), misbehavior.fraction (--misbehaving-fraction F) or "
                                 "misbehavior.ids (--misbehaving-ids)")
            for k in bad.ids or []:
                if not 0 <= k < self.nodes:
                    raise ValueError(f"misbehaving participant {k} is not a participant (0..{self.nodes - 1})")
            if bad.number(self.nodes) > self.nodes:
                raise ValueError(f"misbehavior.count {bad.count} exceeds the {self.nodes} participants")
            if bad.fraction and not bad.number(self.nodes) and not RECORDED.get():
                raise ValueError(f"misbehavior.fraction {bad.fraction} of {self.nodes} participants rounds to none "
                                 "misbehaving: give a larger fraction, or misbehavior.count (--misbehaving N)")
            fields = BUILT_IN_FIELDS.get(bad.kind)
            if bad.options and fields is not None:
                own = ", ".join(f"misbehavior.{f}" for f in fields.values()) or "no options"
                raise ValueError(f"misbehavior.options are for kinds added with register_misbehavior; built-in "
                                 f"{bad.kind!r} takes {own}")
            if fields is None:  # a user's kind reads its options, never the built-ins' fields
                changed = [f for own in BUILT_IN_FIELDS.values() for f in own.values()
                           if getattr(bad, f) != MisbehaviorConfig.model_fields[f].default]
                if changed:
                    raise ValueError(f"misbehavior.{changed[0]} is a built-in kind's option; {bad.kind!r} takes "
                                     "misbehavior.options")
            if not RECORDED.get():  # built now, so a bad option is refused before any work
                try:
                    misbehavior(bad)
                except InputError as err:
                    raise ValueError(str(err)) from None
        elif bad.options:
            raise ValueError("misbehavior.options need a misbehavior.kind")
        for k in self.data.shrink.ids:
            if not 0 <= k < self.nodes:
                raise ValueError(f"data.shrink participant {k} is not a participant (0..{self.nodes - 1})")
        for _, section in self.method_sections():
            section.check(self)
        return self

    def recorded(self) -> dict[str, Any]:
        """This config as a run records it (its manifest, its checkpoints' digest, its trackers' parameters): without
        the sections of registered user methods it leaves off. Those are added to every config a process builds once
        it has registered the method, but do not change a run that does not use it, so a run started from a script
        that registered one can be resumed, reported on and compared where it is not registered."""
        data = self.model_dump(mode="json")
        for method in registered_methods():
            if method.options is not None and method.name in data and not method.enabled(self):
                del data[method.name]
        return data

    def method_sections(self) -> list[tuple[str, Section]]:
        """(name, options) of every method's section: the built-in ones, then those of registered user methods
        (``hooks.register_method``), in order. A received run's section of a method not registered here is a plain
        dict (``read_recorded``) and is not listed."""
        built_in = [(name, getattr(self, name)) for name in METHOD_SECTIONS]
        extra = [(name, value) for name, value in (self.__pydantic_extra__ or {}).items() if isinstance(value, Section)]
        return built_in + extra

    @classmethod
    def _user_sections(cls, data: Any) -> Any:
        """Validate the sections of registered user methods (``Method.options``), after ``imports`` registered them;
        any other unknown key is refused (a recorded config keeps a section whose method is not registered here, as
        recorded: reading a run imports nothing)."""
        if not isinstance(data, dict):
            return data
        options = {m.name: m.options for m in registered_methods() if m.options is not None}
        data = dict(data)
        for key in [k for k in data if k not in cls.model_fields]:
            if key in options:
                value = data[key]
                if isinstance(value, Section):
                    value = value.model_dump()
                try:
                    data[key] = options[key].model_validate(value or {})
                except FieldError as err:
                    raise FieldError((key, *err.loc), err.message, err.extra) from None
            elif not (RECORDED.get() and isinstance(data[key], dict)):
                hint = did_you_mean(key, [*cls.model_fields, *options]) or (
                    " (a method's section? import the module that registers it first: the config's imports, or "
                    "--imports)" if isinstance(data[key], dict) else "")
                raise FieldError((key,), hint, extra=True)
        for key, option in options.items():  # a registered method's section with its defaults, when not given
            data.setdefault(key, option())
        return data


def read_recorded(data: Any, where: str) -> RunConfig:
    """Return the ``RunConfig`` recorded in a run directory, checkpoint or sweep directory (``where`` names it),
    validated without importing anything it names: a directory received from someone else can be read, analyzed and
    reported on without running its code. Names that its modules would register (data sets, losses) are taken as
    recorded. Only ``run`` and ``resume`` import them (``modules_named``)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: the recorded config is not a mapping of sections")
    token = RECORDED.set(True)
    try:
        return RunConfig.model_validate(data)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    finally:
        RECORDED.reset(token)


def modules_named(config: RunConfig) -> list[str]:
    """The modules running ``config`` imports (``imports``, then ``model.import_module``): code that runs in this
    process and in every Ray worker."""
    return [*config.imports, *([config.model.import_module] if config.model.import_module else [])]


def forget_address(data: Any, where: str, given: str | None = None, warn: bool = True) -> None:
    """Drop the Ray address a run directory's recorded config ``data`` names (``engine.address``): the session that
    computes the run again says where it runs (``given``: its ``--address``; else ``RAY_ADDRESS``; else a local Ray).
    A run directory may come from someone else, and joining the cluster it names would run that cluster's code here
    (Ray unpickles what a cluster sends back). One warning line (``warn``) when the recorded address is not where it
    runs."""
    engine = data.get("engine") if isinstance(data, dict) else None
    recorded = engine.pop("address", None) if isinstance(engine, dict) else None
    here = given or os.environ.get("RAY_ADDRESS")
    if warn and recorded is not None and recorded != here:
        print(f"warning: {where}: the run was placed on the Ray cluster at {recorded!r}; a run directory does not "
              f"choose the cluster a session joins, so this one runs on {repr(here) if here else 'a local Ray'} "
              f"(engine.address (--address) or RAY_ADDRESS {recorded!r} continues there)", file=sys.stderr)


def forget_tracking_uri(data: Any, where: str) -> None:
    """Drop the MLflow tracking URI a run directory's recorded config ``data`` names (``output.tracking_uri``): the
    session that continues the run says where its records go (``MLFLOW_TRACKING_URI``, else the run directory's
    SQLite store). A run directory may come from someone else, and MLflow sends this machine's host name, and the
    credentials it is given (``MLFLOW_TRACKING_TOKEN``, ...), with the records to that URI. One warning line when
    the run logs to MLflow and the recorded URI is not where the records go now."""
    output = data.get("output") if isinstance(data, dict) else None
    recorded = output.get("tracking_uri") if isinstance(output, dict) else None
    if recorded is None:
        return
    output["tracking_uri"] = None
    here = os.environ.get("MLFLOW_TRACKING_URI")
    logs = comma_list(output.get("log") or [])
    if isinstance(logs, list) and "mlflow" in logs and recorded != here:
        print(f"warning: {where}: the run sent its MLflow records to {recorded!r}; a run directory does not choose "
              f"where a session sends records (and the credentials MLflow sends with them), so this one sends them "
              f"to {repr(here) if here else 'the run directory (mlflow.db)'} (MLFLOW_TRACKING_URI={recorded} "
              "continues there)", file=sys.stderr)


def forget_download(data: Any, where: str) -> None:
    """Drop ``data.download`` from a run directory's recorded config ``data``: a resume or retraining reads the data
    set from ``data_dir``, and does not fetch it from the network into a folder a received run names. One warning
    line when the run had it on (download the data set first, then resume)."""
    section = data.get("data") if isinstance(data, dict) else None
    if isinstance(section, dict) and section.get("download"):
        section["download"] = False
        print(f"warning: {where}: the run downloaded its data set; a run directory does not choose what is fetched "
              "from the network, or where it is written, so this session reads it from data.data_dir as it is",
              file=sys.stderr)


def rerun_config(data: Any, where: str, allow_imports: bool) -> RunConfig:
    """Return the recorded config of a run directory that is about to compute again (a resume, a retraining), built
    as ``build_config`` builds a new one, importing its modules, but only with ``allow_imports``: otherwise one
    ``InputError`` naming the modules, before anything is imported."""
    named = modules_named(read_recorded(data, where))
    if named and not allow_imports:
        raise InputError(f"{where}: its config imports {', '.join(named)}, code that would run in this process and in "
                         "every Ray worker; continue only a run you trust, with allow_imports=True (--allow-imports)")
    import_modules(named)
    known = {*RunConfig.model_fields, *(m.name for m in registered_methods() if m.options is not None)}
    unknown = [key for key in data if key not in known]  # a recorded config keeps only the user methods it used
    if unknown:
        raise InputError(f"{where}: it used the method {unknown[0]!r}, which neither this process nor a module its "
                         "config imports registers; continue it from Python after importing the module that registers "
                         "it (dice_ray.resume)")
    return build_config(data)


def build_config(data: dict[str, Any] | None = None) -> RunConfig:
    """Return the validated ``RunConfig`` for a nested dict (as read from YAML); raise ``InputError``."""
    if data is not None and not isinstance(data, dict):
        raise InputError(f"config: expected a mapping of sections, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as err:
        raise one_line(err) from None


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a mapping naming a key twice (which it reads as the last one: a slip, like
    a field given twice), merge keys (``<<``) apart."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
            except TypeError:  # an unhashable key: the base constructor says so
                break
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found key {key!r} twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats: PyYAML follows YAML 1.1, where an exponent needs a decimal point, so it read ``lr: 1e-3`` as the
# text '1e-3' (a sweep stored it as text, sorted it as text and took [1e-2, 0.01] for two values).
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


YAML_LIMIT = 1_000_000  # values a config may hold once aliases are expanded; a run config holds hundreds


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML with ``_ConfigLoader``; raise ``yaml.YAMLError`` (with where it failed) if it is not,
    or if its aliases expand to more than ``YAML_LIMIT`` values (a kilobyte of nested aliases expands to billions,
    which validation would walk for minutes)."""
    value = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a safe loader)
    budget, todo = YAML_LIMIT, [value]
    while todo:  # aliases are shared objects: count every visit, as validation walks them
        item = todo.pop()
        budget -= 1
        if budget < 0:
            raise yaml.YAMLError(f"its aliases expand to more than {YAML_LIMIT:,} values")
        if isinstance(item, dict):
            todo += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            todo += item
    return value


def yaml_error(err: yaml.YAMLError) -> str:
    """The one line of a YAML error: what is wrong and where (PyYAML's first line says only what it was doing)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        return f"{err.problem}" + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else "")
    return first_line(err)


def read_yaml(path: str | Path, kind: str = "config file") -> Any:
    """Return the parsed contents of the YAML file ``path`` (None if empty); raise ``InputError`` naming it as
    ``kind`` if it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} {str(path)!r} {absent(path, 'file')}")
    try:
        return load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{kind} {str(path)!r} is not valid YAML: {yaml_error(err)}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{kind} {str(path)!r} is not valid YAML: {first_line(err)}") from None
    except OSError as err:  # no permission to read it, an I/O error
        raise InputError(f"{kind} {str(path)!r} cannot be read: {err.strerror or first_line(err)}") from None


def bundled_config(name: str) -> Path:
    """Return the path of the bundled run config ``name`` (``"anomaly-proximal"`` or ``"anomaly-proximal.yaml"``),
    whatever the working directory: the repository's ``configs/`` beside the installed package (a checkout or an
    editable install), so a notebook opened in ``docs/`` finds it as one run from the repository root does.
    Raise ``InputError`` naming the bundled configs if there is no such file."""
    return bundled_file("configs", "config", name)


def bundled_file(folder: str, kind: str, name: str) -> Path:
    """The YAML file ``name`` (with or without ``.yaml``) of the repository's ``folder`` beside the installed package;
    ``InputError`` naming the bundled ``kind``s if there is no such file."""
    stem = Path(name).name.removesuffix(".yaml")
    where = Path(__file__).resolve().parents[1] / folder
    path = where / f"{stem}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in where.glob("*.yaml"))) or f"none: no {where}"
        raise InputError(f"no bundled {kind} {name!r} (bundled: {have})")
    return path


def given_or_bundled(given: str | Path, folder: str, kind: str) -> Path:
    """The file ``given`` names: as given (relative to the working directory), else, when it is named as the
    repository names its own (``configs/alignment.yaml``, ``alignment``), the bundled one of that name, so the docs'
    commands run from any directory. Else as given (and reading it says it does not exist)."""
    path = Path(given)
    if path.is_absolute() or path.exists() or path.parent.name not in ("", folder):
        return path
    try:
        return bundled_file(folder, kind, path.name)
    except InputError:
        return path


def load_config(path: str | Path) -> dict[str, Any]:
    """Return the nested dict of a YAML config file (not yet validated); raise ``InputError``."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


# Settings that do nothing while their method (or data change) is off: (prefix of their fields, the fields that turn
# it on, how to turn it on, whether a config has it on).
SWITCHED: list[tuple[str, tuple[str, ...], str, Callable[[RunConfig], bool]]] = [
    ("influence.", ("influence.enabled",), "--influence", lambda c: c.influence.enabled),
    ("proximal.", ("proximal.enabled",), "--proximal", lambda c: c.proximal.enabled),
    ("rewiring.", ("rewiring.mode",), "--rewire MODE", lambda c: c.rewiring.mode != "none"),
    ("ledger.", ("ledger.enabled", "ledger.loo", "ledger.shapley_permutations"), "--ledger",
     lambda c: c.ledger.active),
    ("data.shrink.", ("data.shrink.ids",), "--shrink-ids", lambda c: bool(c.data.shrink.ids)),
]

# Settings of some values of another: (field, the other's flag and field, the values it applies to).
CHOSEN_BY = [
    ("data.alpha", "--partition", "data.partition", ("dirichlet",)),
    ("data.shards_per_node", "--partition", "data.partition", ("shards",)),
    ("topology.p", "--topology", "topology.name", ("erdos-renyi",)),
    ("topology.rows", "--topology", "topology.name", ("grid", "torus")),
    ("topology.file", "--topology", "topology.name", ("file",)),
    ("topology.directed", "--topology", "topology.name", ("file",)),
    ("optim.momentum", "--optimizer", "optim.name", ("momentum",)),
    ("optim.nesterov", "--optimizer", "optim.name", ("momentum",)),
    ("optim.betas", "--optimizer", "optim.name", ("adam",)),
    ("optim.eps", "--optimizer", "optim.name", ("adam",)),
]


# Placement on Ray, which the local engine (everything in this process, on its CPUs) has none of.
RAY_ONLY = ("engine.actors", "engine.cpus_per_actor", "engine.gpus_per_actor", "engine.gpus_per_task",
            "engine.transport", "engine.address", "engine.max_recoveries", "engine.restart_timeout")


def refuse_idle_settings(config: RunConfig, given: Mapping[str, str], engine: str = "ray") -> None:
    """Raise ``InputError`` for the first of the settings ``given`` (dotted name -> how it was given: a flag,
    ``--set KEY``, a keyword) that does nothing in ``config`` (``idle_settings``), or on ``engine`` (Ray's placement
    on the local engine)."""
    idle = idle_settings(config, given)
    if engine == "local":
        idle.update({name: "places the run on Ray; this run has engine local (--engine local), which runs in this "
                           "process" for name in given if name in RAY_ONLY and name not in idle})
    if idle:
        name, why = next(iter(idle.items()))
        raise InputError(f"{given[name]} {why}")


def idle_settings(config: RunConfig, fields: Iterable[str]) -> dict[str, str]:
    """Those of ``fields`` (dotted names someone set on purpose: on the command line, in a sweep's space) that do
    nothing in ``config``, each with why ("applies to influence, which this run leaves off (influence.enabled,
    --influence)"), the most telling first: a misbehaviour setting without a kind, a method's setting with the method
    off (a user method's too, with its ``enabled`` off), a setting of another choice (``CHOSEN_BY``). A config file
    may keep them."""
    fields = list(fields)
    idle: dict[str, str] = {}
    for name in fields:
        if name.startswith("misbehavior.") and name != "misbehavior.kind" and config.misbehavior.kind == "none":
            idle.setdefault(name, "needs misbehavior.kind (--misbehavior KIND), how they misbehave; it is 'none'")
    switched = SWITCHED + [(f"{m.name}.", (f"{m.name}.enabled",), f"--{m.name}-enabled".replace("_", "-"),
                            m.enabled) for m in registered_methods()
                           if m.options is not None and "enabled" in m.options.model_fields]
    for prefix, switches, how, on in switched:
        for name in fields:
            if name.startswith(prefix) and name not in switches and not on(config):
                idle.setdefault(name, f"applies to {prefix.rstrip('.')}, which this run leaves off "
                                      f"({switches[0]}, {how})")
    for name, chooser, chosen, values in CHOSEN_BY:
        section, field = chosen.split(".")
        current = getattr(getattr(config, section), field)
        if name in fields and current not in values:
            idle.setdefault(name, f"applies only with {chosen} ({chooser}) {' or '.join(values)}; "
                                  f"this run has {chosen} {current} (give {chooser} {values[0]} too)")
    topology = config.topology
    if "topology.weights" in fields and topology.name in TIME_VARYING:
        idle.setdefault("topology.weights", f"turns a static graph into W; topology {topology.name} sets its own "
                                            f"weights (½ to each of a round's pair)")
    if topology.name == "file" and Path(topology.file or "").suffix.lower() in MATRIX_SUFFIXES:
        for name in ("topology.weights", "topology.directed"):
            if name in fields:
                idle.setdefault(name, f"applies to an edge list; topology.file {topology.file!r} holds W itself")
    return idle


def apply_sets(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides ``KEY=VALUE`` (dotted key, YAML value) to ``data`` in place; return it. A key set
    twice is refused (the last would win: a slip, as a flag given with its ``--set`` is)."""
    seen = set()
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        if key.strip() in seen:
            raise InputError(f"--set {key.strip()} is given twice; give each field once")
        seen.add(key.strip())
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as err:
            raise InputError(f"--set {item}: the value is not YAML ({yaml_error(err)})") from None
        set_dotted(data, key.strip(), value)
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    if not isinstance(data, dict):
        raise InputError(f"config: expected a mapping of sections, got {type(data).__name__}")
    node = data
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise InputError(f"config: {key!r} must be a section (mapping), got {child!r}")
        node = child
    node[leaf] = value
