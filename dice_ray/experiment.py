"""Everything a run needs before its first round, resolved and validated from a ``RunConfig``.

``prepare(config)`` loads the data set, partitions it, draws the held-out batch z′, builds the topology
and checks every participant can fill a minibatch — all before any Ray actor starts or any file is
written, so bad input fails fast with one ``InputError`` line.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dice_ray.config import RunConfig, load_imports
from dice_ray.core.misbehavior import misbehaving_participants, misbehavior, update_factors
from dice_ray.core.models import build_model
from dice_ray.core.topology import Topology, make_topology
from dice_ray.data import (
    Dataset,
    Partition,
    check_partition,
    heldout_batch,
    load_dataset,
    participant_weights,
    partition_data,
    shrink_partition,
)
from dice_ray.errors import InputError, first_line


@dataclass(frozen=True)
class Experiment:
    """A validated run: config, data, partition, z′, participant weights q and topology W^t."""

    config: RunConfig
    dataset: Dataset
    partition: Partition
    heldout: tuple[np.ndarray, np.ndarray]  # z′: x [m, *input_shape] float32, y [m] int64 (float32: regression)
    q: np.ndarray  # participant weights q_k, float64 [N]
    topology: Topology
    param_count: int
    # Names of the model's tensors in a participant's state row, in order: the trained parameters, then the step's
    # constants, frozen parameters and buffers (``population.state_tensors``); a resume must find the same layout.
    state_layout: dict[str, list[str]]
    state_width: int  # D, the numbers in a participant's state row
    misbehaving: np.ndarray  # sorted ids of misbehaving participants (concepts §5)

    @property
    def nodes(self) -> int:
        """N, the number of participants."""
        return self.config.nodes


def check_outputs(config: RunConfig, model: Any, dataset: Dataset) -> None:
    """Refuse, before any work, a model that does not fit the data set's inputs, whose outputs for N samples are not
    [N, num_classes] (the data set's classes, or a regression's output width), or whose outputs the loss cannot
    read (its per-sample losses not [N]): a run would otherwise fail inside its first step, or train silently on
    outputs no class reads. Then what the methods ask of the loss (``check_loss``)."""
    import torch

    from dice_ray.core.losses import build_loss

    name, width, n = config.model.name, dataset.num_classes, min(2, len(dataset.x_test))
    x, y = torch.from_numpy(dataset.x_test[:n]), torch.from_numpy(dataset.y_test[:n])
    try:
        outputs = model.eval()(x)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        raise InputError(f"model {name!r} does not fit {config.data.dataset} inputs of shape "
                         f"{dataset.input_shape}: {first_line(err)}") from None
    if not isinstance(outputs, torch.Tensor):
        raise InputError(f"model {name!r} returns a {type(outputs).__name__}, not a tensor: a run needs its outputs "
                         f"as one tensor [N, {width}] (one output per class, or per regression target)")
    if tuple(outputs.shape) != (n, width):
        raise InputError(f"model {name!r} returns outputs of shape {list(outputs.shape)} for {n} samples of "
                         f"{config.data.dataset}; a run needs [{n}, {width}] (one output per class, or per "
                         "regression target)")
    loss = build_loss(config.model.loss)
    try:
        losses = loss.per_sample(outputs, y)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        hint = ""
        if y.is_floating_point():
            hint = (" (its targets are floating-point, which dice-ray reads as regression targets: give integer "
                    "class labels for classification, or a regression loss such as mse)")
        elif config.model.loss == "mse":
            hint = (" (its targets are integers, which dice-ray reads as class labels, one output each: give "
                    "floating-point targets for regression)")
        raise InputError(f"loss {config.model.loss!r} cannot read model {name!r}'s outputs on "
                         f"{config.data.dataset}: {first_line(err)}{hint}") from None
    if tuple(getattr(losses, "shape", ())) != (n,):
        got = list(getattr(losses, "shape", []))
        raise InputError(f"loss {config.model.loss!r} returns {got} for {n} samples; per_sample must return one "
                         f"loss per sample, [{n}]")
    check_loss(config, loss, outputs.detach(), y)


def check_loss(config: RunConfig, loss: Any, outputs: Any, y: Any) -> None:
    """Refuse, before any work, a loss that the run's methods cannot compute with: one without a gradient in the
    model's outputs (every local step takes it); one that fails in float64 (DICE-GT and the exact readouts, DICE-E's
    and proximal influence's, evaluate losses in float64); one that forward mode cannot differentiate (curvature
    DICE-E takes forward-over-reverse derivatives through it, second order and the exact readout one more)."""
    import torch
    from torch.func import grad, jvp

    name = config.model.loss
    grown = outputs.clone().requires_grad_()
    if not loss.per_sample(grown, y).requires_grad:
        raise InputError(f"loss {name!r} has no gradient in the model's outputs (computed outside torch, or "
                         "detached): write it from differentiable torch operations")
    variants = _estimate_variants(config)
    if config.influence.enabled or "exact-readout" in variants or (config.proximal.enabled and
                                                                    config.proximal.readout == "exact"):
        try:
            loss.per_sample(outputs.double(), y.double() if y.is_floating_point() else y)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise InputError(f"loss {name!r} fails on float64 outputs, in which DICE-GT and the exact readouts "
                             f"evaluate losses (build its constants in the outputs' dtype): "
                             f"{first_line(err)}") from None
    orders = _forward_orders(config)
    if not orders:
        return

    def gradient(o: torch.Tensor) -> torch.Tensor:
        return grad(lambda v: loss.per_sample(v, y).sum())(o)

    def along(o: torch.Tensor) -> torch.Tensor:
        return jvp(gradient, (o,), (torch.ones_like(o),))[1]

    try:
        jvp(along, (outputs,), (torch.ones_like(outputs),)) if orders == 2 else along(outputs)
    except (RuntimeError, NotImplementedError) as err:
        raise InputError(f"loss {name!r}: forward mode cannot differentiate it, which DICE-E's {_needing(orders)} "
                         f"(write it from operations torch.func.jvp supports): {first_line(err)}") from None


def _estimate_variants(config: RunConfig) -> set[str]:
    """The DICE-E variants the run computes: in-loop or after training (``influence``), and the ledger's."""
    influence, ledger = config.influence, config.ledger
    return {*(influence.variants if influence.enabled else ()), *(ledger.variants if ledger.enabled else ())}


def _forward_orders(config: RunConfig) -> int:
    """How many orders of forward-mode derivative the run's DICE-E variants take through the local step and the loss:
    2 (second order, the exact readout), 1 (curvature) or 0 (first order, or no DICE-E)."""
    variants = _estimate_variants(config)
    return 2 if variants & {"second-order", "exact-readout"} else 1 if "curvature" in variants else 0


def _needing(orders: int) -> str:
    """Which DICE-E variants need ``orders`` orders of forward-mode derivative, as a message says it."""
    return "second-order and exact-readout variants need" if orders == 2 else "curvature variant needs"


def differentiates_the_step(config: RunConfig) -> bool:
    """Whether the run's methods differentiate or replay the local step: DICE (its replays, and DICE-E's variants but
    the first order) and the ledger's variants but the first order (``Population.functional_state_step``)."""
    ledger = config.ledger
    return config.influence.enabled or (ledger.enabled and any(v != "first-order" for v in ledger.variants))


def _called(called: set[str], name: str, *_: Any) -> None:
    """A forward pre-hook that notes layer ``name`` was called."""
    called.add(name)


def _same(a: Any, b: Any) -> bool:
    """Whether two tensors hold the same values, NaN equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all())


def check_model(config: RunConfig, model: Any, dataset: Dataset) -> None:
    """Refuse, before any work, a model whose local step is not a function of a participant's state and minibatch,
    as every run and DICE-GT's replays need: parameters or buffers wider than float32 (participants' states are
    stacked in one float32 tensor), random operations such as dropout (a replay would draw others), and buffers its
    forward pass writes other than BatchNorm's running statistics (an integer buffer is in no participant's state: all
    participants stacked in one module would share it, and a checkpoint would lose it; a floating-point one is, but
    DICE differentiates and replays the step as a pure function, which must not write it, and moves BatchNorm's
    statistics where the layer is called)."""

    import torch
    from torch import nn

    from dice_ray.core.population import tracked_normalization

    name = config.model.name
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        wide = [(n, t.dtype) for n, t in tensors if t.is_floating_point() and torch.finfo(t.dtype).bits > 32]
        if wide:
            raise InputError(f"model {name!r}: {kind} {wide[0][0]!r} is {wide[0][1]}, and participants' states are "
                             "stacked in float32: build the model in float32 (engine.precision chooses faster "
                             "arithmetic)")
    random = [n for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if random:
        raise InputError(f"model {name!r}: layer {random[0]!r} is dropout, random in every training step; a local step "
                         "must be a function of the participant's state and minibatch alone (DICE-GT replays it): "
                         "remove it or set p=0")
    layers = [n for n, _ in tracked_normalization(model)]
    tracked = {f"{n}.{b}" for n in layers for b in ("running_mean", "running_var", "num_batches_tracked")}
    pure = differentiates_the_step(config)
    x = torch.from_numpy(dataset.x_train[:4])
    trial = model.train()  # the model ``prepare`` built for its checks: its tensors are put back after each pass
    outputs = []
    tensors = [*trial.named_parameters(), *trial.named_buffers()]
    saved = {n: t.detach().clone() for n, t in tensors}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for seed in (0, 1):  # a training forward pass, from two random states
            for n, t in tensors:
                t.copy_(saved[n])
            called: set[str] = set()
            hooks = [trial.get_submodule(n).register_forward_pre_hook(functools.partial(_called, called, n))
                     for n in layers]
            torch.manual_seed(seed)
            try:
                outputs.append(trial(x))
            except Exception:  # noqa: BLE001 - e.g. BatchNorm over too few values: check_step will say
                return
            finally:
                for hook in hooks:
                    hook.remove()
            moved = [n for n, b in trial.named_buffers() if not _same(b, saved[n])]
            written = [n for n in moved if n not in tracked]
            if written and not trial.get_buffer(written[0]).is_floating_point():
                raise InputError(f"model {name!r}: its forward pass writes buffer {written[0]!r}, which is not a "
                                 "floating-point tensor and so in no participant's state (all participants stacked "
                                 "in one module would share it, and a checkpoint would lose it)")
            if written and pure:
                raise InputError(f"model {name!r}: its forward pass writes buffer {written[0]!r} (not BatchNorm's "
                                 "running statistics), and DICE-E differentiates and DICE-GT replays the local step "
                                 "as a pure function")
            uncalled = [n for n in layers if n not in called and any(m.startswith(f"{n}.") for m in moved)]
            if uncalled and pure:
                raise InputError(f"model {name!r}: its forward pass moves BatchNorm layer {uncalled[0]!r}'s running "
                                 "statistics without calling the layer (F.batch_norm on its buffers, say), and DICE-E "
                                 "moves them as the layer's calls do: call the layer")
        for n, t in tensors:
            t.copy_(saved[n])
    if all(isinstance(o, torch.Tensor) for o in outputs) and not _same(*outputs):  # else: check_outputs says
        raise InputError(f"model {name!r}: its training forward pass is random (two random states gave other "
                         "outputs); a local step must be a function of the participant's state and minibatch alone "
                         "(DICE-GT replays it)")


def check_step(config: RunConfig, model: Any, dataset: Dataset) -> None:
    """Refuse, before any work, a model that cannot take dice-ray's local step with participants stacked (two
    participants with two training samples each, one with a batch of one, on the model ``prepare`` built for its
    checks; a batch of one failed in BatchNorm's training mode in round 0): an operation vmap
    has no rule for (spectral norm's, say) stopped the first round with a traceback. Where the run's DICE-E variants
    differentiate the step in forward mode (curvature once, second order and the exact readout twice), one such
    derivative of that step too: an operation forward mode has no rule for (the old ``torch.nn.utils.weight_norm``'s)
    stopped after training."""
    import torch

    from dice_ray.core.losses import build_loss
    from dice_ray.core.population import Population, initial_state
    from dice_ray.methods.dice.recursion import LocalSteps, Perturbation, local_step

    b = min(config.optim.batch_size, 2)
    x = torch.from_numpy(dataset.x_train[:2 * b]).reshape(2, b, *dataset.x_train.shape[1:])
    y = torch.from_numpy(dataset.y_train[:2 * b]).reshape(2, b, *dataset.y_train.shape[1:])
    pop = Population(model.train(), initial_state(model, np.arange(2), config.seed), config.optim.spec(),
                     vectorize=config.model.vectorize, loss=build_loss(config.model.loss))
    try:
        with torch.random.fork_rng(devices=[]):
            pop.half_step(x, y)
    except (RuntimeError, NotImplementedError, ValueError) as err:
        single = " on batches of one sample (optim.batch_size, --batch-size)" if b == 1 else ""
        raise InputError(f"model {config.model.name!r} cannot take the local step with participants stacked "
                         f"(vectorized by {pop.vectorize}){single}: {first_line(err)}") from None
    orders = _forward_orders(config)
    if not orders:
        return
    steps = LocalSteps(pop.model, pop.optimizer, pop.state, pop.opt_state, x, y, loss=pop.loss)
    tangent = torch.full_like(pop.state, 1e-3)
    try:
        with torch.random.fork_rng(devices=[]):
            local_step(steps, Perturbation(tangent, b=tangent if orders == 2 else None))
    except (RuntimeError, NotImplementedError) as err:
        raise InputError(f"model {config.model.name!r}: forward mode cannot differentiate its local step, which "
                         f"DICE-E's {_needing(orders)} (torch.func.jvp): {first_line(err)}") from None


def check_validation_splits(config: RunConfig, partition: Any) -> None:
    """Refuse, naming the first, a participant whose validation split is empty in a run whose DICE or ledger reads
    each participant's own z′ from it (its z′ loss would be a mean over no samples: NaN terms, and NaN totals for it
    and its in-neighbours, which zeroed every share). A participant with a single sample has none (it keeps it for
    training). Proximal influence may run, with a warning line: its detection report leaves such an examiner's pairs
    out, saying so."""
    readers = [name for name, reads in (
        ("influence.zprime", config.influence.enabled and config.influence.zprime == "validation"),
        ("ledger.zprime", config.ledger.active and config.ledger.zprime == "validation")) if reads]
    empty = [k for k, val in enumerate(partition.val) if len(val) == 0]
    if readers and empty:
        k = empty[0]
        raise InputError(f"participant {k} has no validation samples ({len(partition.train[k])} in all), and "
                         f"{readers[0]} 'validation' reads each participant's own: use {readers[0]} heldout, or give "
                         "every participant at least 2 samples (a larger data.alpha (--alpha), fewer nodes)")
    if empty and config.proximal.enabled and config.proximal.zprime == "validation":
        print(f"warning: {len(empty)} of {len(partition.val)} participants have no validation samples (participant "
              f"{empty[0]}: {len(partition.train[empty[0]])} in all): proximal influence cannot score their "
              "in-neighbours (proximal.zprime heldout, or more samples per participant)", file=sys.stderr)


def check_normalization(config: RunConfig, model: Any) -> None:
    """Refuse what DICE-E cannot estimate through a model that normalizes by batch statistics (BatchNorm): a single
    sample's probe (its removal changes the batch statistics every other sample's gradient reads, so its effect is no
    longer its own gradient), and running statistics without a momentum (their cumulative average needs a counter per
    participant, which the stacked state does not keep)."""
    from torch import nn

    from dice_ray.core.population import tracked_normalization

    name = config.model.name
    measures = config.influence.enabled or config.ledger.enabled or config.proximal.enabled
    other = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             and not isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if measures and other:
        raise InputError(f"model {name!r}: layer {other[0]!r} tracks running statistics, which DICE-E differentiates "
                         "for BatchNorm only: use track_running_stats=False there")
    layers = tracked_normalization(model)
    if not layers:
        return
    if config.influence.enabled and config.influence.probe_samples:
        raise InputError(f"influence.probe_samples (--probe-samples) {config.influence.probe_samples}: model "
                         f"{name!r} normalizes by batch statistics (BatchNorm), so removing one sample changes every "
                         "sample's gradient; probe whole minibatches (influence.probe_samples 0)")
    cumulative = [n for n, m in layers if m.momentum is None]
    if cumulative:
        raise InputError(f"model {name!r}: BatchNorm layer {cumulative[0]!r} has momentum=None (a cumulative average, "
                         "which needs a counter per participant that the stacked state does not keep): give it a "
                         "momentum")


def state_layout(model: Any) -> dict[str, list[str]]:
    """The names of ``model``'s tensors in a participant's state row, in order (``population.state_tensors``)."""
    from dice_ray.core.population import state_tensors

    trained, constants = state_tensors(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {"trained": list(trained), "frozen": [n for n in constants if n in frozen],
            "buffers": [n for n in constants if n not in frozen]}


def state_width(model: Any) -> int:
    """D: how many numbers a participant's state row holds (``population.model_state_layouts``)."""
    from dice_ray.core.population import model_state_layouts

    return sum(layout.width for layout in model_state_layouts(model))


def model_width(config: RunConfig, dataset: Any) -> int:
    """D of ``config``'s model for ``dataset``, counted on a copy built on PyTorch's meta device (shapes without
    memory: a label of 10^9 made a 256 GB output layer), or built here where a model cannot be built there."""
    import torch

    args = (config.model.name, dataset.input_shape, dataset.num_classes, config.seed)
    try:
        with torch.device("meta"):
            return state_width(build_model(*args))
    except Exception:  # a model of one's own that needs real tensors to build
        return state_width(build_model(*args))


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_graph_fits(config: RunConfig) -> None:
    """Refuse, before the topology is built, a mixing matrix W larger than this machine's memory (a complete graph of
    10^6 participants: 37 TiB, a MemoryError traceback after the run directory was written)."""
    n, name = config.nodes, config.topology.name
    if name not in ("complete", "erdos-renyi"):  # the other graphs store O(n log n) entries at most
        return
    p = 1.0 if name == "complete" else config.topology.p or min(1.0, 2 * math.log(n) / n)
    stored = p * n * n
    # Building W peaks at ~97 bytes per stored entry (tracemalloc, complete and Erdős–Rényi graphs); an Erdős–Rényi
    # draw of more than n²/50 cells is numpy's choice without replacement, which shuffles all n² cells (8 bytes each)
    shuffled = 8 * n * n if name == "erdos-renyi" and stored > n * n // 50 and n * n > 10_000 else 0
    _refuse_past_memory(100 * stored + shuffled, f"the {name} graph's mixing matrix W ({stored:,.0f} entries)")


def check_synthetic_fits(config: RunConfig) -> None:
    """Refuse, before it is drawn, a ``synthetic`` data set larger than this machine's memory: drawing it peaks at
    ~25-34 bytes per input number (tracemalloc; scikit-learn draws float64, then the split copies)."""
    d = config.data
    if d.dataset == "synthetic":
        numbers = d.synthetic_samples * math.prod(d.synthetic_shape)
        _refuse_past_memory(36 * numbers, f"the synthetic data set ({d.synthetic_samples:,} samples of shape "
                                          f"{list(d.synthetic_shape)})",
                            "fewer samples (data.synthetic_samples) or a smaller data.synthetic_shape")


def check_states_fit(config: RunConfig, width: int) -> None:
    """Refuse, before any work, stacked states of ``width`` (D) numbers per participant larger than this machine's
    memory (10^6 MLPs: 64 GiB; the run was killed or failed after its directory was written), where they all live on
    this machine: no Ray cluster to join (engine.address, RAY_ADDRESS). A run needs about 3 times its states at its
    peak (docs: results/scaling), so passing this is no promise."""
    if config.engine.address is None and not os.environ.get("RAY_ADDRESS"):
        n = config.nodes
        _refuse_past_memory(4 * n * width, f"the {n:,} participants' stacked states ({width:,} numbers each, float32)")


_FEWER = "fewer participants (nodes, --nodes), a smaller model or a sparser graph"


def _refuse_past_memory(need: float, what: str, remedy: str = _FEWER) -> None:
    memory = machine_memory()
    if memory is not None and need > memory:
        raise InputError(f"{what} would take {need / 2**30:,.1f} GiB, more than this machine's "
                         f"{memory / 2**30:,.1f} GiB: {remedy}")


def config_topology(config: RunConfig, file: str | Path | None = None) -> Topology:
    """The ``Topology`` of ``config`` (its ``topology`` section and seed); ``file``: the topology file to read instead
    of the one the config names (a run directory's copy, ``results.kept_topology_file``)."""
    topo = config.topology
    return make_topology(topo.name, config.nodes, weights=topo.weights, seed=config.seed, p=topo.p, rows=topo.rows,
                         path=file or topo.file, directed=topo.directed)


def prepare(config: RunConfig, topology_file: str | Path | None = None) -> Experiment:
    """Return the ``Experiment`` of ``config``; raise ``InputError`` on anything that would fail later.
    ``topology_file``: the run directory's copy of its topology file, read instead of the path the config names
    (a resume, a retraining)."""
    load_imports(config)
    d = config.data
    check_graph_fits(config)
    check_synthetic_fits(config)
    topology = config_topology(config, topology_file)
    dataset = load_dataset(d.dataset, data_dir=d.data_dir, download=d.download, seed=config.seed,
                           synthetic_samples=d.synthetic_samples, synthetic_classes=d.synthetic_classes,
                           synthetic_shape=d.synthetic_shape)
    check_states_fit(config, model_width(config, dataset))  # before building one: it may not fit alone
    model = build_model(config.model.name, dataset.input_shape, dataset.num_classes, config.seed)
    if config.nodes > len(dataset.y_train):
        raise InputError(f"nodes (--nodes) {config.nodes} exceeds the {len(dataset.y_train)} training samples "
                         f"of {d.dataset}")
    partition = partition_data(dataset.y_train, config.nodes, scheme=d.partition, alpha=d.alpha,
                               shards_per_node=d.shards_per_node, val_fraction=d.val_fraction,
                               seed=config.seed)
    if d.shrink.ids:
        partition = shrink_partition(partition, d.shrink.ids, d.shrink.fraction, seed=config.seed)
    check_partition(partition, config.optim.batch_size)
    check_validation_splits(config, partition)
    check_model(config, model, dataset)
    check_outputs(config, model, dataset)
    check_step(config, model, dataset)
    check_normalization(config, model)
    bad = config.misbehavior
    kind = misbehavior(bad)
    if kind is not None and kind.class_labels_use and not np.issubdtype(dataset.y_train.dtype, np.integer):
        raise InputError(f"misbehavior {bad.kind} {kind.class_labels_use}, and {d.dataset} has regression targets: "
                         "choose another kind, e.g. feature-noise")
    misbehaving = misbehaving_participants(bad.kind, config.nodes, bad.number(config.nodes), bad.selection, topology,
                                           config.seed, bad.ids)
    update_factors(kind, misbehaving)  # each c a finite number, checked before any work
    return Experiment(
        config=config,
        dataset=dataset,
        partition=partition,
        heldout=heldout_batch(dataset, d.heldout_size, seed=config.seed),
        q=participant_weights(partition, d.participant_weights),
        topology=topology,
        param_count=sum(p.numel() for p in model.parameters()),
        state_layout=state_layout(model),
        state_width=state_width(model),
        misbehaving=misbehaving,
    )
