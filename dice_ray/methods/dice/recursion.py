"""The DICE-E recursion (concepts §4), written once: start, step through J, gossip, readout.

For a probe (j, t) with update difference Δ (the state — parameters, and BatchNorm's running statistics where the
model has them, D columns — and the optimizer state) the perturbation δ travels

    start:    δ^{(1)}_k = W^t_kj Δ                          (Δ on row j, then ``gossip``)
    step:     (J δ)_l = J_l^{t+s} δ_l^{(s)}                  (``local_step``; J = I for first order: ``identity_step``)
    gossip:   δ^{(s+1)}_k = Σ_l W^{t+s}_kl (J δ)_l           (``gossip``; optimizer state stays with its owner)
    readout:  e_k^{(s)} = ∇L(θ_k^{t+s}; z′)ᵀ δ_k^{(s)}       (``Readout``; ``SecondOrderReadout`` adds −½ aᵀH′a;
                                                             ``ExactReadout``: L(θ_k; z′) − L(θ_k − δ_k; z′))

J_l is the Jacobian of l's local step O_l (state and optimizer state) at the factual θ_l: a forward-mode derivative
through the optimizer (``jvp_local_step``; for SGD δ − η H δ, one Hessian-vector product), and through the running
statistics' move toward the batch's (``Population.functional_state_step``; the parameters' step reads the batch
statistics, not the running ones). Where the update reads the step counter (Adam), a whole-batch probe's
counterfactual skipped a step, so j's counter stays one behind: δ carries that lag (``COUNTER`` in its optimizer
part, with its owner), J_j is taken at the lagging counter, and every later step of j adds the exact difference
O_j(θ_j, n) − O_j(θ_j, n − 1) (``counter_difference``). For second order δ = a + b, b the O(Δ²) part: one nested
forward-mode pass gives (J a, J b − ½ D²O[a, a]) (``second_order_local_step``), gossip mixes b like a, and the
readout is e₂ = ∇ᵀ(a + b) − ½ aᵀH′a.

Two drivers run these pieces: ``estimator.estimate_cascades`` over a recorded window (replayed estimates) and
``online.OnlineCascades`` over the live participant block (in-loop DICE-E and the contribution ledger's
curvature, second-order and exact-readout variants). A readout is a small class beside the others: ``linear`` reads
δ off the z′ gradient, ``form`` names what else of the z′ loss the driver adds — a Hessian form (``HessianForm``) or a
loss difference (``LossDifference``), each driver evaluating every probe's request of a round in batched passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.func import jvp

from dice_ray.core.losses import CROSS_ENTROPY, Loss
from dice_ray.core.population import OptimizerSpec, Population


@dataclass
class HessianForm:
    """A readout's request: add c · uᵀH′(θ_k; z′)v per row (u, v [m, D]; H′ the Hessian of the z′ loss)."""

    u: torch.Tensor
    v: torch.Tensor
    c: float


@dataclass
class LossDifference:
    """A readout's request: add L(θ_k + shift; z′) − L(θ_k + shift − δ; z′) per row (δ, shift [m, D]; shift
    None: 0, and L(θ_k; z′) is evaluated once per target and step, shared by every probe that reads there)."""

    delta: torch.Tensor
    shift: torch.Tensor | None = None


Form = HessianForm | LossDifference


@dataclass
class Perturbation:
    """δ on m rows: ``a`` [m, D] and its optimizer part ``opt_a`` (name -> [m, ...]; not gossiped); for second
    order also ``b`` [m, D], the O(Δ²) part, and ``opt_b`` (None and {} when b is not carried)."""

    a: torch.Tensor
    opt_a: dict[str, torch.Tensor] = field(default_factory=dict)
    b: torch.Tensor | None = None
    opt_b: dict[str, torch.Tensor] = field(default_factory=dict)

    def take(self, index: torch.Tensor | slice) -> Perturbation:
        """The rows ``index`` of δ."""
        return Perturbation(self.a[index], {n: v[index] for n, v in self.opt_a.items()},
                            None if self.b is None else self.b[index], {n: v[index] for n, v in self.opt_b.items()})

    def clone(self) -> Perturbation:
        """A copy of δ that owns its memory."""
        return Perturbation(self.a.clone(), {n: v.clone() for n, v in self.opt_a.items()},
                            None if self.b is None else self.b.clone(), {n: v.clone() for n, v in self.opt_b.items()})

    @staticmethod
    def cat(parts: list[Perturbation]) -> Perturbation:
        """The rows of ``parts`` one after the other (all carry the same parts)."""
        first = parts[0]
        return Perturbation(torch.cat([p.a for p in parts]), {n: torch.cat([p.opt_a[n] for p in parts])
                                                              for n in first.opt_a},
                            None if first.b is None else torch.cat([p.b for p in parts]),
                            {n: torch.cat([p.opt_b[n] for p in parts]) for n in first.opt_b})


def start(delta: torch.Tensor, opt_delta: dict[str, torch.Tensor], b0: torch.Tensor | None = None,
          opt_b0: dict[str, torch.Tensor] | None = None) -> Perturbation:
    """δ on the source rows, before the first gossip: a = Δ [m, D] with its optimizer part, and b = b₀
    (None: not carried; its optimizer part defaults to 0). ``gossip`` turns it into δ^{(1)} = W^t_{·j} Δ."""
    if b0 is None:
        return Perturbation(delta, dict(opt_delta))
    opt_b0 = {} if opt_b0 is None else opt_b0
    return Perturbation(delta, dict(opt_delta), b0,
                        {n: opt_b0[n] if n in opt_b0 else torch.zeros_like(v) for n, v in opt_delta.items()})


# The step counter's entry of an optimizer state. A perturbation carries it only where the update reads it
# (``OptimizerSpec.counts_steps``): the factual counter minus the counterfactual one, 1 on a row whose counterfactual
# skipped a step (a whole-batch probe's source), 0 elsewhere.
COUNTER = "step"


Stepped = tuple[torch.Tensor, dict[str, torch.Tensor]]  # a stepped direction [P, D] and its optimizer part


def carried_state(optimizer: OptimizerSpec, names: Iterable[str]) -> list[str]:
    """The optimizer-state entries ``names`` a perturbation carries: all but the step counter, unless the update reads
    it (Adam), when its lag is carried too."""
    return [n for n in names if n != COUNTER or optimizer.counts_steps]


@dataclass
class LocalSteps:
    """The local steps O_l of P participants at one round: states [P, D] and optimizer states (name -> [P, ...]) of
    ``model`` under ``optimizer``, minibatches x [P, B, ...], y [P, B]; ``factors`` c [P] of participants that send
    θ + c(O(θ) − θ) (None: all 1); ``idle`` bool [P]: participants with no data, whose local step is the identity
    (they do not step: θ^{t+½} = θ^t, optimizer state unchanged; None: none)."""

    model: nn.Module
    optimizer: OptimizerSpec
    states: torch.Tensor
    opt_state: dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    factors: np.ndarray | None = None
    loss: Loss = CROSS_ENTROPY
    idle: np.ndarray | None = None


def identity_step(delta: Perturbation) -> Perturbation:
    """J = I (first order): only communication carries δ; no optimizer part travels."""
    return Perturbation(delta.a)


def local_step(steps: LocalSteps, delta: Perturbation) -> Perturbation:
    """J δ through ``steps``: J a (curvature), or with b (J a, J b − ½ D²O[a, a]) in one nested pass. Rows of idle
    participants (``steps.idle``) keep δ as it is: their local step is the identity. Rows whose counterfactual step
    counter lags (δ's ``COUNTER``, Adam) step at the lagging counter, and a gains the counter's own difference
    (``counter_difference``): O(θ, n) − O(θ − δ, n − 1) = [O(θ, n) − O(θ, n − 1)] + J_{n−1} δ − ½ D²O_{n−1}[δ, δ] + …"""
    lag = delta.opt_a.get(COUNTER)
    moving = delta  # what J steps: δ without the counter's lag, which is no direction to differentiate along
    if lag is not None:
        moving = Perturbation(delta.a, {n: v for n, v in delta.opt_a.items() if n != COUNTER}, delta.b,
                              {n: v for n, v in delta.opt_b.items() if n != COUNTER})
        lagging = steps.opt_state[COUNTER] - lag.to(steps.opt_state[COUNTER].dtype)
        steps = replace(steps, opt_state={**steps.opt_state, COUNTER: lagging})
    if moving.b is None:
        a, opt_a = jvp_local_step(steps, moving.a, moving.opt_a)
        stepped = Perturbation(a, {n: v for n, v in opt_a.items() if n != COUNTER})
    else:
        (a, opt_a), (b, opt_b) = second_order_local_step(steps, moving.a, moving.opt_a, moving.b, moving.opt_b)
        stepped = Perturbation(a, opt_a, b, opt_b)
    if lag is not None:
        rows = torch.nonzero(lag).flatten()
        if len(rows):
            d_params, d_opt = counter_difference(steps, rows, lag[rows])
            stepped.a = stepped.a.index_add(0, rows, d_params.to(stepped.a.dtype))
            stepped.opt_a = {n: v.index_add(0, rows, d_opt[n].to(v.dtype)) if n in d_opt else v
                             for n, v in stepped.opt_a.items()}
        stepped.opt_a[COUNTER] = lag  # both runs step from here on: the lag stays
        if stepped.b is not None:
            stepped.opt_b[COUNTER] = torch.zeros_like(lag)
    if steps.idle is None or not steps.idle.any():
        return stepped
    idle = torch.as_tensor(steps.idle, device=stepped.a.device)

    def kept(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
        old = torch.zeros_like(new) if old is None else old
        return torch.where(idle.reshape(-1, *[1] * (new.dim() - 1)), old.to(new.dtype), new)

    return Perturbation(kept(stepped.a, delta.a), {n: kept(v, delta.opt_a.get(n)) for n, v in stepped.opt_a.items()},
                        None if stepped.b is None else kept(stepped.b, delta.b),
                        {n: kept(v, delta.opt_b.get(n)) for n, v in stepped.opt_b.items()})


def counter_difference(steps: LocalSteps, rows: torch.Tensor,
                       lag: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """O_l(θ_l, n_l + lag_l) − O_l(θ_l, n_l) for ``rows`` of ``steps`` (whose counters n are the lagging ones): the
    change of the update itself (parameters [m, D], and the optimizer state but the counter) that a counter
    ``lag`` steps ahead makes at the factual state, exact, not expanded; θ + c(O(θ) − θ) scales it by c."""
    pop = Population(steps.model, steps.states[rows].clone(), steps.optimizer, loss=steps.loss)
    behind = {name: value[rows] for name, value in steps.opt_state.items()}
    ahead = {**behind, COUNTER: behind[COUNTER] + lag.to(behind[COUNTER].dtype)}
    x, y = steps.x[rows], steps.y[rows]
    state_ahead, opt_ahead = pop.functional_state_step(pop.state, ahead, x, y)
    state_behind, opt_behind = pop.functional_state_step(pop.state, behind, x, y)
    d_state = state_ahead - state_behind  # the running statistics do not read the counter: 0 there
    if steps.factors is not None:  # what c scales: the parameters' change, as ``sent`` does
        d_state = sent(replace(steps, factors=steps.factors[rows.cpu().numpy()]), torch.zeros_like(d_state), d_state,
                       pop.param_layout.width)
    return d_state, {n: opt_ahead[n] - opt_behind[n] for n in opt_ahead if n != COUNTER}


def gossip(parts: list[tuple[torch.Tensor, Perturbation]], own: Perturbation, keep: torch.Tensor,
           size: int) -> Perturbation:
    """δ^{(s+1)}_k = Σ_l W_kl (J δ)_l on ``size`` rows: a (and b) mixed over ``parts`` (w [size, m_b] rows of W, the
    stepped δ of those m_b rows), summed in order. Optimizer state is not gossiped: ``own`` (the stepped δ of the
    rows that live here) keeps its optimizer parts, at rows ``keep`` of the new support (zero elsewhere)."""
    def mixed(part: str) -> torch.Tensor:
        total = torch.zeros(size, own.a.shape[1], dtype=own.a.dtype, device=own.a.device) if not parts else None
        for w, delta in parts:
            value = getattr(delta, part)
            product = w.to(value.dtype) @ value
            total = product if total is None else total + product
        return total

    return Perturbation(mixed("a"), stay_with_owner(own.opt_a, keep, size),
                        None if own.b is None else mixed("b"), stay_with_owner(own.opt_b, keep, size))


def stay_with_owner(opt: dict[str, torch.Tensor], keep: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """Optimizer-state rows placed at positions ``keep`` of ``size`` rows (zero elsewhere), on their device: the
    optimizer state stays with its owner, which is not gossiped."""
    out = {}
    for name, value in opt.items():
        out[name] = torch.zeros(size, *value.shape[1:], dtype=value.dtype, device=value.device)
        out[name][keep] = value
    return out


class Readout:
    """First order (and the curvature variant's): e_k = ∇L(θ_k; z′)ᵀ δ_k, the same for the direct term e_j^{(½)}."""

    def linear(self, gradients: torch.Tensor, delta: Perturbation) -> torch.Tensor:
        """The part of e read off ∇L(θ_k; z′) [m, D]: [m]."""
        return (gradients * delta.a).sum(dim=1)

    def form(self, delta: Perturbation, update: torch.Tensor | None = None) -> Form | None:
        """What of the z′ loss the driver adds to ``linear`` (None: nothing); ``update`` u [m, D] is given for
        the direct term (read at θ_j^t, u the source's factual update)."""
        return None


class SecondOrderReadout(Readout):
    """e₂_k = ∇ᵀ(a + b) − ½ aᵀH′a; direct term e₂_j^{(½)} = ∇ᵀ(a₀ + b₀) + a₀ᵀH′(u − ½ a₀) (H′ at the factual θ)."""

    def linear(self, gradients: torch.Tensor, delta: Perturbation) -> torch.Tensor:
        return (gradients * (delta.a if delta.b is None else delta.a + delta.b)).sum(dim=1)

    def form(self, delta: Perturbation, update: torch.Tensor | None = None) -> Form | None:
        if update is None:
            return HessianForm(delta.a, delta.a, -0.5)
        return HessianForm(delta.a, update - 0.5 * delta.a, 1.0)


class ExactReadout(Readout):
    """e_x = L(θ_k; z′) − L(θ_k − δ; z′), δ = a (+ b when carried): the loss itself instead of a Taylor polynomial,
    one forward pass over z′ per row. Direct term at θ_j^t: e_x^{(½)} = L(θ_j^t + u; z′) − L(θ_j^t + u − δ; z′),
    around the state without z as second order's is (u = δ = Δ for a whole batch: DICE-GT's d_j^{(½)} itself)."""

    def linear(self, gradients: torch.Tensor, delta: Perturbation) -> torch.Tensor:
        return torch.zeros(delta.a.shape[0], dtype=delta.a.dtype, device=delta.a.device)

    def form(self, delta: Perturbation, update: torch.Tensor | None = None) -> Form | None:
        return LossDifference(delta.a if delta.b is None else delta.a + delta.b, update)


READOUTS: dict[str, Readout] = {"first-order": Readout(), "curvature": Readout(), "second-order": SecondOrderReadout(),
                                "exact-readout": ExactReadout()}
# The variants whose readout reads b (δ = a + b) when the run carries it: ``second_order_b``, ``exact_readout_b``.
READS_B = ("second-order", "exact-readout")


def read_by(delta: Perturbation, with_b: bool) -> Perturbation:
    """δ as a readout sees it: itself, or without b (``with_b`` False: a variant whose b is off, though another
    variant of the run carries it)."""
    return delta if with_b or delta.b is None else Perturbation(delta.a, delta.opt_a)


def jvp_local_step(steps: LocalSteps, tangent: torch.Tensor,
                   opt_tangent: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J δ: the forward-mode derivative of the local steps ``steps`` along (``tangent`` [P, D],
    ``opt_tangent``; missing optimizer entries: 0); returns (J δ [P, D], its optimizer part)."""
    pop = Population(steps.model, steps.states.clone(), steps.optimizer, loss=steps.loss)
    opt = {name: value.clone() for name, value in steps.opt_state.items()}
    tangents = {name: opt_tangent.get(name, torch.zeros_like(value)) for name, value in opt.items()}
    _, (d_state, d_opt) = jvp(lambda p, o: pop.functional_state_step(p, o, steps.x, steps.y), (pop.state, opt),
                              (tangent, tangents))
    return sent(steps, tangent, d_state, pop.param_layout.width), d_opt


def sent(steps: LocalSteps, before: torch.Tensor, after: torch.Tensor, width: int) -> torch.Tensor:
    """What participants send after stepping ``before`` to ``after`` ([P, D], or tangents of them): θ + c(O(θ) − θ)
    on the parameter columns (the first ``width``) of participants with a factor c (``steps.factors``; Jacobian
    I + c(J − I)); the running statistics as stepped."""
    if steps.factors is None:
        return after
    c = torch.as_tensor(steps.factors, dtype=after.dtype, device=after.device)[:, None]
    params = before[:, :width] + c * (after[:, :width] - before[:, :width])
    return torch.cat([params, after[:, width:]], dim=1)


def second_order_local_step(steps: LocalSteps, a: torch.Tensor, opt_a: dict[str, torch.Tensor], b: torch.Tensor,
                            opt_b: dict[str, torch.Tensor]) -> tuple[Stepped, Stepped]:
    """One second-order step of P participants' perturbations: returns ((J a [P, D], its optimizer part),
    (J b − ½ D²O[a, a] [P, D], its optimizer part)), O the whole local update (parameters and optimizer
    state; missing tangent entries: 0).

    One forward-over-forward pass along the path θ(ε) = θ + ε a − ε² b: d/dε O(θ(ε)) = J a and
    d²/dε² O(θ(ε)) = D²O[a, a] − 2 J b at ε = 0, so −½ of the second derivative is J b − ½ D²O[a, a].
    """
    pop = Population(steps.model, steps.states.clone(), steps.optimizer, loss=steps.loss)
    opt = {name: value.clone() for name, value in steps.opt_state.items()}

    def along(eps: torch.Tensor):
        state = pop.state + eps * a - eps ** 2 * b
        opt_state = {name: value + eps * opt_a[name] - eps ** 2 * opt_b[name] if name in opt_a else value
                     for name, value in opt.items()}
        new_state, new_opt = pop.functional_state_step(state, opt_state, steps.x, steps.y)
        return (sent(steps, state, new_state, pop.param_layout.width),
                {name: value for name, value in new_opt.items() if name != COUNTER})

    zero, one = torch.zeros((), dtype=a.dtype, device=a.device), torch.ones((), dtype=a.dtype, device=a.device)
    with twice_forward_differentiable():
        first, second = jvp(lambda eps: jvp(along, (eps,), (one,))[1], (zero,), (one,))
    return first, (-0.5 * second[0], {name: -0.5 * value for name, value in second[1].items()})


class _MaskedSqrt:
    """√x with derivative 0 at x = 0 (as the optimizer's own square root) that nested forward mode differentiates
    correctly: √(where(x > 0, x, 1)) · [x > 0], the same values, built from plain torch operations."""

    @staticmethod
    def apply(x: torch.Tensor) -> torch.Tensor:
        positive = x > 0
        return torch.where(positive, x, torch.ones_like(x)).sqrt() * positive


def _layer_norm(input: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` in plain tensor operations."""
    return _affine(_normalized(input, tuple(range(-len(normalized_shape), 0)), eps), weight, bias, None)


def _batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor | None:
    """``F.batch_norm`` in plain tensor operations, where it writes no running statistics (None where it would)."""
    channels = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        if running_mean is not None:
            return None
        out = _normalized(input, (0, *range(2, input.dim())), eps)
    else:
        out = (input - running_mean.view(channels)) / torch.sqrt(running_var.view(channels) + eps)
    return _affine(out, weight, bias, channels)


def _instance_norm(input: torch.Tensor, running_mean: torch.Tensor | None = None,
                   running_var: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, use_input_stats: bool = True, momentum: float = 0.1,
                   eps: float = 1e-5) -> torch.Tensor | None:
    """``F.instance_norm`` in plain tensor operations, where it reads and writes no running statistics (None where
    it would)."""
    if running_mean is not None or not use_input_stats:
        return None
    channels = [1, -1] + [1] * (input.dim() - 2)
    return _affine(_normalized(input, tuple(range(2, input.dim())), eps), weight, bias, channels)


def _normalized(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x − mean) / √(var + ε) over ``dims`` (the biased variance, as the kernels normalize)."""
    centered = x - x.mean(dims, keepdim=True)
    return centered / torch.sqrt((centered * centered).mean(dims, keepdim=True) + eps)


def _affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            shape: list[int] | None) -> torch.Tensor:
    """x · weight + bias, the per-channel vectors viewed as ``shape`` (None: as they are)."""
    if weight is not None:
        x = x * (weight if shape is None else weight.view(shape))
    if bias is not None:
        x = x + (bias if shape is None else bias.view(shape))
    return x


def _torch_order(plain, names: tuple[str, ...]):
    """``plain`` (an ``F.*`` signature) for the ``torch.*`` form of the same function, whose arguments come in the
    order ``names`` (its last, cudnn's switch, ignored)."""
    def call(*args, **kwargs):
        bound = dict(zip(names, args, strict=False)) | kwargs
        bound.pop("cudnn_enabled", None), bound.pop("cudnn_enable", None)
        return plain(**bound)
    return call


_PLAIN = {
    torch.nn.functional.layer_norm: _layer_norm,
    torch.layer_norm: _torch_order(_layer_norm, ("input", "normalized_shape", "weight", "bias", "eps")),
    torch.nn.functional.batch_norm: _batch_norm,
    torch.batch_norm: _torch_order(_batch_norm, ("input", "weight", "bias", "running_mean", "running_var",
                                                 "training", "momentum", "eps")),
    torch.nn.functional.instance_norm: _instance_norm,
    torch.instance_norm: _torch_order(_instance_norm, ("input", "weight", "bias", "running_mean", "running_var",
                                                       "use_input_stats", "momentum", "eps")),
}


class _PlainNormalization(torch.overrides.TorchFunctionMode):
    """Layer, batch and instance normalization computed from plain tensor operations (the same values, to float
    rounding): torch's kernels have nested forward-mode derivatives that are wrong (measured in float64 against
    forward-over-reverse and finite differences: 7.18 for 6.69, −8.03 for −8.30; pytorch/pytorch#196700, #196699).
    A call these forms do not cover (one that reads or writes running statistics in training) runs torch's own."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plain = _PLAIN.get(func)
        out = None if plain is None else plain(*args, **kwargs)
        return func(*args, **kwargs) if out is None else out


@contextmanager
def twice_forward_differentiable() -> Iterator[None]:
    """Within the block, what torch's nested forward mode gets wrong is computed from plain operations that it
    differentiates correctly: Adam's √v̂ (``population._Sqrt``) is ``_MaskedSqrt``, and layer, batch and instance
    normalization are ``_PlainNormalization``'s. The values are the same.

    The optimizer's square root is an autograd.Function whose custom jvp reads its saved output as a constant, so
    a jvp of that jvp misses d²√v (measured: 2.6x off a finite difference of Adam's step). Only the second-order
    forward passes (this module's and ``estimator.sample_second_order``) run inside this block (one thread per
    process: the square root is swapped for the process; the function mode holds for this thread).
    """
    from dice_ray.core import population

    saved = population._Sqrt
    population._Sqrt = _MaskedSqrt
    try:
        with _PlainNormalization():
            yield
    finally:
        population._Sqrt = saved
