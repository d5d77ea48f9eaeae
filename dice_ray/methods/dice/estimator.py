"""DICE-E (concepts §4) over a recorded window: the influence cascade of one probe, replayed.

For a probe (j, t0, z) with update difference Δ (parameters and optimizer state), ``estimate_cascades`` drives the
recursion of ``recursion.py`` over the window's recorded states, minibatches and mixing matrices:

    δ_k^{(1)} = W^t_kj Δ,            δ_k^{(s+1)} = Σ_l W^{t+s}_kl J_l^{t+s} δ_l^{(s)},

J_l^{t+s} the Jacobian of l's local step at θ_l^{t+s} on its minibatch z_l^{t+s} (``first-order``: J = I), and
reads e_k^{(s)} = ∇L(θ_k^{t+s}; z′)ᵀ δ_k^{(s)} and e_j^{(½)} = ∇L(θ_j^t; z′)ᵀ Δ (``second-order``: δ = a + b and
e₂ = ∇ᵀ(a + b) − ½ aᵀH′a; ``exact-readout``: e_x = L(θ_k; z′) − L(θ_k − δ; z′), concepts §4). The recursion costs
one batched Jacobian-vector product per round over the participants the cascade has reached, O(r · edges) vector
operations instead of Theorem 2's O(degree^r) paths. ``first_order_all_sources`` is its J = I case for every source
at once.

Also here: the window (``Window``: test gradients, local steps, z′ Hessian forms and z′ loss differences on recorded
states), the update differences Δ of whole-batch and single-sample probes, and b₀, the second-order part of a single
sample's Δ (``sample_second_order``): without z the step sees the gradient ḡ − d, so b₀ = −½ D²step[d, d].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from dice_ray.core.losses import CROSS_ENTROPY, Loss
from dice_ray.core.population import (
    OptimizerSpec,
    Population,
    copy_model,
    differentiable_running_statistics,
    optimizer_update_,
    pad_batch,
    pad_rows,
)
from dice_ray.core.tensors import as_tensor
from dice_ray.methods.dice.recursion import (
    READOUTS,
    READS_B,
    HessianForm,
    LocalSteps,
    LossDifference,
    Perturbation,
    carried_state,
    gossip,
    identity_step,
    local_step,
    read_by,
    start,
    twice_forward_differentiable,
)
from dice_ray.methods.dice.trajectory import Trajectory, first_reached, reach

VARIANTS = ("first-order", "curvature", "second-order", "exact-readout")
FORM_ROWS = 64  # participants per vmapped pass of the z′ Hessian forms (activations of 64 copies on z′)


@dataclass
class Cascade:
    """The estimated (or ground-truth) cascade of one probe.

    half: e_j^{(½)} (or d_j^{(½)}); supports[s]: participants S_s where step s is recorded (s = 0..R,
    S_0 = {j}); values[s]: [|S_s|] e_k^{(s)} (or d_k^{(s)}) for k in supports[s] (values[0] is unused).
    """

    source: int
    half: float
    supports: list[np.ndarray]
    values: list[np.ndarray]

    def dice(self, q: np.ndarray, hops: int) -> float:
        """DICE^{(r)} = q_j half + Σ_{s=1..r} Σ_{k ∈ N^{(s)}(j)} q_k value_k^{(s)} (concepts §3–4), r = ``hops``."""
        return sum(self.hop_term(q, s) for s in range(hops + 1))

    def hop_term(self, q: np.ndarray, step: int) -> float:
        """Σ_{k ∈ N^{(step)}(j)} q_k value_k^{(step)}: the part of DICE^{(step)} added by hop ``step`` alone
        (``step`` 0: q_j half)."""
        if step == 0:
            return float(q[self.source] * self.half)
        new = first_reached(self.supports)[step]
        return float(np.dot(q[new], self.values[step][np.searchsorted(self.supports[step], new)]))

    def horizon_total(self, q: np.ndarray, step: int) -> float:
        """Σ_k q_k value_k^{(step)}: the effect on the whole network's weighted loss ``step`` rounds later."""
        return float(np.dot(q[self.supports[step]], self.values[step]))


class RowCache:
    """A per-participant quantity (a row each) of the participants computed or given so far, looked up by id."""

    def __init__(self, n: int):
        self.at = np.full(n, -1, np.int64)  # participant -> its row of ``values``, -1 where none yet
        self.values: torch.Tensor | None = None

    def add(self, ids: np.ndarray, values: torch.Tensor) -> None:
        """Hold ``values`` [len(ids), ...] of participants ``ids`` (not held yet)."""
        start = 0 if self.values is None else len(self.values)
        self.at[ids] = np.arange(start, start + len(ids))
        self.values = values if self.values is None else torch.cat([self.values, values])

    def read(self, rows: np.ndarray, compute: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
        """The rows of participants ``rows``: ``compute(ids)`` [len(ids), ...] runs once for those not held (sorted
        ids), so memory grows with the participants read, not with N."""
        missing = np.unique(rows[self.at[rows] < 0])
        if len(missing):
            self.add(missing, compute(missing))
        return self.values[torch.as_tensor(self.at[rows], device=self.values.device)]


class Window:
    """A ``Trajectory`` with what is needed to evaluate losses and steps on it.

    model: the architecture; optimizer: O_k; batches(t) -> (x [N, B, ...], y [N, B]) the minibatches of
    round t; heldout: z′ = (x [m, ...], y [m]) shared by all participants, or with ``validation`` =
    (x [N, m, ...], y [N, m], mask [N, m]) each participant's own validation split as its z′_k (concepts §2);
    update_factors: c_k of misbehaving participants that send θ + cΔ; idle: the participants with no data, which
    do not step; replay_factual: DICE-GT replays both sides (the run's local steps were not IEEE float32, or the
    replay runs on a GPU).
    The model, the trajectory and these tensors live on one device, and so does everything computed from them:
    cascades come back to the host only as numpy (``Cascade``).
    """

    def __init__(self, trajectory: Trajectory, model: nn.Module, optimizer: OptimizerSpec, batches,
                 heldout: tuple[torch.Tensor, torch.Tensor],
                 validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 update_factors: np.ndarray | None = None, loss: Loss = CROSS_ENTROPY,
                 idle: np.ndarray | None = None, replay_factual: bool = False):
        self.trajectory = trajectory
        # The recorded run stepped in another arithmetic than a replay's IEEE float32 (engine.precision tf32 or
        # bf16), or the replay runs on a GPU, whose kernels for a replay's few rows (a dense product of W's rows, a
        # step of one participant) need not round as the recording's did for all of them (a sparse product, a step of
        # the whole block): DICE-GT replays the factual side too (``ground_truth_cascade``).
        self.replay_factual = replay_factual
        self.loss = loss
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.heldout = heldout
        self.validation = validation
        # c_k of participants that send θ + cΔ instead of their local step's θ + Δ (1 for honest ones).
        self.update_factors = update_factors
        # Participants with no data (ids): they do not step (θ^{t+½} = θ^t), so their local step is the identity.
        self.idle = np.zeros(0, np.int64) if idle is None else np.asarray(idle, np.int64)
        self._model64: nn.Module | None = None
        # step -> z′ gradients and losses at the recorded states, of the participants read so far (or ``given``)
        self._test_gradients: dict[int, RowCache] = {}
        self._test_losses: dict[int, RowCache] = {}
        # DICE-GT's factual side of the last (source, hops) replayed (``ground_truth.factual_side``).
        self.factual_replay: tuple[tuple[int, int], tuple[torch.Tensor, list[np.ndarray]]] | None = None

    def clear_cache(self) -> None:
        """Forget cached test gradients, losses and factual replays (for timing)."""
        self._test_gradients.clear()
        self._test_losses.clear()
        self.factual_replay = None

    def double_model(self) -> nn.Module:
        """A float64 copy of the architecture (for loss differences that need the precision)."""
        if self._model64 is None:
            self._model64 = copy_model(self.model).double()
        return self._model64

    def idle_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """Which of participants ``rows`` have no data (bool [len(rows)]), or None where none has."""
        return np.isin(rows, self.idle) if len(self.idle) else None

    def index(self, rows: np.ndarray) -> torch.Tensor:
        """``rows`` (participant ids) as an index tensor on the window's device."""
        return torch.as_tensor(rows, device=self.trajectory.device)

    def population(self, s: int, rows: np.ndarray, states: torch.Tensor | None = None) -> Population:
        """Participants ``rows`` at round t0+s (their states, or the given ``states`` [len(rows), D])."""
        base = self.trajectory.states[s][rows] if states is None else states
        return Population(self.model, base.clone(), self.optimizer, loss=self.loss)

    def test_gradients(self, s: int, rows: np.ndarray) -> torch.Tensor:
        """∇L(θ_k^{t0+s}; z′) for k in ``rows``: [len(rows), D] over the state (eval mode, which reads the running
        statistics).

        Computed once per participant and step, for the participants asked for (or ``given``): the probes of one round
        (every source, every variant) share them, as they share the trajectory, and a probe reads only those it
        reaches.
        """
        return self._cache(self._test_gradients, s).read(rows, lambda ids: self.compute_test_gradients(s, ids))

    def compute_test_gradients(self, s: int, rows: np.ndarray) -> torch.Tensor:
        """``test_gradients`` without the cache."""
        pop = self.population(s, rows)
        self.model.eval()
        try:
            if self.validation is None:
                return pop.loss_and_grad(*self.heldout, shared_input=True, of_state=True)[1]
            x, y, mask = (v[self.index(rows)] for v in self.validation)
            return pop.loss_and_grad(x, y, sample_weights=mask, of_state=True)[1]
        finally:
            self.model.train()

    def test_losses(self, s: int, rows: np.ndarray) -> torch.Tensor:
        """L(θ_k^{t0+s}; z′) for k in ``rows``: [len(rows)] float64 (eval mode), computed once per participant and
        step (as ``test_gradients``): DICE-GT's factual side and the exact readout's shared term, L(θ_k; z′) of every
        probe read at k and step s."""
        def compute(ids: np.ndarray) -> torch.Tensor:
            return self.zprime_losses(ids, self.trajectory.states[s][self.index(ids)])

        return self._cache(self._test_losses, s).read(rows, compute)

    def given(self, s: int, rows: np.ndarray, gradients: np.ndarray | None, losses: np.ndarray | None) -> None:
        """Hold the z′ gradients [len(rows), D] and losses [len(rows)] (float64) at θ^{t0+s} of participants ``rows``,
        computed elsewhere (a round's, shared by its tasks: ``replays.zprime_task``); None: not given."""
        for cache, values in ((self._test_gradients, gradients), (self._test_losses, losses)):
            if values is not None:
                self._cache(cache, s).add(rows, as_tensor(values, self.trajectory.device))

    def _cache(self, caches: dict[int, RowCache], s: int) -> RowCache:
        if s not in caches:
            caches[s] = RowCache(self.trajectory.states[s].shape[0])
        return caches[s]

    def zprime_losses(self, rows: np.ndarray, states: torch.Tensor) -> torch.Tensor:
        """L(θ; z′_k) [P] float64 at ``states`` [P, D] of participants ``rows`` (z′_k: k's validation split when the
        window has one, else the held-out batch), eval mode, evaluated in float64 (``float64_losses``)."""
        model = self.double_model()
        if self.validation is None:
            return float64_losses(model, self.loss, states, *self.heldout, shared_input=True)
        x, y, mask = (value[self.index(rows)] for value in self.validation)
        return float64_losses(model, self.loss, states, x, y, sample_weights=mask)

    def stacked_loss_differences(self, terms: list[tuple[int, np.ndarray, LossDifference]]) -> list[torch.Tensor]:
        """L(θ_k + shift; z′) − L(θ_k + shift − δ; z′) of several (s, rows, request) at θ_k = θ_k^{t0+s}: one list
        entry [len(rows)] per term. L(θ_k; z′) (no shift) is ``test_losses``; the shifted states of every term go
        through one batched forward pass (``Population.evaluate``'s chunks), whatever their round."""
        states = torch.cat([self.trajectory.states[s][self.index(rows)] for s, rows, _ in terms])
        rows = np.concatenate([rows for _, rows, _ in terms])
        shift = torch.cat([r.shift if r.shift is not None else torch.zeros_like(r.delta) for *_, r in terms])
        delta = torch.cat([r.delta for *_, r in terms])
        shifted = [i for i, (*_, r) in enumerate(terms) if r.shift is not None]
        bounds = np.cumsum([0] + [len(rows) for _, rows, _ in terms])
        at = torch.cat([self.test_losses(s, rows) for s, rows, _ in terms])
        if shifted:
            index = torch.cat([torch.arange(int(bounds[i]), int(bounds[i + 1])) for i in shifted]).to(delta.device)
            at[index] = self.zprime_losses(rows[index.cpu().numpy()], moved(states[index], shift[index]))
        out = at - self.zprime_losses(rows, moved(states, shift, -delta))
        return list(out.split([len(rows) for _, rows, _ in terms]))

    def hessian_forms(self, s: int, rows: np.ndarray, u: torch.Tensor, v: torch.Tensor,
                      states: torch.Tensor | None = None) -> torch.Tensor:
        """uᵀ H′(θ_k^{t0+s}; z′) v for k in ``rows`` (or at the given ``states`` [P, D]): [P] (eval mode).

        u, v: [P, D]; H′ is the Hessian of k's z′ loss over the state (k's validation split when the window has
        one).
        """
        pop = self.population(s, rows, states)
        if self.validation is None:
            return zprime_hessian_forms(pop, u, v, *self.heldout, shared_input=True)
        x, y, mask = (value[self.index(rows)] for value in self.validation)
        return zprime_hessian_forms(pop, u, v, x, y, sample_weights=mask)

    def stacked_hessian_forms(self, terms: list[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]],
                              chunk: int = FORM_ROWS) -> list[torch.Tensor]:
        """``hessian_forms`` of several (s, rows, u, v) at once: one list entry [len(rows)] per term.

        Rows of different rounds are independent in the vmapped pass, so they go in passes of up to ``chunk``
        rows whatever their round (measured: one pass per probe instead of one per step, 1.3x faster at 16
        participants on a 16-image z′, where each pass's fixed cost dominates).
        """
        states = torch.cat([self.trajectory.states[s][self.index(rows)] for s, rows, _, _ in terms])
        rows = np.concatenate([rows for _, rows, _, _ in terms])
        u, v = torch.cat([t[2] for t in terms]), torch.cat([t[3] for t in terms])
        out = torch.cat([self.hessian_forms(0, rows[i: i + chunk], u[i: i + chunk], v[i: i + chunk],
                                            states[i: i + chunk]) for i in range(0, len(rows), chunk)])
        return list(out.split([len(rows) for _, rows, _, _ in terms]))

    def local_steps(self, s: int, rows: np.ndarray) -> LocalSteps:
        """The local steps O_l of participants ``rows`` at round t0+s (their recorded states and minibatches)."""
        x, y = self.batches(self.trajectory.t0 + s)
        index = self.index(rows)
        return LocalSteps(self.model, self.optimizer, self.trajectory.states[s][index],
                          {name: value[index] for name, value in self.trajectory.opt_states[s].items()}, x[index],
                          y[index], None if self.update_factors is None else self.update_factors[rows], self.loss,
                          self.idle_rows(rows))

    def jvp_step(self, s: int, rows: np.ndarray, tangent: torch.Tensor,
                 opt_tangent: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """J δ for participants ``rows`` at round t0+s: the forward-mode derivative of their local step
        (parameters and optimizer state) in direction (``tangent`` [P, D], ``opt_tangent``)."""
        stepped = local_step(self.local_steps(s, rows), Perturbation(tangent, opt_tangent))
        return stepped.a, stepped.opt_a

    def mixing_rows(self, s: int, targets: np.ndarray, rows: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """W^{t0+s} restricted to ``targets`` x ``rows`` (participant ids), dense, as ``like``'s dtype and device."""
        w = self.trajectory.mixing[s][targets][:, rows]
        return torch.as_tensor(np.asarray(w.todense()), dtype=like.dtype, device=like.device)

    def corrupt_updates_(self, rows: np.ndarray, before: torch.Tensor, pop: Population) -> None:
        """Turn the local steps just taken by ``rows`` (parameters ``before`` [P, D_params] -> ``pop.params``)
        into the updates their owners send: θ + c(θ' − θ)."""
        if self.update_factors is not None:
            c = torch.as_tensor(self.update_factors[rows], dtype=before.dtype, device=before.device)[:, None]
            pop.params.copy_(before + c * (pop.params - before))


def moved(states: torch.Tensor, *changes: torch.Tensor) -> torch.Tensor:
    """``states`` [P, D] with each of ``changes`` [P, D] added, in float64 (where the loss differences read them):
    a new tensor."""
    out = states.double()
    for change in changes:
        out = out + change.double()
    return out


def float64_losses(model64: nn.Module, loss: Loss, states: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   shared_input: bool = False, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """L(θ; z′) [P] float64 at ``states`` [P, D] (z′ = x, y, as ``Population.evaluate`` takes them), eval mode, no
    graph, evaluated in float64 by ``model64`` (the architecture's float64 copy). Exact readouts and DICE-GT are
    differences of nearby losses: in float32 each would carry ~1e-7 of rounding (5e-7 measured between thread
    counts), a relative error of 1e-2 or more on a single sample's influence; in float64 ~1e-16. (Plain SGD: no
    optimizer state is allocated for an evaluation, which reads none. Floating-point targets are read in float64
    too: a loss such as ``binary_cross_entropy_with_logits`` computes in its target's dtype.)"""
    pop = Population(model64, states.double(), OptimizerSpec(), loss=loss)

    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t

    with torch.no_grad():
        return pop.evaluate(wide(x), wide(y), shared_input, sample_weights)[0]


def state_losses(pop: Population, state: torch.Tensor, x: torch.Tensor, y: torch.Tensor, shared_input: bool = False,
                 sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """L(state_k; z_k) [P] of ``pop``'s architecture at ``state`` [P, D] (parameters and buffers, a function of both:
    forward mode differentiates it along a state's direction)."""
    width = pop.param_layout.width
    return pop.losses_of(pop.param_layout.views(state[:, :width]), x, y, shared_input,
                          pop.buffer_layout.views(state[:, width:]), sample_weights)


def zprime_hessian_forms(pop: Population, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         shared_input: bool = False, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """uᵀ H′ v for every row of ``pop`` [P] (u, v: [P, D]): the mixed second derivative of the z′ loss (x, y, as
    ``Population.loss_and_grad`` takes them) at ``pop``'s state, in eval mode: the forward-mode derivative of the z′
    gradient along u (H′u, rows independent) dotted with v. Measured 2x faster than a jvp of a jvp of the loss
    (digits MLP, 360-image z′)."""
    count = pop.size
    extra = pop.pass_padding(count)  # 1-2 rows compute with the kernels of larger passes
    state, u, v = pad_rows(pop.state, extra), pad_rows(u, extra), pad_rows(v, extra)
    x, y, sample_weights = pad_batch(extra, x, y, sample_weights, shared_input)

    def losses(state: torch.Tensor) -> torch.Tensor:
        return state_losses(pop, state, x, y, shared_input, sample_weights)

    was_training = pop.model.training
    pop.model.eval()
    try:
        with differentiable_running_statistics(pop.model):
            hessian_u = jvp(grad(lambda p: losses(p).sum()), (state,), (u,))[1]
        return (hessian_u * v).sum(dim=1).detach()[:count]
    finally:
        pop.model.train(was_training)


def shared_primal_hessian_forms(pop: Population, tangents: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                shared_input: bool = False,
                                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """aᵀ H′ a for V tangents a per row of ``pop`` (``tangents`` [P, V, D]): [P, V], as
    ``zprime_hessian_forms`` computes them, with each row's primal pass (its z′ forward and backward) taken once
    for all its tangents instead of once per tangent. x, y (and ``sample_weights``): z′ as ``zprime_hessian_forms``
    takes them, per row [P, ...] unless ``shared_input``. Zero tangents give zero forms (padding). A set of 1-2 rows
computes padded with copies of its last row (the kernels of larger sets); on a shared z′ the forms still round
differently with the number of rows (checked: rows 3-5 of 6 against the same 3 alone, float32 rounding)."""
    def forms(state: torch.Tensor, row_tangents: torch.Tensor, xr, yr, wr) -> torch.Tensor:
        def loss(s: torch.Tensor) -> torch.Tensor:
            return state_losses(pop, s[None], xr if shared_input else xr[None], yr if shared_input else yr[None],
                                shared_input, None if wr is None else wr[None]).sum()

        gradient = grad(loss)
        return vmap(lambda t: (jvp(gradient, (state,), (t,))[1] * t).sum())(row_tangents)

    row, count = None if shared_input else 0, pop.size
    extra = pop.pass_padding(count)  # 1-2 rows compute with the kernels of larger passes
    x, y, sample_weights = pad_batch(extra, x, y, sample_weights, shared_input)
    was_training = pop.model.training
    pop.model.eval()
    try:
        with differentiable_running_statistics(pop.model):
            forms_of = vmap(forms, in_dims=(0, 0, row, row, None if sample_weights is None else 0))(
                pad_rows(pop.state, extra), pad_rows(tangents, extra), x, y, sample_weights)
        return forms_of.detach()[:count]
    finally:
        pop.model.train(was_training)


def update_difference(window: Window, source: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δ for the whole-batch probe (j, t0): the actual update θ_j^{t+½} − θ_j^t (the state: parameters and running
    statistics) and the change of j's optimizer state in that step (the counterfactual skips the step)."""
    traj = window.trajectory
    delta = traj.halves[0][source] - traj.states[0][source]
    opt = {name: (traj.opt_states[1][name][source] - traj.opt_states[0][name][source]).clone()
           for name in carried_state(window.optimizer, traj.opt_states[0])}  # Adam: the counter's lag, 1 (or 0: idle)
    return delta, opt


def sample_update_difference(window: Window, source: int,
                             position: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δ of the single-sample probe (j, t0, z = sample ``position`` of j's minibatch), for DICE-E (concepts §4):
    ``sample_update`` at j's recorded state and minibatch of round t0."""
    traj = window.trajectory
    x, y = window.batches(traj.t0)
    factor = 1.0 if window.update_factors is None else float(window.update_factors[source])
    return no_step_if_idle(source in window.idle, sample_update(
        window.model, window.optimizer, traj.states[0][source], {name: value[source] for name, value in
                                                                 traj.opt_states[0].items()},
        x[source], y[source], position, factor, window.loss))


def no_step_if_idle(idle: bool, update: tuple[torch.Tensor, dict[str, torch.Tensor]]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``update`` (a sample's Δ or b₀, with its optimizer part), or zeros of the same shapes for a participant with no
    data (``idle``): it does not step, so removing a sample of its stand-in minibatch changes nothing."""
    if not idle:
        return update
    return torch.zeros_like(update[0]), {name: torch.zeros_like(value) for name, value in update[1].items()}


def sample_update(model: nn.Module, optimizer: OptimizerSpec, state: torch.Tensor, opt_state: dict[str, torch.Tensor],
                  xb: torch.Tensor, yb: torch.Tensor, position: int,
                  factor: float = 1.0, loss: Loss = CROSS_ENTROPY) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δ of removing sample ``position`` of the minibatch (``xb`` [B, ...], ``yb`` [B]) from one participant's
    local step at ``state`` [D] with optimizer state ``opt_state`` (concepts §4, single-sample probes).

    From per-sample gradients g_x: removing z changes the gradient by (g_z − ḡ)/(|B| − 1); Δ is the forward-mode
    derivative of the optimizer step in that direction (exactly −η (g_z − ḡ)/(|B| − 1) for SGD; parameters and
    optimizer state for the others). ``factor`` c: the participant sends θ + cΔ (misbehaviour; 1 if honest). Δ is
    over the state [D]: its buffers are constants of the step (``experiment.check_normalization`` refuses a sample's
    probe on a model that normalizes by batch statistics), 0 there.
    """
    step, mean, direction = _sample_step(model, optimizer, state, opt_state, xb, yb, position, loss)
    _, (delta, opt_delta) = jvp(step, (mean,), (direction,))
    if factor != 1.0:  # a misbehaving source sends θ + cΔ
        delta = delta * factor
    return on_state(delta, state), opt_delta


def on_state(params: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A change of the parameters [D_params] as a change of the state [D] (``state``'s width): 0 on its buffers."""
    return torch.cat([params, params.new_zeros(state.shape[-1] - params.shape[-1])])


def sample_second_order(model: nn.Module, optimizer: OptimizerSpec, state: torch.Tensor,
                        opt_state: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, position: int,
                        factor: float = 1.0,
                        loss: Loss = CROSS_ENTROPY) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """b₀: the second-order part of ``sample_update``'s Δ (same arguments), state [D] and optimizer state.

    Without z the step sees the gradient ḡ − d, d = (g_z − ḡ)/(|B| − 1), so Δ = step(ḡ) − step(ḡ − d)
    = D step[d] − ½ D²step[d, d] + O(d³): b₀ = −½ D²step[d, d] (forward-over-forward jvp). Zero for SGD and
    momentum (their step is linear in the gradient), nonzero for Adam.
    """
    step, mean, direction = _sample_step(model, optimizer, state, opt_state, xb, yb, position, loss)
    with twice_forward_differentiable():
        _, (second, opt_second) = jvp(lambda g: jvp(step, (g,), (direction,))[1], (mean,), (direction,))
    return on_state(-0.5 * factor * second, state), {name: -0.5 * value for name, value in opt_second.items()}


def _sample_step(model: nn.Module, optimizer: OptimizerSpec, state: torch.Tensor, opt_state: dict[str, torch.Tensor],
                 xb: torch.Tensor, yb: torch.Tensor, position: int, loss: Loss):
    """(step: gradient [D_params] -> (new parameters, new optimizer state), ḡ, d = (g_z − ḡ)/(|B| − 1))."""
    batch = len(yb)
    per_sample = Population(model, state[None].expand(batch, -1).clone(), optimizer, loss=loss)  # one copy per sample
    grads = per_sample.loss_and_grad(xb[:, None], yb[:, None])[1]
    mean = grads.mean(dim=0)
    direction = (grads[position] - mean) / (batch - 1)
    params = per_sample.params[0]
    opt = {name: value.clone() for name, value in opt_state.items()}

    def step(g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        new_params, new_opt = params.clone()[None], {name: value.clone()[None] for name, value in opt.items()}
        optimizer_update_(optimizer, new_params, g[None], new_opt)
        return new_params[0], {name: value[0] for name, value in new_opt.items() if name in carried}

    carried = carried_state(optimizer, opt)  # Adam's counter: its lag is 0, as the step is taken either way

    return step, mean, direction


def sample_second_order_difference(window: Window, source: int,
                                   position: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """b₀ of the single-sample probe (j, t0, sample ``position``): ``sample_second_order`` on the window."""
    traj = window.trajectory
    x, y = window.batches(traj.t0)
    factor = 1.0 if window.update_factors is None else float(window.update_factors[source])
    return no_step_if_idle(source in window.idle, sample_second_order(
        window.model, window.optimizer, traj.states[0][source], {name: value[source] for name, value in
                                                                 traj.opt_states[0].items()},
        x[source], y[source], position, factor, window.loss))


def estimate_cascade(window: Window, source: int, delta: torch.Tensor, opt_delta: dict[str, torch.Tensor],
                     hops: int, variant: str = "curvature",
                     second: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
                     with_b: bool = True, exact_b: bool = False) -> Cascade:
    """Return DICE-E's cascade of a probe of participant ``source`` at round t0 with update difference
    ``delta`` [D] (the state) (and optimizer-state difference ``opt_delta``), for steps s = 1..hops.

    ``second-order`` and ``exact-readout`` with b only: ``second`` = b₀ (Δ's second-order part [D], its
    optimizer-state part; None: zero, as for a whole-batch probe). ``with_b`` False: second-order reads a alone
    (e = ∇ᵀa − ½ aᵀH′a, ``second_order_b``); ``exact_b`` True: exact-readout reads a + b (``exact_readout_b``).
    """
    return estimate_cascades(window, source, delta, opt_delta, hops, [variant], second, with_b, exact_b)[variant]


def estimate_cascades(window: Window, source: int, delta: torch.Tensor, opt_delta: dict[str, torch.Tensor],
                      hops: int, variants: list[str],
                      second: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
                      with_b: bool = True, exact_b: bool = False) -> dict[str, Cascade]:
    """``estimate_cascade`` of every variant in ``variants`` (variant -> ``Cascade``): ``first-order`` propagated with
    J = I, the others with one propagation through the local steps — ``curvature``'s cascade is read off a, and b is
    carried when a variant that reads it asks for it (``with_b``: second-order's, ``exact_b``: exact-readout's)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variant {unknown[0]!r} is unknown; choose one of {', '.join(VARIANTS)}")
    out: dict[str, Cascade] = {}
    if "first-order" in variants:
        out |= replay_recursion(window, source, start(delta[None], {}), hops, ["first-order"], through_j=False)
    curved = [v for v in variants if v != "first-order"]
    if curved:
        opt = {name: value[None] for name, value in opt_delta.items()}
        reads_b = reading_b(curved, with_b, exact_b)
        b0 = None
        if any(reads_b.values()):
            b0, opt_b0 = second if second is not None else (torch.zeros_like(delta), {})
            b0, opt_b0 = b0[None], {name: value[None] for name, value in opt_b0.items()}
        out |= replay_recursion(window, source, start(delta[None], opt, b0, None if b0 is None else opt_b0), hops,
                                curved, through_j=True, reads_b=reads_b)
    return {v: out[v] for v in variants}


def reading_b(variants: list[str], with_b: bool, exact_b: bool) -> dict[str, bool]:
    """Variant -> whether its readout reads b (δ = a + b): second-order's ``with_b`` (``second_order_b``),
    exact-readout's ``exact_b`` (``exact_readout_b``); False for the others and for variants not in ``variants``."""
    flags = {"second-order": with_b, "exact-readout": exact_b}
    return {v: v in READS_B and flags[v] for v in variants}


def replay_recursion(window: Window, source: int, delta: Perturbation, hops: int, variants: list[str],
                     through_j: bool, reads_b: dict[str, bool] | None = None) -> dict[str, Cascade]:
    """The recursion (``recursion``) over the window for the probe (``source``, t0) started with ``delta`` (on row
    j): e_j^{(½)} and e_k^{(s)}, s = 1..hops, read by each variant's readout (variant -> ``Cascade``; ``reads_b``:
    the variants that read b, ``reading_b``; default all). ``through_j``: step through the local steps' J (else
    J = I). The readouts' requests of every step are evaluated together at the end (rows at different rounds in
    one batched pass: the z′ Hessian forms, then the z′ loss differences)."""
    traj = window.trajectory
    supports = reach(traj.mixing[:hops], source)
    readouts = {v: READOUTS[v] for v in variants}
    update = (traj.halves[0][source] - traj.states[0][source])[None]  # u, the factual update
    reads_b = dict.fromkeys(variants, True) if reads_b is None else reads_b
    linear: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    hessians: list[tuple[str, int, float, tuple[int, np.ndarray, torch.Tensor, torch.Tensor]]] = []
    losses: list[tuple[str, int, tuple[int, np.ndarray, LossDifference]]] = []

    def read(s: int, rows: np.ndarray, delta: Perturbation, update: torch.Tensor | None = None) -> None:
        gradients = window.test_gradients(s, rows)
        for v, readout in readouts.items():
            seen = read_by(delta, reads_b[v])
            linear[v].append(readout.linear(gradients, seen))
            form = readout.form(seen, update)
            if isinstance(form, HessianForm):
                hessians.append((v, s, form.c, (s, rows, form.u, form.v)))
            elif isinstance(form, LossDifference):
                losses.append((v, s, (s, rows, form)))

    rows = np.array([source])
    read(0, rows, delta, update)
    for s in range(1, hops + 1):
        keep = torch.as_tensor(np.searchsorted(supports[s], rows), device=delta.a.device)  # S_{s-1} ⊆ S_s
        delta = gossip([(window.mixing_rows(s - 1, supports[s], rows, delta.a), delta)], delta, keep,
                       len(supports[s]))
        rows = supports[s]
        read(s, rows, delta)
        if s < hops:
            delta = local_step(window.local_steps(s, rows), delta) if through_j else identity_step(delta)
    values = window.stacked_hessian_forms([f[3] for f in hessians]) if hessians else []
    for (v, s, coefficient, _), value in zip(hessians, values, strict=True):
        linear[v][s] = linear[v][s] + coefficient * value
    values = window.stacked_loss_differences([f[2] for f in losses]) if losses else []
    for (v, s, _), value in zip(losses, values, strict=True):
        linear[v][s] = linear[v][s] + value
    return {v: Cascade(source, float(values[0][0]), supports, [np.zeros(1)] + [x.cpu().numpy() for x in values[1:]])
            for v, values in linear.items()}


def first_order_all_sources(window: Window, deltas: torch.Tensor, hops: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """First-order DICE-E of the whole-batch probes of every source at round t0, for every target and step.

    deltas: [N, D], row j = Δ_j. Returns (half [N]: e_j^{(½)}, values: for s = 1..hops an [N, N] array
    with values[s-1][k, j] = (W^{t+s-1} ⋯ W^t)_{kj} ∇L(θ_k^{t+s}; z′)ᵀ Δ_j). This is the recursion with J = I
    (``recursion.identity_step``) for all sources at once: gossip then only scales Δ_j, so δ_j^{(s)} is the column
    j of the product of mixing matrices times Δ_j, and the first-order readout ∇Lᵀδ is that product times the
    shared test gradients' dot products: N·R test gradients plus R [N, D] x [D, N] products.
    """
    traj = window.trajectory
    n = deltas.shape[0]
    everyone = np.arange(n)
    half = READOUTS["first-order"].linear(window.test_gradients(0, everyone), start(deltas, {})).cpu().numpy()
    product = np.eye(n)
    values = []
    for s in range(1, hops + 1):
        product = traj.mixing[s - 1] @ product  # gossip with J = I
        inner = (window.test_gradients(s, everyone) @ deltas.T).cpu().numpy()  # ∇L(θ_k; z′)ᵀ Δ_j
        values.append(np.asarray(product) * inner)
    return half, values
