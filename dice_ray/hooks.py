"""The round-hook interface: the one seam through which a method (proximal influence, the contribution ledger,
in-loop DICE-E, collaborator selection, a user's own) takes part in the rounds of Algorithm 1.

A method has up to two halves, bound together by a ``Method``:

- a ``RoundHook``, one instance per participant block, wherever the block lives (a Ray participant-group actor,
  or this process with the local engine). The engine calls it at fixed points of round t::

      before_local_step(t)            θ = θ^t, before the local step
      <local step>                    θ = θ^{t+½}
      after_local_step(t)
      message(t, local)               what the hook sends with the half-step (only on rounds ``sends(config)(t)``)
      <gossip>                        θ = θ^{t+1}
      after_gossip(t, inbox) -> record    with the messages of the blocks it reads; what it reports this round
      snapshot(t) / restore(arrays)   its part of a checkpoint

  Messages go where half-steps go — to the blocks whose rows of W^t read this block — unless the hook's
  ``router`` says otherwise (the ledger reads the blocks its sources reach within R hops). The engines route
  them by the hook's name; nothing is passed by position.

- a ``DriverHook``, one per run, in the driver: ``combine`` merges the blocks' records of a round, ``on_round``
  turns them into table rows and accumulates whatever the method keeps over rounds, ``finish`` returns the
  tables written at the end, ``state``/``load_state`` save that accumulation with every checkpoint (arrays
  only: a checkpoint never holds code). ``due(t)``/``before_round(t)``/``mixing()`` let a method change W^t
  between rounds (collaborator selection).

- ``Stage``s, the work a method does after training (DICE-GT replays, retraining runs without some participants):
  the runner runs them in method order once the engine is closed, through one task backend
  (``engine.tasks``: this process or Ray tasks, with one retry loop and progress); ``run`` returns the tables it
  writes (name -> columns), written atomically by the runner.

The engines and the runner know no method by name: they loop over the hooks and stages they are given. The numbers
of a hook do not depend on how participants are split over blocks: the engines' test checks it with 1 and 3 actors.

A new method is one module with its two classes and a ``Method``; see ``dice_ray/methods/`` and the docs'
"Add a method" guide.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

__all__ = [
    "Inbox",
    "Route",
    "Router",
    "Stage",
    "RoundHook",
    "DriverHook",
    "RowsDriver",
    "Method",
    "register_method",
    "registered_methods",
]

Record = Any  # what a hook reports for a round (typically name -> [E] arrays or tensors); None: nothing


@dataclass
class Inbox:
    """What a block's hook receives after gossip in round t.

    ``weights[b]`` [P, M_b]: this block's rows of W^t over mixing source block b, whose global ids are
    ``mixing_ids[b]``. ``messages[i]``: the message of the block with global ids ``ids[i]`` for this hook
    (the blocks the hook reads: the mixing sources, or those its ``router`` named); this block's own message
    is among them, as ``message(t, local=True)`` returned it (and so are those of blocks on the same GPU that arrive
    through CUDA IPC, their tensors copied; the others' as ``message(t, local=False)``, tensors as numpy arrays).
    ``info``: the router's note for this block (None without a router). Empty ``messages`` on rounds the hook sends
    nothing.
    """

    weights: list[sp.csr_array]
    mixing_ids: list[np.ndarray]
    ids: list[np.ndarray] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    info: Any = None


@dataclass(frozen=True)
class Route:
    """Which blocks' messages block g reads in a round (``sources``, ascending block indices, g among them if
    it reads its own) and a note for it (``info``, any picklable value)."""

    sources: list[int]
    info: Any = None


class Router:
    """Coordinator-side routing of a hook's messages (for hooks whose messages do not follow W^t).

    Built once per coordinator with the run config, the topology, the participant blocks (global ids per
    block, ascending) and ``mixing(t)`` (W^t, with any rewiring applied)."""

    def __init__(self, config: Any, topology: Any, blocks: list[np.ndarray], mixing: Callable[[int], Any]):
        self.config, self.topology, self.blocks, self.mixing = config, topology, blocks, mixing
        self.owner = np.empty(topology.n, np.int64)  # owner[l]: the block hosting participant l
        for g, block in enumerate(blocks):
            self.owner[block] = g

    def routes(self, t: int) -> list[Route]:
        """Return round t's ``Route`` of every block, in block order."""
        raise NotImplementedError


class RoundHook:
    """A method's part in one participant block (see the module docstring). Subclass and override what you need.

    ``block`` is the ``core.participants.ParticipantBlock`` (its ``nodes``, ``population``, ``minibatch(t)``, …);
    ``config`` the run's ``RunConfig``. A hook observes: it reads the participants' states and must not change what
    they train with, their states, optimizer states, optimizer settings, loss or data (a call, construction and
    ``snapshot``/``restore`` included, that changes one in place or replaces it raises ``ValueError``; a write
    through ``.data`` or a NumPy view is not seen), since DICE's replays and estimators, proximal influence, the
    ledger and the retraining reproduce the simulated world without it.
    """

    name: ClassVar[str] = "hook"
    router: ClassVar[type[Router] | None] = None  # None: messages follow W^t (like half-steps)

    def __init__(self, block: Any, config: Any):
        self.block, self.config = block, config

    @classmethod
    def sends(cls, config: Any) -> Callable[[int], bool]:
        """Return a predicate of round t: True iff the hook exchanges messages in round t (the engine then calls
        ``message`` and routes it). Built by the engine: once per coordinator (again after a recovery), or once by the
        local engine."""
        return lambda t: False

    def before_local_step(self, t: int) -> None:
        """Round t begins: θ = θ^t of the hosted participants."""

    def after_local_step(self, t: int) -> None:
        """The local step of round t is done: θ = θ^{t+½} (misbehaving participants' updates included)."""

    def message(self, t: int, local: bool) -> Any:
        """What this block sends with its half-step of round t: for the block itself (``local``: received as
        returned, live tensors included) or for other blocks (received with its tensors as numpy arrays, which
        travel through Ray's object store: a tensor, or a mapping's tensor values, on any device). Other blocks on
        the same GPU, reached through CUDA IPC (``engine.transport``), receive the ``local`` form instead, every
        tensor in it copied onto this block's device (through mappings, sequences, sets, dataclasses and objects'
        attributes): so ``after_gossip`` must take tensors and arrays alike, the ``local`` form must pickle, and
        received messages are read-only (the blocks on one GPU that read a message share one copy)."""
        return None

    def after_gossip(self, t: int, inbox: Inbox) -> Record:
        """Gossip of round t is done (θ = θ^{t+1}); return what the hook reports for round t (None: nothing). The
        driver receives tensors in it (a mapping's values) as numpy arrays, copied off the block's device."""
        return None

    def snapshot(self, t: int) -> dict[str, np.ndarray]:
        """Arrays with one row per hosted participant (keys ``<name>.…``) that a later round reads; part of the
        checkpoint after round t (tensors are saved as numpy arrays). Every hook's ``restore`` reads the whole
        checkpoint: a key the participants' state (``state``, ``opt.…``) or another hook saves is refused.

        What only some participants hold, or several of (DICE's perturbations: one per probe that reached a
        participant), can be saved as entries instead of rows: an integer array ``<group>.owner`` [E] names the
        participant (global id, ascending) owning each of E entries, and every other key ``<group>.…`` is then an
        array of those E entries along its first axis. A resume, with any number of actors, hands each block its
        participants' rows and the entries they own, in order."""
        return {}

    def restore(self, arrays: Mapping[str, np.ndarray] | None) -> None:
        """Set what ``snapshot`` saved from ``arrays`` (the block's rows of a checkpoint; None: the initial state)."""


class DriverHook:
    """A method's driver-side half: one per run (see the module docstring).

    ``experiment`` is the prepared run (config, data, partition, q, topology). ``tables``: the per-round tables
    this method writes (name -> schema), appended to and committed with every checkpoint.
    """

    name: ClassVar[str] = "hook"
    tables: ClassVar[dict[str, pa.Schema]] = {}

    def __init__(self, experiment: Any):
        self.experiment = experiment

    def setup(self, drivers: Mapping[str, DriverHook]) -> None:
        """Called once every method's driver exists (``drivers`` by name): e.g. to read another's state."""

    @staticmethod
    def combine(parts: list[Record]) -> Record:
        """Merge the blocks' records of one round (block order = global participant order). By default
        concatenates name -> array dicts; None if no block reported anything."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return {key: np.concatenate([np.asarray(p[key]) for p in parts]) for key in parts[0]}

    def on_round(self, t: int, record: Record) -> dict[str, Any]:
        """Take round t's combined record; return rows to append, per table of ``tables`` (name -> columns)."""
        return {}

    def due(self, t: int) -> bool:
        """True iff this method changes W before round t (the engine's rounds are split there)."""
        return False

    def before_round(self, t: int) -> sp.csr_array | None:
        """Called before a round t that is ``due``, once every earlier round's record is in: the W to use from
        round t on (None: keep the current one)."""
        return None

    def mixing(self) -> sp.csr_array | None:
        """The W this method imposes now (None: the topology's W^t); read after every restore."""
        return None

    def summary(self) -> dict[str, Any]:
        """Facts for the run's manifest after training (JSON values), e.g. rounds a method had to skip."""
        return {}

    def finish(self) -> dict[str, Any]:
        """After the last round: the tables written once (name -> columns), e.g. totals."""
        return {}

    def finish_schemas(self) -> dict[str, pa.Schema]:
        """Schemas of the tables ``finish`` returns."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """What this driver accumulated so far, as plain arrays (numbers, bools, strings; no objects)."""
        return {}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the accumulation from ``state()``'s arrays (empty: the initial state)."""


class RowsDriver(DriverHook):
    """A driver that writes each round's combined record as rows of one table (``tables`` names it): the
    default for a method that only reports, like a user's per-round measurement."""

    def on_round(self, t: int, record: Record) -> dict[str, Any]:
        if record is None:
            return {}
        [table] = self.tables
        return {table: record}


class Stage:
    """Work a method does after training (see the module docstring), for the run ``experiment`` whose directory is
    ``out`` (a stage may read the tables training wrote there). ``tables``: the tables ``run`` returns (name ->
    schema)."""

    name: ClassVar[str] = "stage"
    tables: ClassVar[dict[str, pa.Schema]] = {}

    def __init__(self, experiment: Any, out: Path):
        self.experiment, self.out = experiment, out

    def run(self, tasks: Any) -> dict[str, Any]:
        """Do the work through ``tasks`` (an ``engine.tasks.Tasks``: ``map`` a module-level function over jobs);
        return the rows of each table of ``tables`` (name -> columns or row dicts)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Method:
    """A method: its name, when a run uses it, its two round halves (either may be None) and its stages after
    training.

    ``enabled(config)`` says whether a run with ``config`` uses the method. Methods run in the order of the
    list an engine is given (the built-in ones: ``dice_ray.methods.catalog.METHODS``). ``options``: a user's
    method's own section of the run config (``register_method``), which its code reads as ``config.<name>``.
    """

    name: str
    enabled: Callable[[Any], bool]
    hook: type[RoundHook] | None = None
    driver: type[DriverHook] | None = None
    stages: tuple[type[Stage], ...] = ()
    options: type[Any] | None = None  # a ``sections.Section``: the run config's section ``name`` (a user's method)


_REGISTERED: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register a user's ``method``: every run whose config enables it uses it (after the built-in ones), and its
    ``options`` (a ``sections.Section`` subclass) become the run config's section named ``method.name``, set from
    YAML, ``--set`` or the flags ``--<name>-<field>`` that ``python -m dice_ray.simulate`` generates from its fields.
    Call it in a module the config names under ``imports`` (then Ray workers import it too). Returns ``method``.

    Registering a name again replaces the earlier method (a notebook cell run twice). Raises ``ValueError`` unless
    its hook and driver carry its name (``check_names``); a run refuses a name that is a built-in method's or a run
    config field, and a table another method writes (``methods.catalog.check_methods``)."""
    check_names(method)
    _REGISTERED[method.name] = method
    return method


def check_names(method: Method) -> None:
    """Raise ``ValueError`` unless ``method``'s hook and driver carry its name: the engine hands each driver the
    records of the hook of its name, in every process (a hook left at the default ``name`` reached no driver)."""
    for part in (method.hook, method.driver):
        if part is not None and part.name != method.name:
            raise ValueError(f"method {method.name!r}: its {part.__name__} is named {part.name!r}; set name = "
                             f"{method.name!r} on it (a method's hook and driver carry its name)")


def tables_of(method: Method) -> list[str]:
    """The names of the tables ``method`` writes: its driver's per-round ones and its stages'."""
    return [*(method.driver.tables if method.driver else {}), *(t for stage in method.stages for t in stage.tables)]


def registered_methods() -> list[Method]:
    """The methods registered with ``register_method``, in registration order."""
    return list(_REGISTERED.values())


def round_hooks(methods: list[Method]) -> list[type[RoundHook]]:
    """The participant-side hook classes of ``methods``, in order."""
    return [m.hook for m in methods if m.hook is not None]
