"""DICE-E inside the round loop (``influence.online``): each probe's perturbation travels with the training run.

The recursion of ``recursion.py`` (concepts §4: start, step through J, gossip, readout), run forward by the
participant groups as the rounds happen instead of on a replayed window afterwards. For a whole-batch probe
(j, t) and round u = t + s:

1. at the start of round u (θ = θ^u) every group hosting a participant k of the probe's support S_s records
   e_k^{(s)} = ∇L(θ_k^u; z′)ᵀ δ_k^{(s)}; for s < R it then takes the step's Jacobian along δ — for
   ``curvature`` J_k^u δ_k by forward-mode differentiation through k's local step on z_k^u (one batched
   Hessian-vector product over every probe's rows), for ``first-order`` δ itself (J = I: δ_k = c_k Δ_j, a scale
   per row times the source's update, ``ScaledUpdate``);
2. after the local step of the probe round (s = 0) the source's group takes Δ_j = θ_j^{t+½} − θ_j^t (and the
   optimizer-state change), records e_j^{(½)} and starts the probe with J δ := Δ_j on row j;
3. gossip mixes the stepped perturbations like the half-steps: δ_k^{(s+1)} = Σ_l W^u_kl (J δ)_l, with the blocks
   of other groups routed to the groups whose rows of W read them (first-order: only the scales c);
   S_{s+1} = S_s ∪ {k : W^u_kl ≠ 0, l ∈ S_s}.
   Optimizer-state perturbations stay with their owners (they are not gossiped).

The numbers are those of the replayed recursion (the same functions of ``recursion.py``; first-order's to
float32 rounding, its scales mixed before the dot product), whatever the number of groups; a test compares them.
Δ_j and ∇L(θ^u; z′) come from the block's ``round_quantities``, shared with the block's other hooks. No window is
recorded and no run is replayed: the cost per round is one test-gradient pass over the hosted participants while a
probe is in flight, plus one Jacobian-vector product per (probe, participant reached) for ``curvature``. The
perturbations in flight are part of a group's checkpoint snapshot (``snapshot``/``restore``). Pure torch and
numpy: no Ray here.

``second-order`` carries, beside the curvature perturbation a (and its optimizer part), the O(Δ²) perturbation b
(and its optimizer part): step 1 takes (J a, J b − ½ D²O[a, a]) in one nested forward-mode pass
(``recursion.second_order_local_step``), gossip mixes b like a, and step 1 records
e₂ = ∇L(θ_k; z′)ᵀ(a + b) − ½ aᵀH′a (one more second-order pass of the z′ loss per probe and round). The source
starts it with b₀ (zero for a whole batch, ``estimator.sample_second_order`` for a single sample) and records
e₂_j^{(½)} at θ_j^t (``recursion.SecondOrderReadout``). Without b (``second_order_b`` false) a is stepped by the
curvature pass and b is not carried (nor gossiped, nor checkpointed).

``exact-readout`` reads the same perturbation (a, or a + b with ``exact_readout_b``) with the z′ loss itself:
e_x = L(θ_k; z′) − L(θ_k − δ; z′), L(θ_k; z′) evaluated once per hosted target and round and shared by every probe
in flight there, L(θ_k − δ; z′) one batched forward pass over every (probe, target) row (``_loss_differences``).
Its direct term is read at θ_j^t: L(θ_j^t + u; z′) − L(θ_j^t + u − δ; z′) (``recursion.ExactReadout``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dice_ray.core.misbehavior import misbehavior, sent_factors
from dice_ray.core.population import Population
from dice_ray.core.tensors import as_tensor, to_device
from dice_ray.hooks import DriverHook, Inbox, Method, RoundHook
from dice_ray.methods.dice import recursion
from dice_ray.methods.dice.estimator import (
    Cascade,
    moved,
    no_step_if_idle,
    reading_b,
    sample_second_order,
    sample_update,
    shared_primal_hessian_forms,
    zprime_hessian_forms,
)
from dice_ray.methods.dice.measure import COLUMNS, probe_rows, warn_unreadable
from dice_ray.methods.dice.probes import Probe, select_probes
from dice_ray.methods.dice.recursion import READOUTS, HessianForm, LossDifference, Perturbation, read_by
from dice_ray.methods.round_quantities import round_quantities
from dice_ray.results import DICE, INFLUENCE

FIELDS = ("probe_id", "step", "target", "first-order", "curvature", "second-order",
          "exact-readout")  # one recorded term per row
JVP_ELEMENTS = 1 << 23  # parameters (rows x D) per forward-mode pass of the curvature variant: ~32 MB a copy


def online_probes(config: Any) -> list[Probe]:
    """The probes measured in the loop: every probe of ``select_probes`` when ``influence.online``, else none."""
    inf = config.influence
    return select_probes(config) if inf.enabled and inf.online else []


def cascade_mixing(config: Any, probes: list[Probe], u: int) -> bool:
    """True iff some probe's perturbation is gossiped in round u (probe round t ≤ u ≤ t + R − 1)."""
    hops = config.influence.hops
    return any(p.round <= u < p.round + hops for p in probes)


def combine_cascade_terms(parts: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
    """Concatenate the groups' ``OnlineCascades.terms`` of one round (None if none recorded any)."""
    parts = [p for p in parts if p is not None]
    return {f: np.concatenate([p[f] for p in parts]) for f in FIELDS} if parts else None


def in_flight(probes: list[Probe], hops: int, u: int) -> list[int]:
    """Ids of the probes whose perturbation exists after round u's gossip (t ≤ u < t + R), ascending."""
    return [p.probe_id for p in probes if p.round <= u < p.round + hops]


class ProbeSchedule:
    """The probes an ``OnlineCascades`` follows, looked up by round and by id: here a list (``influence``'s
    probes); the contribution ledger's subclass computes every source's probe of every ledger round instead."""

    def __init__(self, probes: list[Probe]):
        self.probes = probes
        self._by_id = {p.probe_id: p for p in probes}
        self._by_round: dict[int, list[Probe]] = {}
        for p in probes:
            self._by_round.setdefault(p.round, []).append(p)

    def __bool__(self) -> bool:
        return bool(self.probes)

    def starting(self, u: int) -> list[Probe]:
        """The probes of round u (their perturbation starts with round u's update)."""
        return self._by_round.get(u, [])

    def round_of(self, probe_id: int) -> int:
        """The probe round t of probe ``probe_id``."""
        return self._by_id[probe_id].round

    def in_flight(self, hops: int, u: int) -> list[int]:
        """``in_flight`` of these probes."""
        return in_flight(self.probes, hops, u)


@dataclass
class ScaledUpdate:
    """The first-order variant's δ of one probe on m rows: the source's update Δ_j [D] scaled per row by ``c`` [m].
    J = I, so gossip mixes only the scales: δ_k^{(s+1)} = Σ_l W_kl c_l Δ_j. m numbers and one D-vector a probe
    instead of [m, D] (at N = 256 with 512 probes in flight the rows were 3.6 GB of the run's 8.5 GB)."""

    c: torch.Tensor  # [m]
    direction: torch.Tensor | None  # Δ_j [D]; None for no rows yet (``OnlineCascades._empty``)

    def take(self, index: torch.Tensor | slice) -> ScaledUpdate:
        return ScaledUpdate(self.c[index], self.direction)

    def read(self, gradients: torch.Tensor) -> torch.Tensor:
        """e_k = ∇L(θ_k; z′)ᵀ δ_k = c_k ∇L(θ_k; z′)ᵀ Δ_j of the rows' gradients [m, D]: [m]."""
        return self.c * (gradients @ self.direction)


@dataclass
class _Cascade:
    """One probe's perturbation on this block's participants ``rows`` (global ids, ascending) of S_s here: ``first``,
    the first-order variant's δ (a ``ScaledUpdate``; None when first-order is not recorded), and ``curved``, δ stepped
    through J — a with its optimizer part, and b where a variant reads it (None when no cascade variant, curvature,
    second-order or exact-readout, is recorded; a is carried for those even when curvature is not recorded)."""

    rows: np.ndarray
    first: ScaledUpdate | None
    curved: Perturbation | None
    new: np.ndarray | None = None  # [m] bool: row first reached at this step, k ∈ N^{(s)}(j) (None: unknown)

    def arrays(self) -> dict[str, torch.Tensor]:
        """What gossip mixes, by key: ``first-order`` (first's scales c [m]) with ``direction`` (Δ_j [D]),
        ``curvature`` (a), ``second-order`` (b)."""
        out = {} if self.first is None else {"first-order": self.first.c, "direction": self.first.direction}
        if self.curved is not None:
            out["curvature"] = self.curved.a
            if self.curved.b is not None:
                out["second-order"] = self.curved.b
        return out


class OnlineCascades:
    """The in-loop DICE-E of one ``ParticipantBlock`` (see the module docstring). Per round u: ``start(u)``
    before the local step, ``take_updates(u)`` after it, ``outgoing()`` (published for other groups) and
    ``mix(weights, ids, blocks)`` after gossip; ``terms()`` returns what the round recorded."""

    def __init__(self, block: Any, config: Any, probes: ProbeSchedule | None = None, hops: int | None = None,
                 variants: list[str] | None = None, zprime: str | None = None, first_reached_only: bool = False,
                 with_b: bool | None = None, exact_b: bool | None = None):
        """``probes``, ``hops``, ``variants``, ``zprime``, ``with_b`` (second-order reads b: ``second_order_b``),
        ``exact_b`` (exact-readout reads b: ``exact_readout_b``): default ``influence``'s (its in-loop probes);
        ``first_reached_only``: record e_k^{(s)} only for k ∈ N^{(s)}(j) (and the direct term), as the contribution
        ledger counts them, instead of every k of S_s."""
        self.block, self.config = block, config
        inf = config.influence
        self.hops = inf.hops if hops is None else hops
        self.variants = list(inf.variants if variants is None else variants)
        self.first_reached_only = first_reached_only
        self.second = "second-order" in self.variants
        # The variants that read b; b is carried through the local steps iff one does (else not at all)
        self.reads_b = reading_b(self.variants, inf.second_order_b if with_b is None else with_b,
                                 inf.exact_readout_b if exact_b is None else exact_b)
        self.with_b = any(self.reads_b.values())
        self.before = self.second or "exact-readout" in self.variants  # a direct term read at θ_j^t
        self.curved = self.before or "curvature" in self.variants  # a (and its optimizer part) is propagated
        # The perturbations carried (``_Cascade.arrays``' keys): a under "curvature", b under "second-order".
        self.keys = (["first-order"] if "first-order" in self.variants else []) + \
            (["curvature"] if self.curved else []) + (["second-order"] if self.with_b else [])
        self.probes = ProbeSchedule(online_probes(config)) if probes is None else probes
        # Blocks hold ascending global ids (``ActorPlan``: contiguous ranges), so rows kept in block order are
        # ascending too, and a source block's column of a global id is found by binary search.
        self.local = {int(k): i for i, k in enumerate(block.nodes.tolist())}
        self.zprime = inf.zprime if zprime is None else zprime
        self.shared = round_quantities(block)
        self.factors = sent_factors(misbehavior(config.misbehavior), block.nodes[block.misbehaving], block.misbehaving,
                                    block.size)
        self.active: dict[int, _Cascade] = {}
        self._out: dict[int, _Cascade] = {}  # stepped perturbations J δ of this round, before gossip
        self._new: list[Probe] = []
        self._gradients: torch.Tensor | None = None  # ∇L(θ_j^t; z′) of the new probes' sources
        self._samples: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._samples_b: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}  # b₀ of single samples
        self._before_state: torch.Tensor | None = None  # θ_j^t of the new probes' sources (second-order)
        # The terms recorded this round, on the block's device until ``terms()`` copies them to the host at once.
        self._terms: list[tuple[int, int, np.ndarray, dict[str, torch.Tensor]]] = []

    @property
    def enabled(self) -> bool:
        """True iff the run measures any probe in the loop."""
        return bool(self.probes)

    def _host_positions(self, rows: np.ndarray) -> np.ndarray:
        """The block's row positions of global ids ``rows``, on the host: computed there, never read back from the
        device (a read back waits for the device's queue)."""
        return np.fromiter((self.local[int(k)] for k in rows.tolist()), np.int64, len(rows))

    def _positions(self, rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """``_host_positions``, and the same as an index tensor on the block's device."""
        host = self._host_positions(rows)
        return host, torch.as_tensor(host, device=self.block.device)

    def _zprime(self, pos: torch.Tensor, states: torch.Tensor | None = None) -> tuple[Population, dict[str, Any]]:
        """The hosted rows ``pos`` as a population (at their current states, or ``states`` [m, D]) and their z′ as
        ``zprime_hessian_forms`` and ``shared_primal_hessian_forms`` take it (keyword arguments)."""
        block, pop = self.block, self.block.population
        sub = Population(pop.model, (pop.state[pos] if states is None else states).clone(), pop.optimizer,
                         loss=pop.loss)
        if self.zprime == "heldout":
            return sub, {"x": block.x_heldout, "y": block.y_heldout, "shared_input": True}
        return sub, {"x": block.x_val[pos], "y": block.y_val[pos], "sample_weights": block.val_mask[pos]}

    def _batched_forms(self, parts: list[tuple[np.ndarray, torch.Tensor]]) -> list[torch.Tensor]:
        """aᵀH′a [m] for each (hosted rows ``pos`` [m], on the host; a [m, D]) of ``parts`` (every probe in
        flight).

        The rows of one participant (one per probe that has reached it) share its primal z′ pass
        (``shared_primal_hessian_forms``; measured 1.3x faster forms at 10 probes per participant, 1.9x at 30):
        participants go in passes of up to JVP_ELEMENTS tangent parameters, by decreasing number of rows, each
        pass padded with zero tangents to its largest participant's rows.
        """
        if not parts:
            return []
        # Which rows share a participant, and in which passes, is index work on the host (no read back).
        pos = np.concatenate([p for p, _ in parts])
        a = torch.cat([a for _, a in parts])
        unique, inverse, counts = np.unique(pos, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")  # a row's slot among its participant's rows
        slot = np.empty_like(inverse)
        slot[order] = np.arange(len(pos)) - (np.cumsum(counts) - counts)[inverse[order]]
        out = torch.empty(len(pos), dtype=a.dtype, device=a.device)
        by_count = np.argsort(-counts, kind="stable")
        device = self.block.device
        start_at = 0
        while start_at < len(by_count):
            width = int(counts[by_count[start_at]])
            group = by_count[start_at: start_at + max(1, JVP_ELEMENTS // (width * a.shape[1]))]
            member = np.full(len(unique), -1, np.int64)
            member[group] = np.arange(len(group))
            rows = np.flatnonzero(member[inverse] >= 0)
            where = (torch.as_tensor(member[inverse[rows]], device=device), torch.as_tensor(slot[rows], device=device))
            rows = torch.as_tensor(rows, device=device)
            tangents = torch.zeros(len(group), width, a.shape[1], dtype=a.dtype, device=a.device)
            tangents[where] = a[rows]
            sub, zprime = self._zprime(torch.as_tensor(unique[group], device=device))
            out[rows] = shared_primal_hessian_forms(sub, tangents, **zprime)[where]
            start_at += len(group)
        return list(torch.split(out, [len(p) for p, _ in parts]))

    def _loss_differences(self, parts: list[tuple[torch.Tensor, LossDifference]], u: int | None = None,
                          states: torch.Tensor | None = None) -> list[torch.Tensor]:
        """L(θ_k + shift; z′) − L(θ_k + shift − δ; z′) [m] for each (hosted rows ``pos`` [m], request) of ``parts``,
        θ_k the rows' current states θ^u (or ``states``, aligned with the concatenated rows). Without shifts,
        L(θ_k^u; z′) is the block's ``round_quantities`` (once per participant and round, shared by every probe
        reading there); the moved states of every part go through one batched forward pass."""
        if not parts:
            return []
        pop = self.block.population
        pos = torch.cat([p for p, _ in parts])
        delta = torch.cat([r.delta for _, r in parts])
        base = pop.state[pos] if states is None else states
        if states is None and all(r.shift is None for _, r in parts):
            at, change = self.shared.losses(u, self.zprime)[pos], (-delta,)
        else:
            shift = torch.cat([torch.zeros_like(r.delta) if r.shift is None else r.shift for _, r in parts])
            at, change = self.shared.losses_at(pos, moved(base, shift), self.zprime), (shift, -delta)
        out = at - self.shared.losses_at(pos, moved(base, *change), self.zprime)
        return list(torch.split(out, [len(p) for p, _ in parts]))

    def _record(self, probe_id: int, step: int, rows: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        self._terms.append((probe_id, step, rows, {v: values[v] for v in self.variants}))

    def start(self, u: int) -> None:
        """Round u begins (θ = θ^u): record e^{(s)} of the probes in flight (each variant's readout, ``READOUTS``)
        and step their perturbations through J."""
        self._terms, self._out = [], {}
        self._new = [p for p in self.probes.starting(u) if int(p.source) in self.local]
        if not self.active and not self._new:
            return
        pop = self.block.population
        g = self.shared.gradients(u, self.zprime)
        stepping, recorded, asks, differences = [], [], [], []
        flights = []  # (probe id, cascade, hop, kept rows or None, rows read)
        for pid, c in sorted(self.active.items()):
            keep = c.new if self.first_reached_only and c.new is not None else None
            flights.append((pid, c, u - self.probes.round_of(pid), keep, c.rows if keep is None else c.rows[keep]))
        # Every probe's row positions, and its kept rows as indices made on the host (a boolean mask on the device
        # would be read back), go to the device in one copy, not one per probe.
        hosts = [self._host_positions(rows) for *_, rows in flights]
        kept_rows = [np.flatnonzero(keep) if keep is not None else np.zeros(0, np.int64) for *_, keep, _ in flights]
        uploaded = to_device([*hosts, *kept_rows], self.block.device)
        for (pid, c, s, keep, rows), host, pos, kept in zip(flights, hosts, uploaded[:len(flights)],
                                                            uploaded[len(flights):], strict=True):
            if len(rows):
                at = g[pos]
                kept = None if keep is None else kept
                values = {}
                for v in self.variants:
                    if v == "first-order":
                        values[v] = (c.first if kept is None else c.first.take(kept)).read(at)
                        continue
                    delta = read_by(c.curved, self.reads_b[v])
                    delta = delta if kept is None else delta.take(kept)
                    values[v] = READOUTS[v].linear(at, delta)
                    form = READOUTS[v].form(delta)
                    if isinstance(form, HessianForm):  # the H′ terms of every probe below, batched (aᵀH′a: u = v = a)
                        asks.append((len(recorded), v, form.c, host, form.u))
                    elif isinstance(form, LossDifference):  # the loss differences of every probe below, batched
                        differences.append((len(recorded), v, pos, form))
                recorded.append((pid, s, rows, values))
            if s < self.hops:
                stepping.append(pid)
        for (i, v, coefficient, _, _), form in zip(asks, self._batched_forms([(p, a) for *_, p, a in asks]),
                                                    strict=True):
            recorded[i][3][v] = recorded[i][3][v] + coefficient * form
        for (i, v, _, _), value in zip(differences, self._loss_differences([(p, r) for *_, p, r in differences], u),
                                       strict=True):
            recorded[i][3][v] = recorded[i][3][v] + value
        for pid, s, rows, values in recorded:
            self._record(pid, s, rows, values)
        cascades, self.active = [(pid, self.active[pid]) for pid in stepping], {}
        self._step(u, cascades)
        if self._new:
            host, pos = self._positions(np.array([p.source for p in self._new]))
            self.shared.keep_before(u, optimizer_state=self.curved)
            self._gradients = g[pos]
            self._samples = self._sample_updates(u, host)
            if self.before:
                self._before_state = pop.state[pos].clone()
            if self.with_b:
                self._samples_b = self._sample_updates(u, host, sample_second_order)

    def _sample_updates(self, u: int, pos: np.ndarray,
                        update: Callable = sample_update) -> dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Δ (and optimizer-state Δ) of the single-sample probes of round u, at θ^u (``estimator.sample_update``;
        ``update`` ``estimator.sample_second_order``: b₀)."""
        out = {}
        pop, x, y = self.block.population, None, None
        for i, p in enumerate(self._new):
            if p.sample_index is None:
                continue
            if x is None:
                x, y = self.block.minibatch(u)
            k = int(pos[i])
            factor = 1.0 if self.factors is None else float(self.factors[k])
            out[p.probe_id] = no_step_if_idle(k in self.block.idle, update(
                pop.model, pop.optimizer, pop.state[k], {n: v[k] for n, v in pop.opt_state.items()}, x[k], y[k],
                p.sample_index, factor, pop.loss))
        return out

    def _step(self, u: int, cascades: list[tuple[int, _Cascade]]) -> None:
        """J δ of every stepped cascade into ``self._out`` (``recursion.local_step``: one batched forward-mode pass
        over several probes' rows; J = I for first order)."""
        for pid, c in cascades:
            self._out[pid] = _Cascade(c.rows, c.first, None)  # J = I for first order: δ as it is
        if not self.curved or not cascades:
            return
        pop = self.block.population
        x, y = self.block.minibatch(u)
        # Several probes' rows at once, up to JVP_ELEMENTS parameters per forward-mode pass: the pass holds
        # several copies of its rows' parameters (primal, tangent, gradient and its tangent, the new state).
        limit = max(1, JVP_ELEMENTS // (pop.state.shape[1] * (2 if self.second or self.with_b else 1)))  # nested
        chunk: list[tuple[int, _Cascade]] = []
        for i, (pid, c) in enumerate(cascades):
            chunk.append((pid, c))
            if i + 1 == len(cascades) or sum(len(d.rows) for _, d in chunk) + len(cascades[i + 1][1].rows) > limit:
                host, pos = self._positions(np.concatenate([d.rows for _, d in chunk]))
                steps = recursion.LocalSteps(pop.model, pop.optimizer, pop.state[pos],
                                   {n: v[pos] for n, v in pop.opt_state.items()}, x[pos], y[pos],
                                   None if self.factors is None else self.factors[host], pop.loss,
                                   np.isin(host, self.block.idle) if len(self.block.idle) else None)
                stepped = recursion.local_step(steps, Perturbation.cat([d.curved for _, d in chunk]))
                a = 0
                for done, d in chunk:
                    b = a + len(d.rows)
                    self._out[done].curved = stepped.take(slice(a, b)).clone()
                    d.curved = None  # δ itself is no longer needed: free it
                    a = b
                chunk = []

    def take_updates(self, u: int) -> None:
        """After round u's local step: start the probes of round u whose source is hosted here (J δ := Δ_j), and
        record their direct terms e_j^{(½)} (each variant's readout at θ_j^u, ``update`` u the factual update)."""
        if not self._new:
            return
        _, pos = self._positions(np.array([p.source for p in self._new]))
        update, opt_update = self.shared.update(u)
        delta, update = update[pos], update[pos]
        opt_delta = {n: d[pos] for n, d in opt_update.items()} if self.curved else {}
        for i, p in enumerate(self._new):  # a single-sample probe's Δ is that of removing its sample
            if p.sample_index is not None:
                delta[i], changes = self._samples[p.probe_id]
                for n, d in opt_delta.items():
                    d[i] = changes[n]
        b0, opt_b0 = None, None
        if self.with_b:  # b₀: zero for a whole batch, the second-order part of Δ for a single sample
            b0, opt_b0 = torch.zeros_like(delta), {n: torch.zeros_like(d) for n, d in opt_delta.items()}
            for i, p in enumerate(self._new):
                if p.sample_index is not None:
                    b0[i], changes = self._samples_b[p.probe_id]
                    for n, d in opt_b0.items():
                        d[i] = changes[n]
        started = recursion.start(delta, opt_delta, b0, opt_b0)
        values = {}
        for v in self.variants:
            if v == "first-order":  # c = 1: δ = Δ_j
                values[v] = (self._gradients * started.a).sum(dim=1)
                continue
            seen = read_by(started, self.reads_b[v])
            values[v] = READOUTS[v].linear(self._gradients, seen)
            form = READOUTS[v].form(seen, update)
            if isinstance(form, HessianForm):  # at θ_j^u (before the local step)
                sub, zprime = self._zprime(pos, self._before_state)
                values[v] = values[v] + form.c * zprime_hessian_forms(sub, form.u, form.v, **zprime)
            elif isinstance(form, LossDifference):
                values[v] = values[v] + self._loss_differences([(pos, form)], states=self._before_state)[0]
        for i, p in enumerate(self._new):
            rows = np.array([p.source])
            self._record(p.probe_id, 0, rows, {v: values[v][i: i + 1] for v in self.variants})
            one = started.take(slice(i, i + 1))
            first = ScaledUpdate(torch.ones(1, dtype=one.a.dtype, device=one.a.device), one.a[0])
            self._out[p.probe_id] = _Cascade(rows, first if "first-order" in self.variants else None,
                                             one if self.curved else None)
        self._gradients, self._samples, self._samples_b, self._before_state = None, {}, {}, None

    def outgoing(self, local: bool = False) -> dict[int, tuple[np.ndarray, dict[str, Any]]]:
        """This round's stepped perturbations, for the groups whose rows of W read this block: probe id ->
        (rows, key -> [m, D] as ``_Cascade.arrays``), numpy arrays (``local``: this block's own tensors)."""
        return {pid: (c.rows, c.arrays() if local else {k: d.cpu().numpy() for k, d in c.arrays().items()})
                for pid, c in self._out.items()}

    def _empty(self) -> _Cascade:
        """A cascade with no rows here (the carried parts, zero rows): what this block adds to a probe it does not
        host yet."""
        pop = self.block.population
        none = torch.zeros(0, pop.state.shape[1], dtype=pop.state.dtype, device=self.block.device)
        opt = {n: pop.opt_state[n][:0] for n in recursion.carried_state(pop.optimizer, pop.opt_state)} \
            if self.curved else {}
        first = ScaledUpdate(none[:, 0], None) if "first-order" in self.variants else None
        return _Cascade(np.zeros(0, np.int64), first,
                        Perturbation(none, opt, none if self.with_b else None, opt if self.with_b else {})
                        if self.curved else None)

    def mix(self, weights: list[sp.csr_array], ids: list[np.ndarray], blocks: list[Any]) -> None:
        """Gossip the perturbations (round u, ``recursion.gossip``): ``weights[b]`` [P, M_b] are this block's rows
        of W^u over source block b, whose global ids are ``ids[b]`` and whose ``outgoing()`` is ``blocks[b]`` (None
        or {}: nothing from it; this block's own entry is ``outgoing(local=True)``)."""
        device = self.block.device
        probes = sorted({pid for blk in blocks for pid in (blk or {})} | set(self._out))
        mixing = []  # (probe id, its rows here, its own cascade, its parts: (rows of W here, the sources' arrays))
        for pid in probes:
            reached = np.zeros(self.block.size, bool)
            parts = []
            for w, block_ids, blk in zip(weights, ids, blocks, strict=True):
                entry = (blk or {}).get(pid)
                if entry is None:
                    continue
                rows, arrays = entry
                part = sp.csr_array(sp.csr_array(w)[:, np.searchsorted(block_ids, rows)])
                reached |= np.asarray((part != 0).sum(axis=1)).ravel() > 0
                parts.append((part, {k: as_tensor(d, device) if isinstance(d, np.ndarray) else d
                                     for k, d in arrays.items()}))
            own = self._out.pop(pid, None)
            if own is not None:  # S_s ⊆ S_{s+1}: a row stays in the support
                reached[self._host_positions(own.rows)] = True
            here = np.flatnonzero(reached)
            if len(here):
                rows = self.block.nodes[here]
                own = self._empty() if own is None else own
                mixing.append((pid, rows, own, [(part[here].toarray(), arrays) for part, arrays in parts]))
        # Every probe's rows of W, and where its own rows sit in its new support, go to the device in one copy each
        keeps = iter(to_device([np.searchsorted(rows, own.rows) for _, rows, own, _ in mixing], device))
        weights_here = iter(to_device([w for *_, parts in mixing for w, _ in parts], device))
        for i, (pid, rows, own, parts) in enumerate(mixing):
            mixing[i] = None  # its δ (own and received) is freed as soon as the probe is mixed
            keep = next(keeps)
            dense = [(next(weights_here), arrays) for _, arrays in parts]
            first = None if own.first is None else _mixed_scales(dense, own.first, keep, len(rows))
            curved = None if own.curved is None else recursion.gossip(
                [(w, Perturbation(d["curvature"], b=d.get("second-order"))) for w, d in dense], own.curved, keep,
                len(rows))
            new = ~np.isin(rows, own.rows)  # N^{(s+1)}(j) here
            self.active[pid] = _Cascade(rows, first, curved, new)
        self._out = {}

    def terms(self) -> dict[str, np.ndarray] | None:
        """The terms recorded this round (None if none): ``FIELDS`` -> [E] (probe_id, step, target, and one
        value column per variant; a variant not computed is NaN)."""
        if not self._terms:
            return None
        out = {"probe_id": np.concatenate([np.full(len(rows), pid, np.int64) for pid, _, rows, _ in self._terms]),
               "step": np.concatenate([np.full(len(rows), step, np.int64) for _, step, rows, _ in self._terms]),
               "target": np.concatenate([np.asarray(rows, np.int64) for *_, rows, _ in self._terms])}
        # One copy to the host per round: every variant's values, in float64 on the device (exact from float32).
        host = torch.stack([torch.cat([values[v] for *_, values in self._terms]).to(torch.float64)
                            for v in self.variants]).cpu().numpy()
        for v in FIELDS[3:]:
            out[v] = host[self.variants.index(v)] if v in self.variants else np.full(len(out["target"]), np.nan)
        return out

    # -- checkpoints: the perturbations in flight after round u, one entry per (probe, participant reached) -------

    def snapshot(self, u: int) -> dict[str, np.ndarray]:
        """The perturbations in flight after round u, as entries owned by hosted participants (``RoundHook.snapshot``):
        one per (probe, participant of its support here), ``cascade.owner`` [E] (global ids, ascending; for one
        participant its probes ascending), ``cascade.probe`` [E], ``cascade.<key>`` [E, D] (``_Cascade``'s keys),
        ``cascade.opt.<name>`` and, where b is carried, ``cascade.opt_b.<name>`` [E, ...]; with
        ``first_reached_only`` also ``cascade.new`` [E] (first reached at the current step). Only the rows a cascade
        has reached are saved: a row per participant and probe in flight was 92% zeros at N = 1,024."""
        if not self.enabled:
            return {}
        pop = self.block.population
        flying = [(pid, self.active[pid]) for pid in self.probes.in_flight(self.hops, u) if pid in self.active]
        owner = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(c.rows, np.int64) for _, c in flying])
        order = np.argsort(owner, kind="stable")
        out = {"cascade.owner": owner[order],
               "cascade.probe": np.concatenate([np.zeros(0, np.int64)]
                                               + [np.full(len(c.rows), pid, np.int64) for pid, c in flying])[order]}
        if self.first_reached_only:
            out["cascade.new"] = np.concatenate([np.zeros(0, bool)] + [
                np.ones(len(c.rows), bool) if c.new is None else np.asarray(c.new, bool) for _, c in flying])[order]
        parts: dict[str, tuple[list[torch.Tensor], torch.Tensor]] = {}  # key -> (the probes' tensors, an empty one)
        opt_names = recursion.carried_state(pop.optimizer, pop.opt_state) if self.curved else []
        for v in self.keys:
            parts[f"cascade.{v}"] = ([c.arrays()[v] for _, c in flying],
                                     pop.state[:0, 0] if v == "first-order" else pop.state[:0])
        if "first-order" in self.keys:  # Δ_j with each of its probe's entries: a resume may split them differently
            parts["cascade.direction"] = ([c.first.direction.expand(len(c.rows), -1) for _, c in flying],
                                          pop.state[:0])
        for n in opt_names:
            parts[f"cascade.opt.{n}"] = ([c.curved.opt_a[n] for _, c in flying], pop.opt_state[n][:0])
            if self.with_b:
                parts[f"cascade.opt_b.{n}"] = ([c.curved.opt_b[n] for _, c in flying], pop.opt_state[n][:0])
        index = torch.as_tensor(order, device=self.block.device)
        for key, (tensors, empty) in parts.items():
            out[key] = torch.cat([empty, *tensors])[index].to(torch.float32).cpu().numpy()
        return out

    def restore(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Set the perturbations in flight from a ``snapshot`` (None or none saved: none), or from the layout that
        earlier versions saved (``_entries``)."""
        self.active, self._out, self._new, self._gradients, self._samples = {}, {}, [], None, {}
        self._samples_b, self._before_state = {}, None
        self.shared.forget()
        arrays = None if arrays is None else _entries(arrays, self.block.nodes)
        if not self.enabled or arrays is None or "cascade.owner" not in arrays:
            return
        device = self.block.device
        opt_names = [k[len("cascade.opt."):] for k in arrays if k.startswith("cascade.opt.")]
        opt_b_names = [k[len("cascade.opt_b."):] for k in arrays if k.startswith("cascade.opt_b.")]
        owner, probe = np.asarray(arrays["cascade.owner"], np.int64), np.asarray(arrays["cascade.probe"], np.int64)
        if "first-order" in self.keys and np.ndim(arrays["cascade.first-order"]) != 1:
            raise ValueError("its first-order perturbations are rows, as versions before 2026-12-07 saved them; "
                             "resume it with the version that wrote it, or leave first-order out of the variants")
        for pid in np.unique(probe).tolist():
            here = np.flatnonzero(probe == pid)  # owners ascending: the cascade's rows in block order
            slot = {key: torch.as_tensor(arrays[key][here], device=device)  # (a fancy index: a copy)
                    for key in [f"cascade.{v}" for v in self.keys] + [f"cascade.opt.{n}" for n in opt_names]
                    + [f"cascade.opt_b.{n}" for n in opt_b_names]
                    + (["cascade.direction"] if "first-order" in self.keys else [])}
            first = ScaledUpdate(slot["cascade.first-order"], slot["cascade.direction"][0]) \
                if "first-order" in self.keys else None
            curved = Perturbation(slot["cascade.curvature"], {n: slot[f"cascade.opt.{n}"] for n in opt_names},
                                  slot.get("cascade.second-order"),
                                  {n: slot[f"cascade.opt_b.{n}"] for n in opt_b_names}) if self.curved else None
            self.active[int(pid)] = _Cascade(owner[here], first, curved,
                                             np.array(arrays["cascade.new"][here]) if "cascade.new" in arrays
                                             else None)


def _mixed_scales(parts: list[tuple[torch.Tensor, dict[str, Any]]], own: ScaledUpdate, keep: torch.Tensor,
                  size: int) -> ScaledUpdate:
    """Gossip of a first-order δ on ``size`` rows (``recursion.gossip`` of the scales as one column): c_k = Σ_l W_kl
    c_l over ``parts`` (w [size, m_b], rows of W over a source block's rows of the probe; that block's arrays,
    ``first-order`` c [m_b] and ``direction`` Δ_j); Δ_j is ``own``'s or, where this block had no row of the probe
    yet, a sender's."""
    mixed = recursion.gossip([(w, Perturbation(arrays["first-order"][:, None])) for w, arrays in parts],
                             Perturbation(own.c[:, None]), keep, size)
    return ScaledUpdate(mixed.a[:, 0], own.direction if own.direction is not None else parts[0][1]["direction"])


def _entries(arrays: Mapping[str, np.ndarray], nodes: np.ndarray) -> Mapping[str, np.ndarray]:
    """A block's perturbations in flight as ``OnlineCascades.snapshot`` saves them: ``arrays`` itself, or, from a
    checkpoint of an earlier version (a row per hosted participant ``nodes``: ``cascade.ids`` [P, A] the probes in
    flight, ``cascade.mask`` [P, A] the participant in a probe's support, ``cascade.<key>`` [P, A, ...]), its
    entries."""
    if "cascade.owner" in arrays or "cascade.ids" not in arrays:
        return arrays
    rows, slots = np.nonzero(arrays["cascade.mask"])  # row-major: owners ascending, then their probes
    out = {"cascade.owner": np.asarray(nodes, np.int64)[rows], "cascade.probe": arrays["cascade.ids"][rows, slots]}
    return out | {key: value[rows, slots] for key, value in arrays.items()
                  if key.startswith("cascade.") and key not in ("cascade.ids", "cascade.mask")}


# -- the driver's side: terms of every round -> influence.parquet and dice.parquet rows -----------------------


class CascadeRecorder:
    """The in-loop terms of every round so far (part of the driver state a checkpoint keeps)."""

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []

    def state(self) -> dict[str, np.ndarray]:
        """Every term so far as arrays (``FIELDS``, concatenated)."""
        return {f: np.concatenate([p[f] for p in self.parts]) for f in FIELDS} if self.parts else {}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the terms from ``state()`` (empty: none)."""
        self.parts = [{f: np.asarray(arrays[f]) if f in arrays else np.full(len(arrays[FIELDS[0]]), np.nan)
                       for f in FIELDS}] if arrays and len(arrays[FIELDS[0]]) else []  # saved before second-order

    def add(self, terms: dict[str, np.ndarray] | None) -> None:
        """Keep one round's terms (``OnlineCascades.terms``, combined over groups)."""
        if terms is not None and len(terms["probe_id"]):
            self.parts.append(terms)

    def tables(self, experiment: Any) -> tuple[list[dict], list[dict]]:
        """Return (influence rows, dice rows) of every in-loop probe, as ``measure.measure_probes`` writes them,
        with DICE-GT left empty."""
        config = experiment.config
        hops, variants = config.influence.hops, list(config.influence.variants)
        terms = {f: np.concatenate([p[f] for p in self.parts]) if self.parts else np.zeros(0) for f in FIELDS}
        order = np.lexsort((terms["target"], terms["step"], terms["probe_id"]))
        terms = {f: v[order] for f, v in terms.items()}
        starts = np.searchsorted(terms["probe_id"], [p.probe_id for p in online_probes(config)])
        influence: list[dict] = []
        dice: list[dict] = []
        for probe, a in zip(online_probes(config), starts, strict=True):
            b = np.searchsorted(terms["probe_id"], probe.probe_id, side="right")
            step, target = terms["step"][a:b], terms["target"][a:b]
            if not len(step) or step[0] != 0 or not set(range(hops + 1)) <= set(step.tolist()):
                raise RuntimeError(f"probe {probe.probe_id} (round {probe.round}, source {probe.source}): the run "
                                   f"recorded steps {sorted(set(step.tolist()))} of its cascade, not 0..{hops}")
            supports = [np.array([probe.source])] + [target[step == s] for s in range(1, hops + 1)]
            cascades: dict[str, Cascade | None] = {"gt": None}
            for v in variants:
                values = terms[v][a:b]
                cascades[COLUMNS[v]] = Cascade(probe.source, float(values[0]), supports,
                                               [np.zeros(1)] + [values[step == s] for s in range(1, hops + 1)])
            distances = experiment.topology.hop_distances(probe.source, probe.round)
            rows_influence, rows_dice = probe_rows(probe, cascades, hops, experiment.q, distances)
            influence += rows_influence
            dice += rows_dice
        return influence, dice


def fill_estimates(measured: list[dict], estimated: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Return ``measured`` rows (DICE-GT of replays, estimates empty) with every column that is empty there
    taken from the ``estimated`` row of the same ``keys`` (the in-loop DICE-E)."""
    by_key = {tuple(r[k] for k in keys): r for r in estimated}
    out = []
    for row in measured:
        other = by_key.get(tuple(row[k] for k in keys))
        if other is None:
            raise RuntimeError(f"no in-loop estimate for {dict(zip(keys, (row[k] for k in keys), strict=True))}")
        out.append({k: (other[k] if v is None and k in other else v) for k, v in row.items()})
    return out


# -- the method: its round hook (in every participant block) and its driver -------------------------------


class CascadeHook(RoundHook):
    """In-loop DICE-E in one block: ``OnlineCascades`` at the fixed points of every round; the perturbations
    in flight travel with the half-steps on rounds that gossip them."""

    name = "online_dice"

    def __init__(self, block: Any, config: Any):
        super().__init__(block, config)
        self.cascades = OnlineCascades(block, config)

    @classmethod
    def sends(cls, config: Any) -> Callable[[int], bool]:
        probes = online_probes(config)
        return lambda t: bool(probes) and cascade_mixing(config, probes, t)

    def before_local_step(self, t: int) -> None:
        self.cascades.start(t)

    def after_local_step(self, t: int) -> None:
        self.cascades.take_updates(t)

    def message(self, t: int, local: bool) -> Any:
        return self.cascades.outgoing(local)

    def after_gossip(self, t: int, inbox: Inbox) -> dict[str, np.ndarray] | None:
        if inbox.messages:
            self.cascades.mix(inbox.weights, inbox.ids, inbox.messages)
        return self.cascades.terms()

    def snapshot(self, t: int) -> dict[str, np.ndarray]:
        return self.cascades.snapshot(t)

    def restore(self, arrays: Mapping[str, np.ndarray] | None) -> None:
        self.cascades.restore(arrays)


class CascadeDriver(DriverHook):
    """Keeps every round's in-loop terms; after training, the ``influence`` and ``dice`` tables (DICE-GT, if
    asked for, is replayed and filled in after training by the ``influence-replays`` stage:
    ``replays.InfluenceReplays``)."""

    name = "online_dice"

    def __init__(self, experiment: Any):
        super().__init__(experiment)
        self.recorder = CascadeRecorder()

    combine = staticmethod(combine_cascade_terms)

    def on_round(self, t: int, record: Any) -> dict[str, Any]:
        self.recorder.add(record)
        return {}

    def finish(self) -> dict[str, Any]:
        influence, dice = self.recorder.tables(self.experiment)
        warn_unreadable(influence)
        return {"influence": influence, "dice": dice}

    def finish_schemas(self) -> dict[str, Any]:
        return {"influence": INFLUENCE, "dice": DICE}

    def state(self) -> dict[str, np.ndarray]:
        return self.recorder.state()

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.recorder.load_state(arrays)


ONLINE_DICE_METHOD = Method("online_dice", lambda config: bool(online_probes(config)), CascadeHook, CascadeDriver)
