"""A block of participants with their local data: what one Ray actor (or one process) hosts.

``ParticipantBlock`` binds a ``Population`` (stacked models) to the participants' local training sets,
validation splits and the shared held-out batch z′, and exposes the three steps of a round:
``half_step`` (local step on z_k^t), ``mix`` (gossip with rows of W^t) and ``evaluate``. It knows
nothing of Ray: the Ray actor and the single-process engine call the same methods, so they compute
the same numbers.

Everything the block holds lives on its device (``device``: the state, optimizer state, training data, validation
splits, z′, minibatch rows), and a round keeps it there: ``half_step`` updates the state in place and returns the
losses, ``mix`` takes torch tensors on the device. Numpy appears only where data leaves the block on purpose:
``snapshot``, ``evaluate``'s summaries, and what an engine publishes for other blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from dice_ray.core.cuda_graph import StepGraph
from dice_ray.core.losses import build_loss
from dice_ray.core.misbehavior import corrupt_data, misbehavior, update_factors
from dice_ray.core.models import build_model, use_layer_modes
from dice_ray.core.population import STEP_CHUNK_BYTES, Population, initial_state
from dice_ray.core.precision import set_precision
from dice_ray.core.tensors import as_tensor, csr_tensor
from dice_ray.data import minibatch_indices, minibatch_positions

if TYPE_CHECKING:
    from dice_ray.config import RunConfig
    from dice_ray.experiment import Experiment


def _padded(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices [P, m], mask [P, m]) padding index arrays of unequal lengths to the longest."""
    width = max((len(g) for g in groups), default=0)
    idx = np.zeros((len(groups), max(width, 1)), np.int64)
    mask = np.zeros_like(idx, dtype=bool)
    for i, g in enumerate(groups):
        idx[i, : len(g)] = g
        mask[i, : len(g)] = True
    return idx, mask


class ParticipantBlock:
    """Participants ``nodes`` (global ids) stepped together.

    Args:
        config: the run config (model, optimizer, batch size, seed).
        nodes: int64 [P] global participant ids hosted here.
        x_train, y_train: the whole training split (read in place; only the rows of these participants are copied, on
            a GPU or where they corrupt their data).
        train, val: per hosted participant, indices into x_train of its D_k and validation split.
        heldout: the shared held-out batch z′ (x [m, ...], y [m]).
        input_shape, num_classes: from the data set.
        misbehaving: global ids of misbehaving participants (``config.misbehavior`` says how).
    """

    def __init__(self, config: RunConfig, nodes: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
                 train: list[np.ndarray], val: list[np.ndarray], heldout: tuple[np.ndarray, np.ndarray],
                 input_shape: tuple[int, ...], num_classes: int, device: str = "cpu",
                 misbehaving: np.ndarray | None = None):
        self.config = config
        self.device = torch.device(device)
        self.nodes = np.asarray(nodes, np.int64)
        # The initial weights are drawn on the CPU model (the CPU's generator: a GPU run starts where a CPU run does),
        # then the model moves to the device.
        model = build_model(config.model.name, input_shape, num_classes, config.seed)
        state = initial_state(model, self.nodes, config.seed, config.model.init, device=self.device)
        model.to(self.device)
        use_layer_modes(model, config.model.conv, config.model.pool, self.device)
        set_precision(config.engine.precision)
        self.population = Population(model, state, config.optim.spec(), config.model.vectorize,
                                     build_loss(config.model.loss),
                                     precision=config.engine.precision)
        self._model = model

        # Local training sets, concatenated: participant i's samples are rows offsets[i]:offsets[i]+counts[i] of
        # ``sample_rows``, which index ``x_data``/``y_data``. Those are the whole training split itself (no copy: on a
        # Ray node it is the object store's) unless this block corrupts data or lives on a GPU: then a copy of its
        # own rows.
        self.counts = np.array([len(t) for t in train], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        rows = np.concatenate(train).astype(np.int64) if len(train) else np.zeros(0, np.int64)

        # Misbehaving participants hosted here (positions in this block): corrupt data now, updates per step.
        kind = misbehavior(config.misbehavior)
        hosted = np.isin(self.nodes, np.asarray(misbehaving if misbehaving is not None else [], np.int64))
        self.misbehaving = np.flatnonzero(hosted)
        corrupts = kind is not None and kind.corrupts_data and len(self.misbehaving) > 0
        # Participants without training data (data.shrink fraction 1) take no local step: ``half_step`` puts
        # their state back. They still draw a (discarded) minibatch, from a placeholder row if need be.
        self.idle = np.flatnonzero(self.counts == 0)
        if not len(rows):
            x_data, y_data = np.zeros((1, *input_shape), np.float32), np.zeros(1, y_train.dtype)
            rows = np.zeros(1, np.int64)
        elif self.device.type != "cpu" or corrupts:
            x_data, y_data = np.ascontiguousarray(x_train[rows]), np.ascontiguousarray(y_train[rows])
            rows = np.arange(len(rows))
        else:
            x_data, y_data = x_train, y_train
        if corrupts:
            for i in self.misbehaving[self.counts[self.misbehaving] > 0].tolist():  # (no data: nothing to corrupt)
                span = slice(self.offsets[i], self.offsets[i] + self.counts[i])
                x_data[span], y_data[span] = corrupt_data(kind, x_data[span], y_data[span], num_classes,
                                                          config.seed, int(self.nodes[i]))
        self.x_data, self.y_data = as_tensor(x_data, self.device), as_tensor(y_data, self.device)
        self.sample_rows = torch.from_numpy(rows).to(self.device)
        self._offsets = torch.from_numpy(self.offsets).to(self.device)
        self._idle = torch.as_tensor(self.idle, device=self.device)
        self._misbehaving = torch.as_tensor(self.misbehaving, device=self.device)
        # c [m, 1] of the hosted misbehaving participants' sent updates θ + cΔ (None: their updates are honest)
        factors = update_factors(kind, self.nodes[self.misbehaving])
        self.misbehaving_factors = None if factors is None else torch.as_tensor(
            factors[:, None], dtype=self.population.state.dtype, device=self.device)
        # The minibatch draw's inputs: on a GPU it runs there (``minibatch_positions``, the same numbers); checked
        # here once, as the host draw checks them every round.
        self._draw_counts = np.where(self.counts > 0, self.counts, config.optim.batch_size)
        minibatch_indices(config.seed, self.nodes, 0, self._draw_counts, config.optim.batch_size)
        self._draw_on_device = self.device.type != "cpu"
        if self._draw_on_device:
            self._draw_nodes = torch.from_numpy(self.nodes).to(self.device)
            self._draw_counts_t = torch.from_numpy(self._draw_counts).to(self.device)
        # On a GPU the local step is replayed from a CUDA graph (``StepGraph``): one launch per round.
        self._step_graph = (StepGraph(self._half_step, self.device)
                            if self.device.type == "cuda" and config.engine.cuda_graphs else None)

        # Validation splits padded to one [P, m] batch with a mask (sizes differ across participants).
        val_idx, val_mask = _padded([np.asarray(v, np.int64) for v in val])
        self.x_val = torch.from_numpy(np.ascontiguousarray(x_train[val_idx])).to(self.device)
        self.y_val = torch.from_numpy(np.ascontiguousarray(y_train[val_idx])).to(self.device)
        self.val_mask = torch.from_numpy(val_mask).to(self.device)
        self.x_heldout = as_tensor(heldout[0], self.device)
        self.y_heldout = as_tensor(heldout[1], self.device)

    @classmethod
    def for_experiment(cls, experiment: Experiment, device: str = "cpu") -> ParticipantBlock:
        """Return the block of all N participants of ``experiment`` (an ``experiment.Experiment``)."""
        ds, part = experiment.dataset, experiment.partition
        return cls(experiment.config, np.arange(experiment.nodes), ds.x_train, ds.y_train, part.train, part.val,
                   experiment.heldout, ds.input_shape, ds.num_classes, device=device,
                   misbehaving=experiment.misbehaving)

    @property
    def size(self) -> int:
        """P, the number of participants in this block."""
        return len(self.nodes)

    def minibatch_rows(self, t: int | torch.Tensor) -> torch.Tensor:
        """Return the rows of ``x_data``/``y_data`` that make z_k^t for every hosted k, [P, B] (a pure function of
        seed, k, t; ``t`` an int, or on a GPU also a 0-d device tensor)."""
        batch = self.config.optim.batch_size
        if self._draw_on_device:
            pos = minibatch_positions(self.config.seed, self._draw_nodes, t, self._draw_counts_t, batch)
        else:
            pos = torch.from_numpy(minibatch_indices(self.config.seed, self.nodes, int(t), self._draw_counts, batch))
            pos = pos.to(self.device)
        local = (self._offsets[:, None] + pos).clamp_(max=len(self.sample_rows) - 1)
        return self.sample_rows[local]  # idle participants' rows: any, discarded

    def minibatch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return z_k^t for every hosted k: x [P, B, ...], y [P, B] (a pure function of seed, k, t)."""
        rows = self.minibatch_rows(t)
        return self.x_data[rows], self.y_data[rows]

    @property
    def x_local(self) -> torch.Tensor:
        """The hosted participants' training inputs, concatenated (participant i's: rows offsets[i]:+counts[i])."""
        return self.x_data[self.sample_rows]

    @property
    def y_local(self) -> torch.Tensor:
        """The hosted participants' training targets, concatenated like ``x_local``."""
        return self.y_data[self.sample_rows]

    @property
    def cuda_graph(self) -> str | None:
        """How the local step runs on a GPU (``StepGraph.status``); None: launched kernel by kernel."""
        return None if self._step_graph is None else self._step_graph.status

    def half_step(self, t: int) -> torch.Tensor:
        """Run the local step of round t in place: afterwards ``population.state`` holds the half-step states
        θ^{t+½} [P, D]. Return the training losses [P] (a tensor on the block's device).
        """
        return self._half_step(t) if self._step_graph is None else self._step_graph(t)

    def _half_step(self, t: int | torch.Tensor) -> torch.Tensor:
        drawn = self.minibatch_rows(t)  # each chunk of participants gathers its own batches (``Population.half_step``)
        if self.misbehaving_factors is not None:
            rows = self._misbehaving
            before = self.population.params[rows].clone()
        loss = self.population.half_step(lambda rows: (self.x_data[drawn[rows]], self.y_data[drawn[rows]]),
                                         idle=self._idle if len(self.idle) else None)
        if self.misbehaving_factors is not None:  # they send θ + cΔ instead of θ + Δ
            after = self.population.params[rows]
            self.population.params[rows] = before + self.misbehaving_factors * (after - before)
        return loss

    def mixing_rows(self, weights: list[sp.csr_array] | sp.csr_array) -> list[torch.Tensor]:
        """Return rows of W^t (scipy CSR, [P, M_b] each) as sparse CSR tensors on the block's device, for ``mix``:
        engines convert them once per topology (or per round of a time-varying one), not every round."""
        return [csr_tensor(w, self.device) for w in (weights if isinstance(weights, list) else [weights])]

    def mix(self, weights: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """Gossip: θ_k^{t+1} = Σ_l W^t_kl θ_l^{t+½} for hosted k, in place.

        ``weights[b]`` [P, M_b] (from ``mixing_rows``): the rows of W^t for the hosted participants, restricted to
        the participants whose half-step states ``sources[b]`` [M_b, D] holds (one pair per source block; a tensor
        on the block's device, ``population.state`` itself for the block's own half-steps).
        """
        self.population.mix_(weights, sources)

    def snapshot(self, copy: bool = True) -> dict[str, np.ndarray]:
        """Return everything a later round reads: ``state`` [P, D] and the optimizer state (``opt.<name>``).
        Minibatches, W^t and misbehaviour are pure functions of (seed, participant, round), so these arrays and
        the round counter are the whole simulation state.

        Copies, unless ``copy`` is False: then on CPU the arrays share the block's memory and change with its next
        round (a Ray actor returns them that way: Ray copies them into the object store as the task ends, so the
        actor never holds a second copy of the state).
        """
        pop = self.population

        def out(value: torch.Tensor) -> np.ndarray:
            array = value.cpu().numpy()
            return array.copy() if copy else array

        arrays = {"state": out(pop.state)}
        arrays.update({f"opt.{name}": out(value) for name, value in pop.opt_state.items()})
        return arrays

    @torch.no_grad()
    def restore(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Overwrite the state with a ``snapshot()`` of these participants (rows in block order), or with
        the initial state when ``arrays`` is None."""
        pop = self.population
        if arrays is None:
            pop.state.copy_(initial_state(self._model, self.nodes, self.config.seed, self.config.model.init,
                                          device=self.device))
            for value in pop.opt_state.values():
                value.zero_()
            return
        targets = {"state": pop.state, **{f"opt.{name}": value for name, value in pop.opt_state.items()}}
        for key, like in targets.items():
            if tuple(arrays[key].shape) != tuple(like.shape):  # copy_ would broadcast a narrower one
                raise ValueError(f"{key} is {list(arrays[key].shape)}, not {list(like.shape)}")
        pop.state.copy_(as_tensor(arrays["state"], self.device))
        pop.load_optimizer_state({name: as_tensor(arrays[f"opt.{name}"], self.device) for name in pop.opt_state})

    def evaluate(self) -> dict[str, np.ndarray]:
        """Return metrics of the current θ_k: val_loss/val_acc on each participant's validation split,
        heldout_loss/heldout_acc on z′ (arrays [P]), and param_sum (float64 [D_params]) and
        param_sqnorm (float64 scalar) of this block's parameters, for the consensus distance.
        """
        pop = self.population
        if self.x_val.shape[1] and self.val_mask.any():
            loss, acc = pop.evaluate(self.x_val, self.y_val, sample_weights=self.val_mask)
        else:
            loss = acc = torch.full((self.size,), float("nan"), device=self.device)
        h_loss, h_acc = pop.evaluate(self.x_heldout, self.y_heldout, shared_input=True)
        # In float64, a chunk of rows at a time: a float64 copy of all of them would be twice the state.
        param_sum = torch.zeros(pop.param_layout.width, dtype=torch.float64, device=self.device)
        param_sqnorm = torch.zeros((), dtype=torch.float64, device=self.device)
        for rows in pop.step_chunks(budget=STEP_CHUNK_BYTES, itemsize=8, passes=None):
            chunk = pop.params[rows].double()
            param_sum += chunk.sum(0)
            if chunk.device.type == "cpu":  # numpy's sum: one order on any number of threads (torch's splits by them)
                param_sqnorm += float(np.square(chunk.numpy()).sum())
            else:
                param_sqnorm += chunk.square_().sum()
            del chunk
        return {
            "val_loss": loss.cpu().numpy(), "val_acc": acc.cpu().numpy(),
            "heldout_loss": h_loss.cpu().numpy(), "heldout_acc": h_acc.cpu().numpy(),
            "param_sum": param_sum.cpu().numpy(),
            "param_sqnorm": np.float64(param_sqnorm.item()),
        }
