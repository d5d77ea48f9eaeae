"""Everything a run needs before its first round, resolved and validated from a ``RunConfig``.

``prepare(config)`` loads the data set, partitions it, draws the held-out batch z′, builds the topology
and checks every participant can fill a minibatch — all before any Ray actor starts or any file is
written, so bad input fails fast with one ``InputError`` line.
"""

from __future__ import annotations

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
from dice_ray.errors import InputError


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
    misbehaving: np.ndarray  # sorted ids of misbehaving participants (concepts §5)

    @property
    def nodes(self) -> int:
        """N, the number of participants."""
        return self.config.nodes


def check_outputs(config: RunConfig, model: Any, dataset: Dataset) -> None:
    """Refuse, before any work, a model that does not fit the data set's inputs, whose outputs for N samples are not
    [N, num_classes] (the data set's classes, or a regression's output width), or whose outputs the loss cannot
    read (its per-sample losses not [N]): a run would otherwise fail inside its first step, or train silently on
    outputs no class reads."""
    import torch

    from dice_ray.core.losses import build_loss

    name, width, n = config.model.name, dataset.num_classes, min(2, len(dataset.x_test))
    with torch.no_grad():
        try:
            outputs = model.eval()(torch.from_numpy(dataset.x_test[:n]))
        except RuntimeError as err:
            raise InputError(f"model {name!r} does not fit {config.data.dataset} inputs of shape "
                             f"{dataset.input_shape}: {str(err).splitlines()[0]}") from None
        shape = tuple(getattr(outputs, "shape", ()))
        if shape != (n, width):
            raise InputError(f"model {name!r} returns outputs of shape {list(shape)} for {n} samples of "
                             f"{config.data.dataset}; a run needs [{n}, {width}] (one output per class, or per "
                             "regression target)")
        try:
            losses = build_loss(config.model.loss).per_sample(outputs, torch.from_numpy(dataset.y_test[:n]))
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            raise InputError(f"loss {config.model.loss!r} cannot read model {name!r}'s outputs on "
                             f"{config.data.dataset}: {str(err).splitlines()[0]}") from None
        if tuple(getattr(losses, "shape", ())) != (n,):
            got = list(getattr(losses, "shape", []))
            raise InputError(f"loss {config.model.loss!r} returns {got} for {n} samples; per_sample must return one "
                             f"loss per sample, [{n}]")


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
        raise InputError(f"--probe-samples {config.influence.probe_samples}: model {name!r} normalizes by batch "
                         "statistics (BatchNorm), so removing one sample changes every sample's gradient; probe "
                         "whole minibatches (--probe-samples 0)")
    cumulative = [n for n, m in layers if m.momentum is None]
    if cumulative:
        raise InputError(f"model {name!r}: BatchNorm layer {cumulative[0]!r} has momentum=None (a cumulative average, "
                         "which needs a counter per participant that the stacked state does not keep): give it a "
                         "momentum")


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
    topology = config_topology(config, topology_file)
    dataset = load_dataset(d.dataset, data_dir=d.data_dir, download=d.download, seed=config.seed,
                           synthetic_samples=d.synthetic_samples, synthetic_classes=d.synthetic_classes)
    if config.nodes > len(dataset.y_train):
        raise InputError(f"--nodes {config.nodes} exceeds the {len(dataset.y_train)} training samples "
                         f"of {d.dataset}")
    partition = partition_data(dataset.y_train, config.nodes, scheme=d.partition, alpha=d.alpha,
                               shards_per_node=d.shards_per_node, val_fraction=d.val_fraction,
                               seed=config.seed)
    if d.shrink.ids:
        partition = shrink_partition(partition, d.shrink.ids, d.shrink.fraction, seed=config.seed)
    check_partition(partition, config.optim.batch_size)
    model = build_model(config.model.name, dataset.input_shape, dataset.num_classes)
    check_outputs(config, model, dataset)
    check_normalization(config, model)
    bad = config.misbehavior
    misbehaving = misbehaving_participants(bad.kind, config.nodes, bad.number(config.nodes), bad.selection, topology,
                                           config.seed, bad.ids)
    update_factors(misbehavior(bad), misbehaving)  # each c a finite number, checked before any work
    return Experiment(
        config=config,
        dataset=dataset,
        partition=partition,
        heldout=heldout_batch(dataset, d.heldout_size, seed=config.seed),
        q=participant_weights(partition, d.participant_weights),
        topology=topology,
        param_count=sum(p.numel() for p in model.parameters()),
        misbehaving=misbehaving,
    )
