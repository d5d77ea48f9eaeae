"""DICE-E inside the round loop (``influence.online``): each probe's perturbation travels with the training run.

The recursion of ``estimator.py`` (concepts §4), run forward by the participant groups as the rounds happen instead
of on a replayed window afterwards. For a whole-batch probe (j, t) and round u = t + s:

1. at the start of round u (θ = θ^u) every group hosting a participant k of the probe's support S_s records
   e_k^{(s)} = ∇L(θ_k^u; z′)ᵀ δ_k^{(s)}; for s < R it then takes the step's Jacobian along δ — for
   ``curvature`` J_k^u δ_k by forward-mode differentiation through k's local step on z_k^u (one batched
   Hessian-vector product over every probe's rows), for ``first-order`` δ itself;
2. after the local step of the probe round (s = 0) the source's group takes Δ_j = θ_j^{t+½} − θ_j^t (and the
   optimizer-state change), records e_j^{(½)} and starts the probe with J δ := Δ_j on row j;
3. gossip mixes the stepped perturbations like the half-steps: δ_k^{(s+1)} = Σ_l W^u_kl (J δ)_l, with the blocks
   of other groups routed to the groups whose rows of W read them; S_{s+1} = S_s ∪ {k : W^u_kl ≠ 0, l ∈ S_s}.
   Optimizer-state perturbations stay with their owners (they are not gossiped).

The numbers are those of the replayed recursion (the same functions: ``jvp_local_step``, ``test_gradients``),
whatever the number of groups; a test compares them. No window is recorded and no run is replayed: the
cost per round is one test-gradient pass over the hosted participants while a probe is in flight, plus one
Jacobian-vector product per (probe, participant reached) for ``curvature``. The perturbations in flight are
part of a group's checkpoint snapshot (``snapshot``/``restore``). Pure torch and numpy: no Ray here.

``second-order`` carries, beside the curvature perturbation a (and its optimizer part), the O(Δ²) perturbation b
(and its optimizer part): step 1 takes (J a, J b − ½ D²O[a, a]) in one nested forward-mode pass
(``estimator.second_order_local_step``), gossip mixes b like a, and step 1 records
e₂ = ∇L(θ_k; z′)ᵀ(a + b) − ½ aᵀH′a (one more second-order pass of the z′ loss per probe and round). The source
starts it with b₀ (zero for a whole batch, ``estimator.sample_second_order`` for a single sample) and records
e₂_j^{(½)} at θ_j^t (``estimator``'s module docstring). Without b (``second_order_b`` false) a is stepped by the
curvature pass and b is not carried (nor gossiped, nor checkpointed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dice_ray.core.misbehavior import UPDATE_KINDS, update_factor
from dice_ray.core.population import Population
from dice_ray.core.tensors import as_tensor
from dice_ray.hooks import DriverHook, Inbox, Method, RoundHook
from dice_ray.methods.dice.estimator import (
    Cascade,
    jvp_local_step,
    sample_second_order,
    sample_update,
    second_order_local_step,
    shared_primal_hessian_forms,
    zprime_hessian_forms,
)
from dice_ray.methods.dice.measure import COLUMNS, probe_rows
from dice_ray.methods.dice.probes import Probe, select_probes
from dice_ray.methods.proximal import ProximalExaminer
from dice_ray.results import DICE, INFLUENCE

FIELDS = ("probe_id", "step", "target", "first-order", "curvature", "second-order")  # one recorded term per row
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
class _Cascade:
    """One probe's perturbation on this block's participants: ``rows`` (global ids, ascending) of S_s here,
    ``delta[key]`` [m, D_params] and the optimizer-state perturbation ``opt[name]`` [m, ...] (of a: curvature and
    second-order). Keys: the variants, where ``curvature`` is a and ``second-order`` is b (with ``opt_b[name]``
    its optimizer part; only when b is carried); a is carried for second-order even when curvature is not recorded."""

    rows: np.ndarray
    delta: dict[str, torch.Tensor]
    opt: dict[str, torch.Tensor]
    opt_b: dict[str, torch.Tensor] = field(default_factory=dict)
    new: np.ndarray | None = None  # [m] bool: row first reached at this step, k ∈ N^{(s)}(j) (None: unknown)


class OnlineCascades:
    """The in-loop DICE-E of one ``ParticipantBlock`` (see the module docstring). Per round u: ``start(u)``
    before the local step, ``take_updates(u)`` after it, ``outgoing()`` (published for other groups) and
    ``mix(u, weights, ids, blocks)`` after gossip; ``terms()`` returns what the round recorded."""

    def __init__(self, block: Any, config: Any, probes: ProbeSchedule | None = None, hops: int | None = None,
                 variants: list[str] | None = None, zprime: str | None = None, first_reached_only: bool = False,
                 with_b: bool | None = None):
        """``probes``, ``hops``, ``variants``, ``zprime``, ``with_b`` (second-order's b carried: ``second_order_b``):
        default ``influence``'s (its in-loop probes);
        ``first_reached_only``: record e_k^{(s)} only for k ∈ N^{(s)}(j) (and the direct term), as the contribution
        ledger counts them, instead of every k of S_s."""
        self.block, self.config = block, config
        inf = config.influence
        self.hops = inf.hops if hops is None else hops
        self.variants = list(inf.variants if variants is None else variants)
        self.first_reached_only = first_reached_only
        self.second = "second-order" in self.variants
        # b carried through the local steps (else it is not carried at all: second-order without b, ``second_order_b``)
        self.with_b = self.second and (inf.second_order_b if with_b is None else with_b)
        self.curved = self.second or "curvature" in self.variants  # a (and its optimizer part) is propagated
        # The perturbations carried (``_Cascade``'s keys): a under "curvature", b under "second-order" (with b only).
        self.keys = [v for v in self.variants if v != "second-order" or self.with_b] + \
            (["curvature"] if self.second and "curvature" not in self.variants else [])
        self.probes = ProbeSchedule(online_probes(config)) if probes is None else probes
        # Blocks hold ascending global ids (``ActorPlan``: contiguous ranges), so rows kept in block order are
        # ascending too, and a source block's column of a global id is found by binary search.
        self.local = {int(k): i for i, k in enumerate(block.nodes.tolist())}
        self._grads = ProximalExaminer(block, inf.zprime if zprime is None else zprime)
        bad = config.misbehavior
        self.factors = None
        if bad.kind in UPDATE_KINDS and len(block.misbehaving):
            self.factors = np.ones(block.size)
            self.factors[block.misbehaving] = update_factor(bad.kind, bad.factor)
        self.active: dict[int, _Cascade] = {}
        self._out: dict[int, _Cascade] = {}  # stepped perturbations J δ of this round, before gossip
        self._new: list[Probe] = []
        self._before: tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor] | None = None
        self._samples: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._samples_b: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}  # b₀ of single samples
        self._before_state: torch.Tensor | None = None  # θ_j^t of the new probes' sources (second-order)
        self._terms: list[tuple[int, int, np.ndarray, dict[str, np.ndarray]]] = []

    @property
    def enabled(self) -> bool:
        """True iff the run measures any probe in the loop."""
        return bool(self.probes)

    def _positions(self, rows: np.ndarray) -> torch.Tensor:
        return torch.as_tensor([self.local[int(k)] for k in rows.tolist()], dtype=torch.int64,
                               device=self.block.device)

    def _zprime(self, pos: torch.Tensor, states: torch.Tensor | None = None) -> tuple[Population, dict[str, Any]]:
        """The hosted rows ``pos`` as a population (at their current states, or ``states`` [m, D]) and their z′ as
        ``zprime_hessian_forms`` and ``shared_primal_hessian_forms`` take it (keyword arguments)."""
        block, pop = self.block, self.block.population
        sub = Population(pop.model, (pop.state[pos] if states is None else states).clone(), pop.optimizer,
                         loss=pop.loss)
        if self._grads.zprime == "heldout":
            return sub, {"x": block.x_heldout, "y": block.y_heldout, "shared_input": True}
        return sub, {"x": block.x_val[pos], "y": block.y_val[pos], "sample_weights": block.val_mask[pos]}

    def _hessian_forms(self, pos: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                       states: torch.Tensor | None = None) -> torch.Tensor:
        """uᵀ H′(θ_k; z′_k) v [m] for the hosted rows ``pos`` (at their current states, or ``states`` [m, D])."""
        sub, zprime = self._zprime(pos, states)
        return zprime_hessian_forms(sub, u, v, **zprime)

    def _batched_forms(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """aᵀH′a [m] for each (hosted rows ``pos`` [m], a [m, D_params]) of ``parts`` (every probe in flight).

        The rows of one participant (one per probe that has reached it) share its primal z′ pass
        (``shared_primal_hessian_forms``; measured 1.3x faster forms at 10 probes per participant, 1.9x at 30):
        participants go in passes of up to JVP_ELEMENTS tangent parameters, by decreasing number of rows, each
        pass padded with zero tangents to its largest participant's rows.
        """
        if not parts:
            return []
        pos = torch.cat([p for p, _ in parts])
        a = torch.cat([a for _, a in parts])
        unique, inverse, counts = torch.unique(pos, return_inverse=True, return_counts=True)
        order = torch.argsort(inverse, stable=True)  # a row's slot among its participant's rows
        slot = torch.empty_like(inverse)
        slot[order] = torch.arange(len(pos), device=pos.device) - (torch.cumsum(counts, 0) - counts)[inverse[order]]
        out = torch.empty(len(pos), dtype=a.dtype, device=a.device)
        by_count = torch.argsort(counts, descending=True, stable=True)
        start = 0
        while start < len(by_count):
            width = int(counts[by_count[start]])
            group = by_count[start: start + max(1, JVP_ELEMENTS // (width * a.shape[1]))]
            member = torch.full((len(unique),), -1, dtype=torch.int64, device=pos.device)
            member[group] = torch.arange(len(group), device=pos.device)
            rows = torch.nonzero(member[inverse] >= 0).flatten()
            where = (member[inverse[rows]], slot[rows])
            tangents = torch.zeros(len(group), width, a.shape[1], dtype=a.dtype, device=a.device)
            tangents[where] = a[rows]
            out[rows] = self._shared_primal_forms(unique[group], tangents)[where]
            start += len(group)
        return list(torch.split(out, [len(p) for p, _ in parts]))

    def _shared_primal_forms(self, pos: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
        """aᵀH′(θ_k; z′_k)a [G, V] for the hosted participants ``pos`` [G] (distinct) and ``tangents`` [G, V, D]."""
        sub, zprime = self._zprime(pos)
        return shared_primal_hessian_forms(sub, tangents, **zprime)

    def _record(self, probe_id: int, step: int, rows: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        self._terms.append((probe_id, step, rows, {v: values[v].cpu().numpy() for v in self.variants}))

    def start(self, u: int, gradients: torch.Tensor | None = None) -> None:
        """Round u begins (θ = θ^u): record e^{(s)} of the probes in flight and step their perturbations.
        ``gradients``: ∇L(θ_k^u; z′) [P, D_params] of the hosted rows if the caller has them (else taken here)."""
        self._terms, self._out = [], {}
        self._new = [p for p in self.probes.starting(u) if int(p.source) in self.local]
        if not self.active and not self._new:
            return
        pop = self.block.population
        g = self._grads.gradients() if gradients is None else gradients
        stepping, recorded, curved = [], [], []
        for pid, c in sorted(self.active.items()):
            s = u - self.probes.round_of(pid)
            keep = c.new if self.first_reached_only and c.new is not None else None
            rows, pos = (c.rows, self._positions(c.rows)) if keep is None else \
                (c.rows[keep], self._positions(c.rows[keep]))
            if len(rows):
                at = g[pos]
                delta = c.delta if keep is None else {v: d[torch.as_tensor(keep, device=d.device)]
                                                       for v, d in c.delta.items()}
                values = {v: (at * delta[v]).sum(dim=1) for v in self.variants if v != "second-order"}
                if self.second:  # e₂ = ∇ᵀ(a + b) − ½ aᵀH′a; the H′ terms of every probe below, batched
                    a_b = delta["curvature"] + delta["second-order"] if self.with_b else delta["curvature"]
                    values["second-order"] = (at * a_b).sum(dim=1)
                    curved.append((len(recorded), pos, delta["curvature"]))
                recorded.append((pid, s, rows, values))
            if s < self.hops:
                stepping.append(pid)
        for i, form in zip([i for i, _, _ in curved], self._batched_forms([(pos, a) for _, pos, a in curved]),
                           strict=True):
            recorded[i][3]["second-order"] = recorded[i][3]["second-order"] - 0.5 * form
        for pid, s, rows, values in recorded:
            self._record(pid, s, rows, values)
        cascades, self.active = [(pid, self.active[pid]) for pid in stepping], {}
        self._step(u, cascades)
        if self._new:
            pos = self._positions(np.array([p.source for p in self._new]))
            self._before = (pop.params[pos].clone(), {n: v[pos].clone() for n, v in pop.opt_state.items()}, g[pos])
            self._samples = self._sample_updates(u, pos)
            if self.second:
                self._before_state = pop.state[pos].clone()
            if self.with_b:
                self._samples_b = self._sample_updates(u, pos, sample_second_order)

    def _sample_updates(self, u: int, pos: torch.Tensor,
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
            out[p.probe_id] = update(pop.model, pop.optimizer, pop.state[k], {
                n: v[k] for n, v in pop.opt_state.items()}, x[k], y[k], p.sample_index, factor, pop.loss)
        return out

    def _step(self, u: int, cascades: list[tuple[int, _Cascade]]) -> None:
        """J δ of every stepped cascade into ``self._out`` (one batched forward-mode pass for ``curvature``)."""
        if not cascades:
            return
        if not self.curved:
            self._out.update({pid: _Cascade(c.rows, dict(c.delta), {}) for pid, c in cascades})
            return
        pop = self.block.population
        x, y = self.block.minibatch(u)
        # Several probes' rows at once, up to JVP_ELEMENTS parameters per forward-mode pass: the pass holds
        # several copies of its rows' parameters (primal, tangent, gradient and its tangent, the new state).
        limit = max(1, JVP_ELEMENTS // (pop.params.shape[1] * (2 if self.second else 1)))  # nested: more copies
        chunk: list[tuple[int, _Cascade]] = []
        for i, (pid, c) in enumerate(cascades):
            chunk.append((pid, c))
            if i + 1 == len(cascades) or sum(len(d.rows) for _, d in chunk) + len(cascades[i + 1][1].rows) > limit:
                pos = self._positions(np.concatenate([d.rows for _, d in chunk]))
                tangent = torch.cat([d.delta["curvature"] for _, d in chunk])
                opt_tangent = {n: torch.cat([d.opt[n] for _, d in chunk]) for n in chunk[0][1].opt}
                factors = None if self.factors is None else self.factors[pos.cpu().numpy()]
                opt_now = {n: v[pos] for n, v in pop.opt_state.items()}
                if self.with_b:  # (J a, J b − ½ D²O[a, a]) in one nested pass
                    tangent_b = torch.cat([d.delta["second-order"] for _, d in chunk])
                    opt_tangent_b = {n: torch.cat([d.opt_b[n] for _, d in chunk]) for n in chunk[0][1].opt_b}
                    (stepped, opt_stepped), (stepped_b, opt_stepped_b) = second_order_local_step(
                        pop.model, pop.optimizer, pop.state[pos], opt_now, x[pos], y[pos], tangent, opt_tangent,
                        tangent_b, opt_tangent_b, factors, pop.loss)
                else:
                    stepped, opt_stepped = jvp_local_step(pop.model, pop.optimizer, pop.state[pos], opt_now, x[pos],
                                                          y[pos], tangent, opt_tangent, factors, pop.loss)
                    stepped_b, opt_stepped_b = None, {}
                a = 0
                for done, d in chunk:
                    b = a + len(d.rows)
                    new = {"curvature": stepped[a:b], "second-order": None if stepped_b is None else stepped_b[a:b]}
                    delta = {v: (new[v].clone() if v in new else d.delta[v]) for v in self.keys}
                    self._out[done] = _Cascade(d.rows, delta, {n: t[a:b].clone() for n, t in opt_stepped.items()
                                                               if n != "step"},
                                               {n: t[a:b].clone() for n, t in opt_stepped_b.items()})
                    for key in ("curvature", "second-order"):  # δ itself is no longer needed: free it
                        d.delta.pop(key, None)
                    d.opt.clear()
                    d.opt_b.clear()
                    a = b
                chunk = []

    def take_updates(self, u: int) -> None:
        """After round u's local step: start the probes of round u whose source is hosted here (J δ := Δ_j)."""
        if not self._new:
            return
        pop = self.block.population
        params, opt, g = self._before
        pos = self._positions(np.array([p.source for p in self._new]))
        delta = pop.params[pos] - params
        opt_delta = {n: pop.opt_state[n][pos] - v for n, v in opt.items() if n != "step"}
        for i, p in enumerate(self._new):  # a single-sample probe's Δ is that of removing its sample
            if p.sample_index is not None:
                delta[i], changes = self._samples[p.probe_id]
                for n, d in opt_delta.items():
                    d[i] = changes[n]
        half = (g * delta).sum(dim=1)
        b0, opt_b0, half2 = None, {}, None
        if self.second:  # b₀ and e₂_j^{(½)} = ∇ᵀ(a₀ + b₀) + a₀ᵀH′(θ_j^t)(u − ½ a₀), u the factual update
            b0 = torch.zeros_like(delta)
            opt_b0 = {n: torch.zeros_like(d) for n, d in opt_delta.items()} if self.with_b else {}
            for i, p in enumerate(self._new):
                if p.sample_index is not None and self.with_b:
                    b0[i], changes = self._samples_b[p.probe_id]
                    for n, d in opt_b0.items():
                        d[i] = changes[n]
            update = pop.params[pos] - params
            half2 = (g * (delta + b0)).sum(dim=1) + self._hessian_forms(pos, delta, update - 0.5 * delta,
                                                                        self._before_state)
        for i, p in enumerate(self._new):
            rows = np.array([p.source])
            self._record(p.probe_id, 0, rows, {v: (half2 if v == "second-order" else half)[i: i + 1]
                                               for v in self.variants})
            self._out[p.probe_id] = _Cascade(rows, {v: (b0 if v == "second-order" else delta)[i: i + 1]
                                                    for v in self.keys},
                                             {n: d[i: i + 1] for n, d in opt_delta.items()} if self.curved else {},
                                             {n: d[i: i + 1] for n, d in opt_b0.items()})
        self._before, self._samples, self._samples_b, self._before_state = None, {}, {}, None

    def outgoing(self, local: bool = False) -> dict[int, tuple[np.ndarray, dict[str, Any]]]:
        """This round's stepped perturbations, for the groups whose rows of W read this block: probe id ->
        (rows, variant -> [m, D_params]), numpy arrays (``local``: this block's own tensors)."""
        return {pid: (c.rows, dict(c.delta) if local else {v: d.cpu().numpy() for v, d in c.delta.items()})
                for pid, c in self._out.items()}

    def mix(self, weights: list[sp.csr_array], ids: list[np.ndarray], blocks: list[Any]) -> None:
        """Gossip the perturbations (round u): ``weights[b]`` [P, M_b] are this block's rows of W^u over source
        block b, whose global ids are ``ids[b]`` and whose ``outgoing()`` is ``blocks[b]`` (None or {}: nothing
        from it; this block's own entry is ``outgoing(local=True)``)."""
        device = self.block.device
        probes = sorted({pid for blk in blocks for pid in (blk or {})} | set(self._out))
        for pid in probes:
            reached = np.zeros(self.block.size, bool)
            total: dict[str, torch.Tensor] = {}
            for w, block_ids, blk in zip(weights, ids, blocks, strict=True):
                entry = (blk or {}).get(pid)
                if entry is None:
                    continue
                rows, delta = entry
                part = sp.csr_array(sp.csr_array(w)[:, np.searchsorted(block_ids, rows)])
                reached |= np.asarray((part != 0).sum(axis=1)).ravel() > 0
                dense = torch.as_tensor(part.toarray(), device=device)
                for v in self.keys:
                    value = as_tensor(delta[v], device) if isinstance(delta[v], np.ndarray) else delta[v]
                    product = dense.to(value.dtype) @ value
                    total[v] = product if v not in total else total[v] + product
            own = self._out.pop(pid, None)  # read for the last time: freed as soon as the probe is mixed
            if own is not None:  # S_s ⊆ S_{s+1}: a row stays in the support
                reached[self._positions(own.rows).cpu().numpy()] = True
            here = np.flatnonzero(reached)
            if not len(here):
                continue
            rows, here_t = self.block.nodes[here], torch.as_tensor(here, device=device)
            delta = {v: (total[v][here_t] if v in total else
                         torch.zeros(len(rows), self.block.population.params.shape[1], device=device))
                     for v in self.keys}
            opt = {}
            if own is not None and own.opt:
                keep = torch.as_tensor(np.searchsorted(rows, own.rows), device=device)
                for n, value in own.opt.items():
                    moved = torch.zeros(len(rows), *value.shape[1:], dtype=value.dtype, device=device)
                    moved[keep] = value
                    opt[n] = moved
            elif self.curved:
                opt = {n: torch.zeros(len(rows), *v.shape[1:], dtype=v.dtype, device=device)
                       for n, v in self.block.population.opt_state.items() if n != "step"}
            opt_b = {}
            if self.with_b:  # b's optimizer part stays with its owner too
                opt_b = {n: torch.zeros_like(v) for n, v in opt.items()}
                if own is not None and own.opt_b:
                    for n, value in own.opt_b.items():
                        opt_b[n][keep] = value
            new = ~np.isin(rows, own.rows) if own is not None else np.ones(len(rows), bool)  # N^{(s+1)}(j) here
            self.active[pid] = _Cascade(rows, delta, opt, opt_b, new)
        self._out = {}

    def terms(self) -> dict[str, np.ndarray] | None:
        """The terms recorded this round (None if none): ``FIELDS`` -> [E] (probe_id, step, target, and one
        value column per variant; a variant not computed is NaN)."""
        if not self._terms:
            return None
        parts: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
        for pid, step, rows, values in self._terms:
            parts["probe_id"].append(np.full(len(rows), pid, np.int64))
            parts["step"].append(np.full(len(rows), step, np.int64))
            parts["target"].append(np.asarray(rows, np.int64))
            for v in FIELDS[3:]:
                parts[v].append(np.asarray(values[v], np.float64) if v in values else np.full(len(rows), np.nan))
        return {f: np.concatenate(v) for f, v in parts.items()}

    # -- checkpoints: the perturbations in flight after round u, as per-row arrays ---------------------------

    def snapshot(self, u: int) -> dict[str, np.ndarray]:
        """The perturbations in flight after round u, one row per hosted participant: ``cascade.ids`` [P, A]
        (the A probes globally in flight, ``in_flight``), ``cascade.mask`` [P, A] (the participant is in the
        probe's support), ``cascade.<key>`` [P, A, D_params] (``_Cascade``'s keys), ``cascade.opt.<name>`` and, for
        second-order, ``cascade.opt_b.<name>`` [P, A, ...]; with ``first_reached_only`` also ``cascade.new`` [P, A]
        (first reached at the current step)."""
        if not self.enabled:
            return {}
        flying = self.probes.in_flight(self.hops, u)
        pop, p, a = self.block.population, self.block.size, len(flying)
        out = {"cascade.ids": np.tile(np.asarray(flying, np.int64), (p, 1)), "cascade.mask": np.zeros((p, a), bool)}
        if self.first_reached_only:
            out["cascade.new"] = np.zeros((p, a), bool)
        for v in self.keys:
            out[f"cascade.{v}"] = np.zeros((p, a, pop.params.shape[1]), np.float32)
        opt_names = [n for n in pop.opt_state if n != "step"] if self.curved else []
        opt_b_names = opt_names if self.with_b else []
        for n in opt_names:
            out[f"cascade.opt.{n}"] = np.zeros((p, a, *pop.opt_state[n].shape[1:]), np.float32)
        for n in opt_b_names:
            out[f"cascade.opt_b.{n}"] = np.zeros((p, a, *pop.opt_state[n].shape[1:]), np.float32)
        for i, pid in enumerate(flying):
            c = self.active.get(pid)
            if c is None:
                continue
            pos = self._positions(c.rows).cpu().numpy()
            out["cascade.mask"][pos, i] = True
            if self.first_reached_only:
                out["cascade.new"][pos, i] = True if c.new is None else c.new
            for v in self.keys:
                out[f"cascade.{v}"][pos, i] = c.delta[v].cpu().numpy()
            for n in opt_names:
                out[f"cascade.opt.{n}"][pos, i] = c.opt[n].cpu().numpy()
            for n in opt_b_names:
                out[f"cascade.opt_b.{n}"][pos, i] = c.opt_b[n].cpu().numpy()
        return out

    def restore(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Set the perturbations in flight from a ``snapshot`` (None or none saved: none)."""
        self.active, self._out, self._new, self._before, self._samples = {}, {}, [], None, {}
        self._samples_b, self._before_state = {}, None
        if not self.enabled or arrays is None or "cascade.ids" not in arrays or not len(arrays["cascade.ids"]):
            return
        device = self.block.device
        opt_names = [k[len("cascade.opt."):] for k in arrays if k.startswith("cascade.opt.")]
        opt_b_names = [k[len("cascade.opt_b."):] for k in arrays if k.startswith("cascade.opt_b.")]
        for i, pid in enumerate(arrays["cascade.ids"][0].tolist()):
            here = np.flatnonzero(arrays["cascade.mask"][:, i])
            if not len(here):
                continue
            slot = {key: torch.as_tensor(np.array(arrays[key][here, i]), device=device)
                    for key in [f"cascade.{v}" for v in self.keys] + [f"cascade.opt.{n}" for n in opt_names]
                    + [f"cascade.opt_b.{n}" for n in opt_b_names]}
            self.active[int(pid)] = _Cascade(self.block.nodes[here], {v: slot[f"cascade.{v}"] for v in self.keys},
                                             {n: slot[f"cascade.opt.{n}"] for n in opt_names},
                                             {n: slot[f"cascade.opt_b.{n}"] for n in opt_b_names},
                                             np.array(arrays["cascade.new"][here, i]) if "cascade.new" in arrays
                                             else None)


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
    asked for, is replayed and filled in afterwards by the front end)."""

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
        return {"influence": influence, "dice": dice}

    def finish_schemas(self) -> dict[str, Any]:
        return {"influence": INFLUENCE, "dice": DICE}

    def state(self) -> dict[str, np.ndarray]:
        return self.recorder.state()

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.recorder.load_state(arrays)


ONLINE_DICE_METHOD = Method("online_dice", lambda config: bool(online_probes(config)), CascadeHook, CascadeDriver)
