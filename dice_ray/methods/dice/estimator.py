"""DICE-E (concepts §4): the influence cascade of one probe, by propagating its perturbation through the window.

For a probe (j, t, z) with update difference Δ (parameters and optimizer state), the perturbation of
participant k's local state r rounds later is

    δ_k^{(1)} = W^t_kj Δ,            δ_k^{(s+1)} = Σ_l W^{t+s}_kl J_l^{t+s} δ_l^{(s)},

where J_l^{t+s} is the Jacobian of l's local step at θ_l^{t+s} on its minibatch z_l^{t+s}: computed as a
forward-mode derivative (``torch.func.jvp``) through the optimizer step — for SGD that is δ − η H δ, one
Hessian-vector product, never a Hessian. The optimizer state (momentum, Adam moments) is part of the
perturbed local state but is not gossiped. ``first-order`` takes J = I (communication only).

The estimate is e_k^{(s)} = ∇L(θ_k^{t+s}; z′)ᵀ δ_k^{(s)} and e_j^{(½)} = ∇L(θ_j^t; z′)ᵀ Δ. The recursion costs
one batched Jacobian-vector product per round over the participants the cascade has reached, i.e.
O(r · edges) vector operations instead of Theorem 2's O(degree^r) paths.

``second-order`` is exact to second order in Δ. It propagates δ = a + b, a the curvature perturbation above and
b its O(Δ²) part (parameters and optimizer state alike):

    b^{(1)} = W^t_kj b₀,   b^{(s+1)} = Σ_l W^{t+s}_kl (J_l b_l^{(s)} − ½ D²O_l[a_l^{(s)}, a_l^{(s)}]),

with D²O_l[a, a] the second directional derivative of l's whole local update along a (forward-over-forward
``torch.func.jvp``; −η ∇³L[a, a] for SGD). The minus sign: δ = θ − θ_{∖z} with J and D²O taken at the factual
θ, and O(θ) − O(θ − δ) = J δ − ½ D²O[δ, δ] + O(δ³). b₀ = 0 for a whole-batch probe; for a single sample b₀ is the
second-order part of Δ (``sample_second_order``). Since L(θ) − L(θ − δ) = ∇Lᵀδ − ½ δᵀH′δ + O(δ³), with H′ the
Hessian of the z′ loss at the factual θ_k,

    e₂_k^{(s)} = ∇L(θ_k^{t+s}; z′)ᵀ(a + b) − ½ aᵀ H′(θ_k^{t+s}) a,
    e₂_j^{(½)} = ∇L(θ_j^t; z′)ᵀ(a₀ + b₀) + a₀ᵀ H′(θ_j^t)(u − ½ a₀),

u = θ_j^{t+½} − θ_j^t the source's factual update (the direct term expands around θ_j^t: for a whole batch
u = Δ = a₀ and it is ∇ᵀΔ + ½ ΔᵀH′Δ). Per step and participant reached that is one nested forward-mode pass
through the local step (it also gives J a and J b) and one second-order forward pass of the z′ loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from dice_ray.core.losses import CROSS_ENTROPY, Loss
from dice_ray.core.population import OptimizerSpec, Population, model_state_layouts, optimizer_update_
from dice_ray.methods.dice.trajectory import Trajectory, first_reached, reach

VARIANTS = ("first-order", "curvature", "second-order")
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


class Window:
    """A ``Trajectory`` with what is needed to evaluate losses and steps on it.

    model: the architecture; optimizer: O_k; batches(t) -> (x [N, B, ...], y [N, B]) the minibatches of
    round t; heldout: z′ = (x [m, ...], y [m]) shared by all participants, or with ``validation`` =
    (x [N, m, ...], y [N, m], mask [N, m]) each participant's own validation split as its z′_k (concepts §2).
    The model, the trajectory and these tensors live on one device, and so does everything computed from them:
    cascades come back to the host only as numpy (``Cascade``).
    """

    def __init__(self, trajectory: Trajectory, model: nn.Module, optimizer: OptimizerSpec, batches,
                 heldout: tuple[torch.Tensor, torch.Tensor],
                 validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 update_factors: np.ndarray | None = None, loss: Loss = CROSS_ENTROPY):
        self.trajectory = trajectory
        self.loss = loss
        self.model = model
        self.optimizer = optimizer
        self.batches = batches
        self.heldout = heldout
        self.validation = validation
        # c_k of participants that send θ + cΔ instead of their local step's θ + Δ (1 for honest ones).
        self.update_factors = update_factors
        self._model64: nn.Module | None = None
        self._test_gradients: dict[int, torch.Tensor] = {}

    def clear_cache(self) -> None:
        """Forget cached test gradients (for timing)."""
        self._test_gradients.clear()

    def double_model(self) -> nn.Module:
        """A float64 copy of the architecture (for loss differences that need the precision)."""
        if self._model64 is None:
            import copy

            self._model64 = copy.deepcopy(self.model).double()
        return self._model64

    def index(self, rows: np.ndarray) -> torch.Tensor:
        """``rows`` (participant ids) as an index tensor on the window's device."""
        return torch.as_tensor(rows, device=self.trajectory.device)

    def population(self, s: int, rows: np.ndarray, states: torch.Tensor | None = None) -> Population:
        """Participants ``rows`` at round t0+s (their states, or the given ``states`` [len(rows), D])."""
        base = self.trajectory.states[s][rows] if states is None else states
        return Population(self.model, base.clone(), self.optimizer, loss=self.loss)

    def test_gradients(self, s: int, rows: np.ndarray) -> torch.Tensor:
        """∇L(θ_k^{t0+s}; z′) for k in ``rows``: [len(rows), D_params] (eval mode).

        Computed once per step for all N participants and cached: the probes of one round (every source,
        both variants) share them, as they share the trajectory.
        """
        if s not in self._test_gradients:
            self._test_gradients[s] = self.compute_test_gradients(s, np.arange(self.trajectory.states[s].shape[0]))
        return self._test_gradients[s][self.index(rows)]

    def compute_test_gradients(self, s: int, rows: np.ndarray) -> torch.Tensor:
        """``test_gradients`` without the cache."""
        pop = self.population(s, rows)
        self.model.eval()
        try:
            if self.validation is None:
                return pop.loss_and_grad(*self.heldout, shared_input=True)[1]
            x, y, mask = (v[self.index(rows)] for v in self.validation)
            return pop.loss_and_grad(x, y, sample_weights=mask)[1]
        finally:
            self.model.train()

    def hessian_forms(self, s: int, rows: np.ndarray, u: torch.Tensor, v: torch.Tensor,
                      states: torch.Tensor | None = None) -> torch.Tensor:
        """uᵀ H′(θ_k^{t0+s}; z′) v for k in ``rows`` (or at the given ``states`` [P, D]): [P] (eval mode).

        u, v: [P, D_params]; H′ is the Hessian of k's z′ loss (k's validation split when the window has one).
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

    def second_order_step(self, s: int, rows: np.ndarray, a: torch.Tensor, opt_a: dict[str, torch.Tensor],
                          b: torch.Tensor, opt_b: dict[str, torch.Tensor]):
        """(J a, J b − ½ D²O[a, a]) for participants ``rows`` at round t0+s (``second_order_local_step``)."""
        x, y = self.batches(self.trajectory.t0 + s)
        index = self.index(rows)
        return second_order_local_step(self.model, self.optimizer, self.trajectory.states[s][index],
                                       {name: value[index] for name, value in self.trajectory.opt_states[s].items()},
                                       x[index], y[index], a, opt_a, b, opt_b,
                                       None if self.update_factors is None else self.update_factors[rows], self.loss)

    def jvp_step(self, s: int, rows: np.ndarray, tangent: torch.Tensor,
                 opt_tangent: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """J δ for participants ``rows`` at round t0+s: the forward-mode derivative of their local step
        (parameters and optimizer state) in direction (``tangent`` [P, D_params], ``opt_tangent``)."""
        x, y = self.batches(self.trajectory.t0 + s)
        index = self.index(rows)
        return jvp_local_step(self.model, self.optimizer, self.trajectory.states[s][index],
                              {name: value[index] for name, value in self.trajectory.opt_states[s].items()},
                              x[index], y[index], tangent, opt_tangent,
                              None if self.update_factors is None else self.update_factors[rows], self.loss)

    def corrupt_updates_(self, rows: np.ndarray, before: torch.Tensor, pop: Population) -> None:
        """Turn the local steps just taken by ``rows`` (parameters ``before`` [P, D_params] -> ``pop.params``)
        into the updates their owners send: θ + c(θ' − θ)."""
        if self.update_factors is not None:
            c = torch.as_tensor(self.update_factors[rows], dtype=before.dtype, device=before.device)[:, None]
            pop.params.copy_(before + c * (pop.params - before))


def jvp_local_step(model: nn.Module, optimizer: OptimizerSpec, states: torch.Tensor, opt_state: dict[str, torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor, tangent: torch.Tensor, opt_tangent: dict[str, torch.Tensor],
                   factors: np.ndarray | None = None,
                   loss: Loss = CROSS_ENTROPY) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J δ: the forward-mode derivative of the local steps of P participants (rows of ``states`` [P, D], their
    optimizer states, minibatches x [P, B, ...], y [P, B]) along (``tangent`` [P, D_params], ``opt_tangent``;
    missing optimizer entries: 0). ``factors`` c [P] of participants that send θ + c(O(θ) − θ) (None: all 1)."""
    pop = Population(model, states.clone(), optimizer, loss=loss)
    opt = {name: value.clone() for name, value in opt_state.items()}
    tangents = {name: opt_tangent.get(name, torch.zeros_like(value)) for name, value in opt.items()}
    _, (d_params, d_opt) = jvp(lambda p, o: pop.functional_step(p, o, x, y), (pop.params, opt), (tangent, tangents))
    if factors is not None:  # θ + c(O(θ) − θ) has Jacobian I + c(J − I)
        c = torch.as_tensor(factors, dtype=d_params.dtype, device=d_params.device)[:, None]
        d_params = tangent + c * (d_params - tangent)
    return d_params, d_opt


def second_order_local_step(model: nn.Module, optimizer: OptimizerSpec, states: torch.Tensor,
                            opt_state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, a: torch.Tensor,
                            opt_a: dict[str, torch.Tensor], b: torch.Tensor, opt_b: dict[str, torch.Tensor],
                            factors: np.ndarray | None = None, loss: Loss = CROSS_ENTROPY):
    """One second-order step of P participants' perturbations (rows of ``states`` [P, D], minibatches x [P, B, ...],
    y [P, B]): returns ((J a [P, D_params], its optimizer part), (J b − ½ D²O[a, a] [P, D_params], its optimizer
    part)), O the whole local update (parameters and optimizer state; missing tangent entries: 0).

    One forward-over-forward pass along the path θ(ε) = θ + ε a − ε² b: d/dε O(θ(ε)) = J a and
    d²/dε² O(θ(ε)) = D²O[a, a] − 2 J b at ε = 0, so −½ of the second derivative is J b − ½ D²O[a, a].
    ``factors`` c [P]: participants that send θ + c(O(θ) − θ) (None: all 1).
    """
    pop = Population(model, states.clone(), optimizer, loss=loss)
    opt = {name: value.clone() for name, value in opt_state.items()}
    c = None if factors is None else torch.as_tensor(factors, dtype=a.dtype, device=a.device)[:, None]

    def along(eps: torch.Tensor):
        params = pop.params + eps * a - eps ** 2 * b
        state = {name: value + eps * opt_a[name] - eps ** 2 * opt_b[name] if name in opt_a else value
                 for name, value in opt.items()}
        new_params, new_state = pop.functional_step(params, state, x, y)
        if c is not None:
            new_params = params + c * (new_params - params)
        return new_params, {name: value for name, value in new_state.items() if name != "step"}

    zero, one = torch.zeros((), dtype=a.dtype, device=a.device), torch.ones((), dtype=a.dtype, device=a.device)
    with twice_differentiable_sqrt():
        first, second = jvp(lambda eps: jvp(along, (eps,), (one,))[1], (zero,), (one,))
    return first, (-0.5 * second[0], {name: -0.5 * value for name, value in second[1].items()})


class _MaskedSqrt:
    """√x with derivative 0 at x = 0 (as the optimizer's own square root) that nested forward mode differentiates
    correctly: √(where(x > 0, x, 1)) · [x > 0], the same values, built from plain torch operations."""

    @staticmethod
    def apply(x: torch.Tensor) -> torch.Tensor:
        positive = x > 0
        return torch.where(positive, x, torch.ones_like(x)).sqrt() * positive


@contextmanager
def twice_differentiable_sqrt() -> Iterator[None]:
    """Within the block, Adam's √v̂ (``population._Sqrt``) is ``_MaskedSqrt``.

    The optimizer's square root is an autograd.Function whose custom jvp reads its saved output as a constant, so
    a jvp of that jvp misses d²√v (measured: 2.6x off a finite difference of Adam's step). The values are the
    same; only the second-order forward passes of this module run inside this block (one thread per process).
    """
    from dice_ray.core import population

    saved = population._Sqrt
    population._Sqrt = _MaskedSqrt
    try:
        yield
    finally:
        population._Sqrt = saved


def zprime_hessian_forms(pop: Population, u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         shared_input: bool = False, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """uᵀ H′ v for every row of ``pop`` [P] (u, v: [P, D_params]): the mixed second derivative of the z′ loss
    (x, y, as ``Population.loss_and_grad`` takes them) at ``pop``'s parameters, in eval mode: the forward-mode
    derivative of the z′ gradient along u (H′u, rows independent) dotted with v. Measured 2x faster than a jvp
    of a jvp of the loss (digits MLP, 360-image z′)."""
    layout = pop.param_layout

    def losses(params: torch.Tensor) -> torch.Tensor:
        return pop._losses_of(layout.views(params), x, y, shared_input, sample_weights=sample_weights)

    was_training = pop.model.training
    pop.model.eval()
    try:
        hessian_u = jvp(grad(lambda p: losses(p).sum()), (pop.params,), (u,))[1]
        return (hessian_u * v).sum(dim=1).detach()
    finally:
        pop.model.train(was_training)


def shared_primal_hessian_forms(pop: Population, tangents: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                shared_input: bool = False,
                                sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """aᵀ H′ a for V tangents a per row of ``pop`` (``tangents`` [P, V, D_params]): [P, V], as
    ``zprime_hessian_forms`` computes them, with each row's primal pass (its z′ forward and backward) taken once
    for all its tangents instead of once per tangent. x, y (and ``sample_weights``): z′ as ``zprime_hessian_forms``
    takes them, per row [P, ...] unless ``shared_input``. Zero tangents give zero forms (padding)."""
    layout, buffer_layout = pop.param_layout, pop.buffer_layout

    def forms(params: torch.Tensor, buffers: torch.Tensor, row_tangents: torch.Tensor, xr, yr, wr) -> torch.Tensor:
        def loss(p: torch.Tensor) -> torch.Tensor:
            return pop._losses_of(layout.views(p[None]), xr if shared_input else xr[None],
                                  yr if shared_input else yr[None], shared_input, buffer_layout.views(buffers[None]),
                                  None if wr is None else wr[None]).sum()

        gradient = grad(loss)
        return vmap(lambda t: (jvp(gradient, (params,), (t,))[1] * t).sum())(row_tangents)

    row = None if shared_input else 0
    was_training = pop.model.training
    pop.model.eval()
    try:
        return vmap(forms, in_dims=(0, 0, 0, row, row, None if sample_weights is None else 0))(
            pop.params, pop.buffers, tangents, x, y, sample_weights).detach()
    finally:
        pop.model.train(was_training)


def update_difference(window: Window, source: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δ for the whole-batch probe (j, t0): the actual update θ_j^{t+½} − θ_j^t (parameters) and the
    change of j's optimizer state in that step (the counterfactual skips the step)."""
    traj = window.trajectory
    width = model_state_layouts(window.model)[0].width
    delta = (traj.halves[0][source, :width] - traj.states[0][source, :width]).clone()
    opt = {name: (traj.opt_states[1][name][source] - traj.opt_states[0][name][source]).clone()
           for name in traj.opt_states[0] if name != "step"}
    return delta, opt


def sample_update_difference(window: Window, source: int,
                             position: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δ of the single-sample probe (j, t0, z = sample ``position`` of j's minibatch), for DICE-E (concepts §4):
    ``sample_update`` at j's recorded state and minibatch of round t0."""
    traj = window.trajectory
    x, y = window.batches(traj.t0)
    factor = 1.0 if window.update_factors is None else float(window.update_factors[source])
    return sample_update(window.model, window.optimizer, traj.states[0][source],
                         {name: value[source] for name, value in traj.opt_states[0].items()}, x[source], y[source],
                         position, factor, window.loss)


def sample_update(model: nn.Module, optimizer: OptimizerSpec, state: torch.Tensor, opt_state: dict[str, torch.Tensor],
                  xb: torch.Tensor, yb: torch.Tensor, position: int,
                  factor: float = 1.0, loss: Loss = CROSS_ENTROPY) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Δ of removing sample ``position`` of the minibatch (``xb`` [B, ...], ``yb`` [B]) from one participant's
    local step at ``state`` [D] with optimizer state ``opt_state`` (concepts §4, single-sample probes).

    From per-sample gradients g_x: removing z changes the gradient by (g_z − ḡ)/(|B| − 1); Δ is the forward-mode
    derivative of the optimizer step in that direction (exactly −η (g_z − ḡ)/(|B| − 1) for SGD; parameters and
    optimizer state for the others). ``factor`` c: the participant sends θ + cΔ (misbehaviour; 1 if honest).
    """
    step, mean, direction = _sample_step(model, optimizer, state, opt_state, xb, yb, position, loss)
    _, (delta, opt_delta) = jvp(step, (mean,), (direction,))
    if factor != 1.0:  # a misbehaving source sends θ + cΔ
        delta = delta * factor
    return delta, opt_delta


def sample_second_order(model: nn.Module, optimizer: OptimizerSpec, state: torch.Tensor,
                        opt_state: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, position: int,
                        factor: float = 1.0,
                        loss: Loss = CROSS_ENTROPY) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """b₀: the second-order part of ``sample_update``'s Δ (same arguments), parameters [D_params] and optimizer state.

    Without z the step sees the gradient ḡ − d, d = (g_z − ḡ)/(|B| − 1), so Δ = step(ḡ) − step(ḡ − d)
    = D step[d] − ½ D²step[d, d] + O(d³): b₀ = −½ D²step[d, d] (forward-over-forward jvp). Zero for SGD and
    momentum (their step is linear in the gradient), nonzero for Adam.
    """
    step, mean, direction = _sample_step(model, optimizer, state, opt_state, xb, yb, position, loss)
    with twice_differentiable_sqrt():
        _, (second, opt_second) = jvp(lambda g: jvp(step, (g,), (direction,))[1], (mean,), (direction,))
    return -0.5 * factor * second, {name: -0.5 * value for name, value in opt_second.items()}


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
        return new_params[0], {name: value[0] for name, value in new_opt.items() if name != "step"}

    return step, mean, direction


def sample_second_order_difference(window: Window, source: int,
                                   position: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """b₀ of the single-sample probe (j, t0, sample ``position``): ``sample_second_order`` on the window."""
    traj = window.trajectory
    x, y = window.batches(traj.t0)
    factor = 1.0 if window.update_factors is None else float(window.update_factors[source])
    return sample_second_order(window.model, window.optimizer, traj.states[0][source],
                               {name: value[source] for name, value in traj.opt_states[0].items()}, x[source],
                               y[source], position, factor, window.loss)


def estimate_cascade(window: Window, source: int, delta: torch.Tensor, opt_delta: dict[str, torch.Tensor],
                     hops: int, variant: str = "curvature",
                     second: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
                     with_b: bool = True) -> Cascade:
    """Return DICE-E's cascade of a probe of participant ``source`` at round t0 with update difference
    ``delta`` [D_params] (and optimizer-state difference ``opt_delta``), for steps s = 1..hops.

    ``second-order`` only: ``second`` = b₀ (Δ's second-order part [D_params], its optimizer-state part; None:
    zero, as for a whole-batch probe); ``with_b`` False drops b everywhere (diagnostics: e = ∇ᵀa − ½ aᵀH′a).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
    if variant == "second-order":
        return _second_order_cascade(window, source, delta, opt_delta, hops, second, with_b)[0]
    traj = window.trajectory
    supports = reach(traj.mixing[:hops], source)
    half = float(window.test_gradients(0, np.array([source]))[0] @ delta)
    values = [np.zeros(1)]
    w0 = traj.mixing[0]
    column = np.asarray(w0[supports[1]][:, [source]].todense()).ravel()
    perturbation = torch.as_tensor(column, dtype=delta.dtype, device=delta.device)[:, None] * delta  # δ^{(1)} on S_1
    at_source = torch.as_tensor(supports[1] == source, device=delta.device)
    opt_perturbation = {name: torch.zeros(len(supports[1]), *value.shape, dtype=value.dtype, device=value.device)
                        for name, value in opt_delta.items()}
    for name, value in opt_delta.items():
        opt_perturbation[name][at_source] = value
    for s in range(1, hops + 1):
        rows = supports[s]
        values.append((window.test_gradients(s, rows) * perturbation).sum(dim=1).cpu().numpy())
        if s == hops:
            break
        if variant == "curvature":
            stepped, opt_stepped = window.jvp_step(s, rows, perturbation, opt_perturbation)
        else:
            stepped, opt_stepped = perturbation, {}
        w = sp.csr_array(traj.mixing[s][supports[s + 1]][:, rows])
        perturbation = torch.as_tensor(w.toarray(), dtype=stepped.dtype, device=stepped.device) @ stepped
        # S_s ⊆ S_{s+1}; optimizer state stays with its owner
        keep = torch.as_tensor(np.searchsorted(supports[s + 1], rows), device=stepped.device)
        opt_perturbation = _moved(opt_stepped, keep, len(supports[s + 1]))
    return Cascade(source, half, supports, values)


def estimate_cascades(window: Window, source: int, delta: torch.Tensor, opt_delta: dict[str, torch.Tensor],
                      hops: int, variants: list[str],
                      second: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
                      with_b: bool = True) -> dict[str, Cascade]:
    """``estimate_cascade`` of every variant in ``variants`` (variant -> ``Cascade``), the probe's a propagated once:
    with ``second-order``, ``curvature``'s cascade is read off its first-order part a (∇ᵀa at every step).
    ``with_b`` False: second-order without b (``influence.second_order_b``)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"variant {unknown[0]!r} is unknown; choose one of {', '.join(VARIANTS)}")
    out: dict[str, Cascade] = {}
    if "second-order" in variants:
        out["second-order"], curvature = _second_order_cascade(window, source, delta, opt_delta, hops, second, with_b)
        if "curvature" in variants:
            out["curvature"] = curvature
    for v in variants:
        if v not in out:
            out[v] = estimate_cascade(window, source, delta, opt_delta, hops, v)
    return {v: out[v] for v in variants}


def _second_order_cascade(window: Window, source: int, delta: torch.Tensor, opt_delta: dict[str, torch.Tensor],
                          hops: int, second: tuple[torch.Tensor, dict[str, torch.Tensor]] | None,
                          with_b: bool) -> tuple[Cascade, Cascade]:
    """``estimate_cascade`` for ``second-order`` (module docstring): a, b [|S_s|, D_params] and their optimizer
    parts on S_s; e₂ = ∇ᵀ(a + b) − ½ aᵀH′a per row. Returns (that cascade, the curvature cascade ∇ᵀa of the same a)."""
    traj = window.trajectory
    supports = reach(traj.mixing[:hops], source)
    j = np.array([source])
    b0, opt_b0 = second if second is not None and with_b else (torch.zeros_like(delta), {})
    width = delta.shape[0]
    update = (traj.halves[0][source, :width] - traj.states[0][source, :width])[None]  # u, the factual update
    # The z′ Hessian forms of every step are taken together at the end (rows at different rounds, one pass):
    # (round, rows, u, v) per step, the direct term's a₀ᵀH′(u − ½ a₀) first.
    forms: list[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]] = [(0, j, delta[None], update - 0.5 * delta[None])]
    gradient = window.test_gradients(0, j)[0]
    linear, curvature = [gradient @ (delta + b0)], [gradient @ delta]
    column = torch.as_tensor(np.asarray(traj.mixing[0][supports[1]][:, [source]].todense()).ravel(),
                             dtype=delta.dtype, device=delta.device)[:, None]
    a, b = column * delta, column * b0  # a^{(1)}, b^{(1)} on S_1
    at_source = torch.as_tensor(supports[1] == source, device=delta.device)
    opt_a = {name: torch.where(at_source[:, None], value, torch.zeros_like(value)) for name, value in opt_delta.items()}
    opt_b = {name: torch.where(at_source[:, None], opt_b0[name], torch.zeros_like(value)) if name in opt_b0 else
             torch.zeros(len(supports[1]), *value.shape, dtype=value.dtype, device=value.device)
             for name, value in opt_delta.items()}
    values = [np.zeros(1)]
    for s in range(1, hops + 1):
        rows = supports[s]
        gradients = window.test_gradients(s, rows)
        linear.append((gradients * (a + b)).sum(dim=1))
        curvature.append((gradients * a).sum(dim=1))
        forms.append((s, rows, a, -0.5 * a))
        if s == hops:
            break
        if with_b:
            (a, opt_a), (b, opt_b) = window.second_order_step(s, rows, a, opt_a, b, opt_b)
        else:
            a, opt_a = window.jvp_step(s, rows, a, opt_a)
        w = torch.as_tensor(sp.csr_array(traj.mixing[s][supports[s + 1]][:, rows]).toarray(), dtype=a.dtype,
                            device=a.device)
        # optimizer state stays with its owner
        keep = torch.as_tensor(np.searchsorted(supports[s + 1], rows), device=a.device)
        a, b = w @ a, w @ b
        opt_a, opt_b = (_moved(opt, keep, len(supports[s + 1])) for opt in (opt_a, opt_b))
    quadratic = window.stacked_hessian_forms(forms)
    values += [(value + form).cpu().numpy() for value, form in zip(linear[1:], quadratic[1:], strict=True)]
    return (Cascade(source, float(linear[0] + quadratic[0][0]), supports, values),
            Cascade(source, float(curvature[0]), supports,
                    [np.zeros(1)] + [value.cpu().numpy() for value in curvature[1:]]))


def _moved(opt: dict[str, torch.Tensor], keep: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Optimizer-state rows placed at positions ``keep`` of ``size`` rows (zero elsewhere), on their device."""
    out = {}
    for name, value in opt.items():
        out[name] = torch.zeros(size, *value.shape[1:], dtype=value.dtype, device=value.device)
        out[name][keep] = value
    return out


def first_order_all_sources(window: Window, deltas: torch.Tensor, hops: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """First-order DICE-E of the whole-batch probes of every source at round t0, for every target and step.

    deltas: [N, D_params], row j = Δ_j. Returns (half [N]: e_j^{(½)}, values: for s = 1..hops an [N, N] array
    with values[s-1][k, j] = (W^{t+s-1} ⋯ W^t)_{kj} ∇L(θ_k^{t+s}; z′)ᵀ Δ_j). With J = I the perturbation of
    every source is a column of the product of mixing matrices, so all sources share the same N test
    gradients per step: the cost is the N·R test gradients plus R [N, D] x [D, N] products.
    """
    traj = window.trajectory
    n = deltas.shape[0]
    everyone = np.arange(n)
    half = (window.test_gradients(0, everyone) * deltas).sum(dim=1).cpu().numpy()
    product = np.eye(n)
    values = []
    for s in range(1, hops + 1):
        product = traj.mixing[s - 1] @ product
        inner = (window.test_gradients(s, everyone) @ deltas.T).cpu().numpy()
        values.append(np.asarray(product) * inner)
    return half, values
