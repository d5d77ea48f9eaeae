"""The run configuration: typed sections with defaults, validated in one place.

A config is data: ``configs/*.yaml`` files hold it, ``--key value`` options override it, and the
resolved config is written to each run's ``manifest.json``. Every field has a default, so an empty
config runs on the embedded data. Validation (types, ranges, unknown keys, names of topologies, data
sets, models, optimizers) happens here, before any work starts; problems become one-line
``InputError`` messages that name the field.
"""

from __future__ import annotations

import contextvars
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dice_ray.core.losses import loss_names
from dice_ray.core.population import OPTIMIZERS, OptimizerSpec
from dice_ray.core.topology import TOPOLOGIES
from dice_ray.core.topology import WEIGHT_RULES as MIXING_RULES
from dice_ray.data import SCHEMES, WEIGHT_RULES, dataset_names
from dice_ray.errors import InputError


def _one_of(what: str, choices: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> AfterValidator:
    """A validator accepting only ``choices`` (or what ``choices()`` returns then: a registry); its error names
    ``what`` and lists them."""

    def check(value: str) -> str:
        if callable(choices) and _RECORDED.get():
            return value  # a name the recorded config's modules would register: not imported, so not checked
        names = choices() if callable(choices) else choices
        if value not in names:
            raise ValueError(f"{what} {value!r} is unknown; choose one of {', '.join(names)}")
        return value

    return AfterValidator(check)


# True while a config read from a run directory, a checkpoint or a sweep directory is validated (``read_recorded``).
# A context variable, not pydantic's validation context: sections with their own ``__init__`` do not pass that on.
_RECORDED: contextvars.ContextVar[bool] = contextvars.ContextVar("recorded", default=False)


def comma_list(value: Any) -> Any:
    """A comma-separated string from the command line as a list of its non-empty items; anything else as it is."""
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def distinct_variants(value: list[str]) -> list[str]:
    """A list of DICE-E variants as given, refused if empty or if it names one twice."""
    if not value:
        raise ValueError("needs at least one variant (first-order, curvature, second-order)")
    if len(set(value)) != len(value):
        raise ValueError(f"lists a variant twice: {value}")
    return value


Variant = Literal["first-order", "curvature", "second-order"]
SECOND_ORDER_B = ("second-order: also carry b, the perturbation's O(Δ²) part, through the local steps (one nested "
                  "forward-mode pass per step). False keeps the z′ Hessian term alone: about half the cost at a small "
                  "z′, exact to second order only in the direct term and at hop 1")
# A list of DICE-E variants: comma-separated on the command line, each named once.
VariantList = Annotated[list[Variant], BeforeValidator(comma_list), AfterValidator(distinct_variants)]


class _Section(BaseModel):
    """A config section: unknown keys are refused, and a bad value raises ``InputError`` with one line that
    names the field (also when built in Python: ``RunConfig(nodes=1)``)."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise _one_line(err) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Any:
        """Validate ``obj`` (a nested dict); raise ``InputError`` with one line on bad input."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise _one_line(err) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise _one_line(err) from None


class TopologyConfig(_Section):
    """Communication graph and mixing matrix W^t (concepts §1)."""

    name: Annotated[str, _one_of("topology", TOPOLOGIES)] = Field(
        "exponential", description=f"graph: {', '.join(TOPOLOGIES)}")
    weights: Annotated[str, _one_of("weight rule", MIXING_RULES)] = Field(
        "uniform", description=f"weight rule: {', '.join(MIXING_RULES)}")
    p: float | None = Field(None, gt=0, le=1, description="edge probability for erdos-renyi "
                                                           "(default 2 ln(N)/N)")
    rows: int | None = Field(None, ge=1, description="rows of a grid or torus (default: most square)")
    file: str | None = Field(None, description="edge list (.txt/.csv) or W matrix (.npy/.npz) for 'file'")
    directed: bool = Field(False, description="edges of an edge-list file are directed (src -> dst)")


class ShrinkConfig(_Section):
    """Participants holding less data: a seeded ``fraction`` of each listed participant's training samples is
    dropped (unused by anyone). Fraction 1 leaves none: such a participant takes no local step (Δ = 0) but
    still gossips."""

    ids: list[int] = Field([], description="participants whose training data shrinks")
    fraction: float = Field(0.5, ge=0, le=1, description="share of their training samples dropped")


class DataConfig(_Section):
    """Data set, partition over participants, and the held-out batch z′."""

    dataset: Annotated[str, _one_of("data set", dataset_names)] = Field(
        "mnist5k", description=f"data set: {', '.join(dataset_names())}, or one added with register_dataset")
    data_dir: str | None = Field(None, description="folder holding mnist/fashion-mnist/cifar10/cifar100/"
                                                   "tiny-imagenet in torchvision's layout")
    download: bool = Field(False, description="download the data set into data_dir if missing")
    partition: Annotated[str, _one_of("partition", SCHEMES)] = Field(
        "iid", description=f"partition scheme: {', '.join(SCHEMES)}")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (partition=dirichlet)")
    shards_per_node: int = Field(2, ge=1, description="shards per participant (partition=shards)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of each participant's data held "
                                                             "out as its validation split")
    heldout_size: int = Field(500, ge=1, description="size of the shared held-out batch z′ "
                                                     "(from the test split)")
    participant_weights: Annotated[str, _one_of("participant weights", WEIGHT_RULES)] = Field(
        "uniform", description="q_k: uniform or data-size")
    shrink: ShrinkConfig = Field(default_factory=ShrinkConfig,
                                 description="drop a share of some participants' training data")
    synthetic_samples: int = Field(10_000, ge=2, le=10_000_000, description="samples of 'synthetic'")
    synthetic_classes: int = Field(10, ge=2, le=10_000, description="classes of 'synthetic'")


class ModelConfig(_Section):
    """Model architecture and how participants' models are initialized and vectorized."""

    name: str = Field("mlp", description="model from the registry (mlp, mlp-tanh, logreg, cnn, resnet18, …)")
    init: Literal["same", "independent"] = Field("same", description="same initial model for all, or one "
                                                                     "per participant")
    vectorize: Literal["auto", "vmap", "loop"] = Field(
        "auto", description="vmap over participants or a Python loop over them (same numbers to float "
                            "rounding); auto is vmap: 3-8x faster than the loop here for the MLP and the CNN "
                            "on 8x8 inputs, within 10% either way for the CNN on 28x28")
    conv: Literal["auto", "native", "unfold"] = Field(
        "auto", description="how stacked participants' 2-D convolutions compute: native (one grouped convolution "
                            "under vmap), unfold (im2col and one batched matrix product: 1.4-2x faster on an H200, "
                            "slower on CPUs), auto (unfold on CUDA devices)")
    import_module: str | None = Field(None, description="module to import first (registers custom models)")
    loss: Annotated[str, _one_of("loss", loss_names)] = Field(
        "cross-entropy", description="the per-sample loss every participant minimizes and influence is measured "
                                     "on: cross-entropy, mse, or one added with register_loss")


class OptimConfig(_Section):
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


class EngineConfig(_Section):
    """Placement on Ray: how many participant-group actors, and their CPUs/GPUs."""

    actors: int | None = Field(None, ge=1, description="participant-group actors (default: one per CPU, "
                                                       "or per GPU share); capped at the node count")
    cpus_per_actor: float | None = Field(None, gt=0, description="CPUs reserved per actor (default: the "
                                                                 "cluster's CPUs / actors)")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor; fractions share a GPU")
    gpus_per_task: float | None = Field(
        None, ge=0, le=1, description=f"GPU share of each DICE-GT replay and retraining task, on CUDA when > 0 "
                                      f"(default: {TASK_GPU_SHARE} when gpus_per_actor > 0, else 0: on the CPU)")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="float32 mode of the local step: fp32 (IEEE, TF32 off: a GPU run equals the CPU run to "
                            "float32 rounding), tf32 (CUDA TF32 matmuls and convolutions), bf16 (autocast forward "
                            "and backward; not with DICE, the ledger or proximal influence)")
    cuda_graphs: bool = Field(True, description="on a GPU, replay each local step from one CUDA graph (one launch "
                                                "per round instead of one per kernel; the same numbers)")
    transport: Literal["auto", "object_store", "cuda_ipc"] = Field(
        "auto", description="how half-steps travel between participant-group actors: auto (CUDA IPC between actors "
                            "sharing a GPU, the object store otherwise), object_store (always; from a GPU a host round "
                            "trip per round), cuda_ipc (every pair of actors must share a GPU, else an error at start)")
    address: str | None = Field(None, description="Ray cluster address (default: a local Ray on 127.0.0.1)")
    max_recoveries: int = Field(3, ge=0, le=1000, description="actor or machine failures a run recovers from "
                                                             "(restore the last checkpoint, replay) before it gives up")
    restart_timeout: float = Field(600.0, gt=0, description="seconds to wait for restarted actors after a failure")

    def task_gpus(self) -> float:
        """GPUs each DICE-GT replay and retraining task asks Ray for: ``gpus_per_task``, by default
        ``TASK_GPU_SHARE`` when the run's actors use GPUs and 0 (CPU tasks) when they do not."""
        if self.gpus_per_task is not None:
            return self.gpus_per_task
        return TASK_GPU_SHARE if self.gpus_per_actor > 0 else 0.0


class OutputConfig(_Section):
    """Where results go and how often participants are evaluated."""

    out: str | None = Field(None, description="run directory (default runs/<time>-<topology>-n<N>)")
    eval_every: int = Field(5, ge=1, description="evaluate every k rounds (and after the last)")
    overwrite: bool = Field(False, description="replace an existing run directory")
    checkpoint_every: int = Field(50, ge=0, description="save the simulation state every k rounds (0: never); "
                                                        "--resume and failure recovery continue from the last one")
    keep_checkpoints: bool = Field(False, description="keep the run's checkpoints/ after it completes")
    progress: bool = Field(True, description="show a progress bar")
    log: list[Literal["tensorboard", "mlflow"]] = Field([], description="experiment trackers that also get the "
                                                        "per-round metrics (comma-separated; docs: how-to/tracking)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                                                       "sqlite:///<run directory>/mlflow.db)")

    @field_validator("log", mode="before")
    @classmethod
    def _split_log(cls, value: Any) -> Any:
        return comma_list(value)


class InfluenceConfig(_Section):
    """Which probes (source j, round t, z) to measure, and how (concepts §2–§4). Off unless ``enabled``."""

    enabled: bool = Field(False, description="measure DICE-GT and DICE-E for the probes below")
    hops: int = Field(3, ge=1, le=64, description="R: steps of the cascade measured after each probe round")
    rounds: list[int] | None = Field(None, description="probe rounds t (default: the last `last` rounds that "
                                                       "leave room for R hops)")
    every: int | None = Field(None, ge=1, description="probe every k-th round instead of a list")
    last: int = Field(10, ge=1, description="number of probe rounds when neither rounds nor every is given")
    sources: list[int] | None = Field(None, description="probed participants j (default: all)")
    sample_sources: int | None = Field(None, ge=1, description="probe this many random participants per round")
    probe_samples: int = Field(0, ge=0, description="0: z is the whole minibatch (the paper's default); K: also "
                                                    "K single samples of it, one probe each")
    zprime: Literal["heldout", "validation"] = Field("heldout", description="z′: the shared held-out batch, or "
                                                                           "each target's own validation split")
    variants: VariantList = Field(
        ["first-order", "curvature"], description="DICE-E variants to compute, comma-separated (second-order: exact "
                                                  "to second order in Δ; about 3x the curvature variant's estimator "
                                                  "time at a 16-image z′, 6-7x at 360 images)")
    second_order_b: bool = Field(True, description=SECOND_ORDER_B)
    ground_truth: bool = Field(True, description="also measure DICE-GT by counterfactual replay")
    sources_per_task: int = Field(4, ge=1, description="probes of one round batched into one Ray task")
    online: bool = Field(False, description="compute DICE-E inside the round loop, in the participant groups, "
                                            "instead of on windows replayed after training (DICE-GT is still "
                                            "replayed when ground_truth is on)")


class MisbehaviorConfig(_Section):
    """Participants that misbehave, and how (concepts §5). Off with kind ``none``."""

    kind: Literal["none", "label-flip", "feature-noise", "sign-flip", "scale", "free-ride"] = Field(
        "none", description="how misbehaving participants corrupt their data or updates")
    count: int | None = Field(None, ge=0, description="how many participants misbehave")
    fraction: float | None = Field(None, ge=0, le=1, description="or which share of them (rounded)")
    selection: Literal["random", "ids", "degree"] = Field("random", description="random, the given ids, or "
                                                                                 "the highest in-degree first")
    ids: list[int] | None = Field(None, description="participants that misbehave (selection ids)")
    flip_fraction: float = Field(1.0, ge=0, le=1, description="label-flip: share of local labels flipped")
    sigma: float = Field(1.0, ge=0, le=1e3, description="feature-noise: std of the noise added to inputs")
    factor: float = Field(10.0, ge=-1e3, le=1e3, description="scale: the factor c of the sent update θ + cΔ")

    def number(self, nodes: int) -> int:
        """How many of ``nodes`` participants misbehave."""
        if self.kind == "none":
            return 0
        if self.selection == "ids":
            return len(set(self.ids or []))
        if self.fraction is not None:
            return int(round(self.fraction * nodes))
        return self.count or 0


class ProximalConfig(_Section):
    """Online proximal influence (concepts §5): every examiner k scores each in-neighbour l. Off unless ``enabled``."""

    enabled: bool = Field(False, description="score every in-neighbour by proximal influence "
                                             "p_{k←l} = q_k W_kl ∇L(θ_k^{t+1}; z′_k)ᵀ Δ_l (proximal.parquet)")
    every: int = Field(1, ge=1, description="score on every k-th round (rounds t with t % every == 0)")
    zprime: Literal["validation", "heldout"] = Field("validation", description="z′_k: the examiner's own "
                                                                              "validation split, or the "
                                                                              "shared held-out batch")
    window: int = Field(10, ge=1, description="scoring rounds summed in the windowed score")


class LedgerConfig(_Section):
    """Online contribution ledger (issue 7, ``contributions.py``): DICE-E of every participant's update on every
    participant within R hops (first-order by default). Off unless ``enabled``."""

    enabled: bool = Field(False, description="keep the ledger L[j→k] during training (contributions.parquet, "
                                             "shares.parquet)")
    every: int = Field(1, ge=1, description="probe the updates of every k-th round (t % every == 0)")
    hops: int = Field(3, ge=1, le=64, description="R: hops of each update's cascade counted")
    zprime: Literal["heldout", "validation"] = Field("heldout", description="z′: the shared held-out batch, or "
                                                                           "each target's own validation split")
    loo: bool = Field(False, description="after training, retrain once without each participant's data "
                                         "(Ray tasks; loo.parquet)")
    shapley_permutations: int = Field(0, ge=0, le=10_000, description="Monte-Carlo Shapley over participants "
                                                                      "with this many permutations (0: off)")
    variants: VariantList = Field(["first-order"], description="DICE-E variants the ledger sums (comma-separated): "
                                    "first-order (J = I, one z′ gradient per round), curvature (the local steps' "
                                    "Jacobians: a forward-mode pass per source and participant reached), "
                                    "second-order (also b and the z′ Hessian term: about 3x curvature)")
    second_order_b: bool = Field(True, description=SECOND_ORDER_B)
    rank_by: Variant | None = Field(None, description="the variant whose totals give shares, harmful flags and "
                                                      "ranks (default: the first of variants)")

    @property
    def ranking(self) -> str:
        """The variant whose totals rank the participants: ``rank_by``, else the first of ``variants``."""
        return self.rank_by or self.variants[0]


class RewiringConfig(_Section):
    """Collaborator selection (concepts §5): every K rounds each participant keeps m in-neighbours. Off with none."""

    mode: Literal["none", "influence", "outlier", "random"] = Field(
        "none", description="none: static W; influence: keep the m candidates with the lowest (most helpful) "
                            "cumulative proximal influence; outlier: drop only in-neighbours whose cumulative "
                            "influence is a harmful outlier among one's in-neighbours and fill their places from "
                            "the candidates; random: keep m random candidates")
    every: int = Field(10, ge=1, description="K: rewire before rounds K, 2K, ...")
    keep: int = Field(4, ge=1, description="m: in-neighbours each participant keeps")
    candidates: int = Field(4, ge=0, description="random non-neighbours added to each participant's "
                                                 "candidate pool (besides its current in-neighbours)")
    seed: int | None = Field(None, ge=0, lt=2**32, description="seed of the random candidates and of random "
                                                               "rewiring (default: the run's seed)")
    outlier_z: float = Field(3.0, gt=0, le=100, description="outlier mode: an in-neighbour is dropped when its "
                                                            "cumulative influence is positive and exceeds the "
                                                            "median of one's in-neighbours by this many robust "
                                                            "standard deviations (1.4826 MAD)")


# Fields a resumed run may change: where and how it runs, never what it computes.
RESUME_FIELDS = ("engine.address", "engine.actors", "engine.cpus_per_actor", "engine.gpus_per_actor",
                 "engine.transport", "output.progress", "output.keep_checkpoints", "output.checkpoint_every")


def import_modules(names: list[str]) -> None:
    """Import ``names`` (modules that register models, data sets, losses or methods); raise ``InputError``."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise _FieldError(("imports",), f"module {name!r} cannot be imported: {err}") from None


def load_imports(config: RunConfig) -> None:
    """Import the modules a run config names (``imports``, ``model.import_module``): in the driver before the run,
    and in every Ray worker that builds participants or replays them."""
    import_modules(modules_named(config))


class RunConfig(_Section):
    """A whole simulation: one of these fully determines a run's numbers (with its seed)."""

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
        """Import ``imports`` (and ``model.import_module``) before the fields are checked: they register names. Not
        for a recorded config (``read_recorded``): reading a run imports nothing it names."""
        if isinstance(data, dict) and not _RECORDED.get():
            names = data.get("imports") or []
            model = data.get("model")
            module = model.get("import_module") if isinstance(model, dict) else getattr(model, "import_module", None)
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                import_modules([*names, *([module] if isinstance(module, str) and module else [])])
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.topology.name == "file" and not self.topology.file:
            raise ValueError("topology 'file' needs topology.file (--topology-file PATH)")
        bad = self.misbehavior
        if bad.kind != "none":
            if bad.selection == "ids" and not bad.ids:
                raise ValueError("misbehavior.selection 'ids' needs misbehavior.ids")
            for k in bad.ids or []:
                if not 0 <= k < self.nodes:
                    raise ValueError(f"misbehaving participant {k} is not a participant (0..{self.nodes - 1})")
            if bad.number(self.nodes) > self.nodes:
                raise ValueError(f"misbehavior.count {bad.count} exceeds the {self.nodes} participants")
        inf = self.influence
        if inf.online and not inf.enabled:
            raise ValueError("influence.online computes DICE-E of the influence probes: turn them on too "
                             "(--influence, influence.enabled)")
        if inf.enabled:
            for t in inf.rounds or []:
                if not 0 <= t <= self.rounds - 1 - inf.hops:
                    raise ValueError(f"influence probe round {t} needs rounds {t}..{t + inf.hops} but the run has "
                                     f"rounds 0..{self.rounds - 1}")
            if self.rounds <= inf.hops:
                raise ValueError(f"influence hops {inf.hops} need more than {inf.hops} rounds, got {self.rounds}")
            for j in inf.sources or []:
                if not 0 <= j < self.nodes:
                    raise ValueError(f"influence source {j} is not a participant (0..{self.nodes - 1})")
            if inf.zprime == "validation" and self.data.val_fraction == 0:
                raise ValueError("influence.zprime 'validation' needs validation splits (data.val_fraction > 0)")
            if inf.probe_samples > self.optim.batch_size - 1:
                raise ValueError(f"probe_samples {inf.probe_samples} must be below the batch size "
                                 f"{self.optim.batch_size}")
        self._check_proximal()
        self._check_ledger()
        if self.engine.precision == "bf16":
            using = [name for name, on in (("influence", inf.enabled), ("ledger", self.ledger.enabled or self.ledger.loo
                     or self.ledger.shapley_permutations), ("proximal", self.proximal.enabled)) if on]
            if using:
                raise ValueError(f"engine.precision 'bf16' cannot measure {', '.join(using)}: their values are ~1e-3 "
                                 "of the losses, below bfloat16's resolution (2^-8); use fp32 or tf32")
        return self

    def _check_ledger(self) -> None:
        for k in self.data.shrink.ids:
            if not 0 <= k < self.nodes:
                raise ValueError(f"data.shrink participant {k} is not a participant (0..{self.nodes - 1})")
        led = self.ledger
        if led.rank_by is not None and led.rank_by not in led.variants:
            raise ValueError(f"ledger.rank_by {led.rank_by!r} is not one of ledger.variants "
                             f"({', '.join(led.variants)})")
        if not (led.enabled or led.loo or led.shapley_permutations):
            return
        if led.zprime == "validation" and self.data.val_fraction == 0:
            raise ValueError("ledger.zprime 'validation' needs validation splits (data.val_fraction > 0)")
        if self.rewiring.mode != "none":
            raise ValueError("rewiring changes W during the run; the contribution ledger needs the static "
                             "topology's path weights: use one or the other")

    def _check_proximal(self) -> None:
        prox, rew = self.proximal, self.rewiring
        if prox.enabled and prox.zprime == "validation" and self.data.val_fraction == 0:
            raise ValueError("proximal.zprime 'validation' needs validation splits (data.val_fraction > 0)")
        if rew.mode == "none":
            return
        if rew.mode in ("influence", "outlier") and not prox.enabled:
            raise ValueError(f"rewiring.mode {rew.mode!r} needs proximal influence (proximal.enabled, --proximal)")
        if rew.keep > self.nodes - 1:
            raise ValueError(f"rewiring.keep {rew.keep} exceeds the {self.nodes - 1} other participants")
        if self.topology.name in ("one-peer-exponential", "random-matching"):
            raise ValueError(f"rewiring needs a static topology, got time-varying {self.topology.name!r}")
        if self.influence.enabled:
            raise ValueError("rewiring changes W during the run; DICE influence (--influence) replays the "
                             "static topology: use one or the other")


class _FieldError(InputError):
    """A section's one-line error, with where it happened (so an enclosing section can prefix its own field)."""

    def __init__(self, loc: tuple, message: str, extra: bool = False):
        self.loc, self.message, self.extra = loc, message, extra
        where = ".".join(str(p) for p in loc) or "config"
        super().__init__(f"config: unknown key {where!r}" if extra else f"config: {where}: {message}")


def _one_line(err: ValidationError) -> _FieldError:
    """Return the first problem of a pydantic error as 'config: field.path: message (got value)'."""
    first = err.errors()[0]
    inner = first.get("ctx", {}).get("error")
    if isinstance(inner, _FieldError):  # a nested section built by its own __init__ reported it
        return _FieldError(tuple(first["loc"]) + inner.loc, inner.message, inner.extra)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return _FieldError(tuple(first["loc"]), msg, extra=True)
    got = first.get("input")
    suffix = "" if isinstance(got, dict) or got is None or repr(got) in msg else f" (got {got!r})"
    return _FieldError(tuple(first["loc"]), f"{msg}{suffix}")


def read_recorded(data: Any, where: str) -> RunConfig:
    """Return the ``RunConfig`` recorded in a run directory, checkpoint or sweep directory (``where`` names it),
    validated without importing anything it names: a directory received from someone else can be read, analyzed and
    reported on without running its code. Names that its modules would register (data sets, losses) are taken as
    recorded. Only ``run`` and ``resume`` import them (``modules_named``)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: the recorded config is not a mapping of sections")
    token = _RECORDED.set(True)
    try:
        return RunConfig.model_validate(data)
    except InputError as err:
        raise InputError(f"{where}: {err}") from None
    finally:
        _RECORDED.reset(token)


def modules_named(config: RunConfig) -> list[str]:
    """The modules running ``config`` imports (``imports``, then ``model.import_module``): code that runs in this
    process and in every Ray worker."""
    return [*config.imports, *([config.model.import_module] if config.model.import_module else [])]


def rerun_config(data: Any, where: str, allow_imports: bool) -> RunConfig:
    """Return the recorded config of a run directory that is about to compute again (a resume, a retraining), built
    as ``build_config`` builds a new one, importing its modules, but only with ``allow_imports``: otherwise one
    ``InputError`` naming the modules, before anything is imported."""
    named = modules_named(read_recorded(data, where))
    if named and not allow_imports:
        raise InputError(f"{where}: its config imports {', '.join(named)}, code that would run in this process and in "
                         "every Ray worker; continue only a run you trust, with --allow-imports (allow_imports=True)")
    return build_config(data)


def build_config(data: dict[str, Any] | None = None) -> RunConfig:
    """Return the validated ``RunConfig`` for a nested dict (as read from YAML); raise ``InputError``."""
    if data is not None and not isinstance(data, dict):
        raise InputError(f"config: expected a mapping of sections, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as err:
        raise _one_line(err) from None


def read_yaml(path: str | Path, kind: str = "config file") -> Any:
    """Return the parsed contents of the YAML file ``path`` (None if empty); raise ``InputError`` naming it as
    ``kind`` if it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"{kind} {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None


def bundled_config(name: str) -> Path:
    """Return the path of the bundled run config ``name`` (``"anomaly-proximal"`` or ``"anomaly-proximal.yaml"``),
    whatever the working directory: the repository's ``configs/`` beside the installed package (a checkout or an
    editable install), so a notebook opened in ``docs/`` finds it as one run from the repository root does.
    Raise ``InputError`` naming the bundled configs if there is no such file."""
    stem = Path(name).name.removesuffix(".yaml")
    folder = Path(__file__).resolve().parents[1] / "configs"
    path = folder / f"{stem}.yaml"
    if not path.is_file():
        have = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or f"none: no {folder}"
        raise InputError(f"no bundled config {name!r} (bundled: {have})")
    return path


def load_config(path: str | Path) -> dict[str, Any]:
    """Return the nested dict of a YAML config file (not yet validated); raise ``InputError``."""
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def apply_sets(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides ``KEY=VALUE`` (dotted key, YAML value) to ``data`` in place; return it."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'``, creating sections as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise InputError(f"config: {key!r} must be a section (mapping), got {child!r}")
        node = child
    node[leaf] = value
