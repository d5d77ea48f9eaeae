"""Contribution accounting: an online ledger of every participant's DICE-E on every other.

For a ledger round t (``ledger.every``) and every source j, the whole-batch probe (j, t) has the first-order
DICE-E of concepts §4 (J = I):

    DICE-E^{(R)}(j, t) = q_j ∇L(θ_j^t; z′)ᵀ Δ_j^t
                       + Σ_{s=1..R} Σ_{k ∈ N^{(s)}(j)} q_k P^{(s)}_{kj} ∇L(θ_k^{t+s}; z′)ᵀ Δ_j^t,

with Δ_j^t = θ_j^{t+½} − θ_j^t the update j sent, P^{(s)} = W^{t+s−1} ⋯ W^t and N^{(s)}(j) the participants
first reached at step s — exactly the ``est_first_order`` column of ``dice.parquet`` at hops R. The ledger adds
the term of target k to L[j→k] (the self term to L[j→j]); T_j = Σ_k L[j→k] is j's total contribution.

Adjoint view, online: at the start of every round u the participant groups take one batched gradient g_k = ∇L(θ_k^u; z′)
of every hosted k. That one pass serves the self term of round u's update (θ^u is where round u starts) and hop
s = u − t of every ledger round t in u−R..u−1, whatever the number of sources: only dot products P^{(s)}_{kj} g_kᵀ Δ_j^t
remain, for the pairs (k, j) of N^{(s)}(j) (sampled products, as in ``core.tensors.edge_dots``). Each group keeps the
updates Δ of its own sources of the ledger rounds among the last R rounds (they are part of its checkpoint snapshot) and
reads the other groups' gradients: with the ledger on, a group's gradient block goes, on the rounds that need it, to the
groups whose sources reach its participants within R hops (``LedgerRouter``). Hop terms need θ^{t+s} for t + s ≤ T − 1
(gradients are taken at round starts): probes of the last R rounds are truncated at hop T − 1 − t, as far as the run
goes; the influence tables, which need the whole window, probe rounds up to T − 1 − R only.

Sign (concepts §2): influence = L(with) − L(without); negative: j's updates lowered the loss (helpful).
Shares: helpful participants (T_j < 0) split a positive budget, share_j = max(−T_j, 0) / Σ_l max(−T_l, 0);
a participant with T_j > 0 raised the network's weighted loss and is flagged harmful (share 0).

Curvature, second order and the exact readout (``ledger.variants``). The same terms with the curvature DICE-E (δ
propagated through the local steps' Jacobians, δ_k^{(s+1)} = Σ_l W_kl J_l δ_l^{(s)}), the second-order one (a + b, and
e₂ = ∇ᵀ(a + b) − ½ aᵀH′a) or the exact readout (L(θ_k; z′) − L(θ_k − δ; z′)) have no shared adjoint: each source's
perturbation must travel on its own. They are the in-loop DICE-E of ``dice/online.py`` (``OnlineCascades``, the same
functions) with one whole-batch probe per source and ledger round (``LedgerProbes``), recorded only where the ledger
counts a term (k ∈ N^{(s)}(j) and the self term): the perturbations travel with the half-steps to the groups whose rows
of W read them, and each group records the terms of its hosted targets. The first-order column keeps its own exact
float64 path; the driver joins the variants' terms on (probe round, source, target) — the same keys, or it raises. Cost
per ledger round: one forward-mode pass through the local step for every (source, participant reached before hop R)
pair, and for second-order a nested pass and one z′ Hessian-vector product per term; exact-readout (the z′ loss
difference L(θ_k; z′) − L(θ_k − δ; z′) along the curvature perturbation) one forward pass over z′ per term.

Pure torch and numpy: no Ray here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from dice_ray.core.tensors import edge_dots, float64_chunks, sum_by_key
from dice_ray.hooks import DriverHook, Inbox, Method, RoundHook, Route, Router
from dice_ray.methods.dice.estimator import VARIANTS
from dice_ray.methods.dice.online import OnlineCascades, ProbeSchedule
from dice_ray.methods.dice.options import EXACT_READOUT_B, SECOND_ORDER_B, Variant, VariantList
from dice_ray.methods.dice.probes import Probe
from dice_ray.methods.round_quantities import round_quantities
from dice_ray.results import CONTRIBUTIONS, SHARES, VARIANT_SUFFIX
from dice_ray.sections import Section

FIELDS = ("step", "probe_round", "source", "target", "value")
KEYS = FIELDS[:4]
SUFFIX = VARIANT_SUFFIX  # column suffix of each variant in contributions.parquet and shares.parquet



class LedgerConfig(Section):
    """Online contribution ledger (``contributions.py``): DICE-E of every participant's update on every
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
                                    "second-order (also b and the z′ Hessian term: about 3x curvature), "
                                    "exact-readout (the z′ loss difference along the curvature perturbation)")
    second_order_b: bool = Field(True, description=SECOND_ORDER_B)
    exact_readout_b: bool = Field(False, description=EXACT_READOUT_B)
    rank_by: Variant | None = Field(None, description="the variant whose totals give shares, harmful flags and "
                                                      "ranks (default: the first of variants)")

    @property
    def ranking(self) -> str:
        """The variant whose totals rank the participants: ``rank_by``, else the first of ``variants``."""
        return self.rank_by or self.variants[0]

    @property
    def active(self) -> bool:
        """Whether the run accounts contributions at all: the ledger, leave-one-out or Shapley retraining."""
        return self.enabled or self.loo or self.shapley_permutations > 0

    def check(self, config: Any) -> None:
        if self.rank_by is not None and self.rank_by not in self.variants:
            raise ValueError(f"ledger.rank_by {self.rank_by!r} is not one of ledger.variants "
                             f"({', '.join(self.variants)})")
        if not self.active:
            return
        if self.zprime == "validation" and config.data.val_fraction == 0:
            raise ValueError("ledger.zprime 'validation' needs validation splits (data.val_fraction > 0)")
        if config.rewiring.mode != "none":
            raise ValueError("rewiring changes W during the run; the contribution ledger needs the static "
                             "topology's path weights: use one or the other")


def ledger_round(config: Any, t: int) -> bool:
    """True iff round t's updates are probed by the ledger: ledger enabled and t % ledger.every == 0."""
    return bool(config.ledger.enabled) and t >= 0 and t % config.ledger.every == 0


def ledger_active(config: Any, t: int) -> bool:
    """True iff round t needs the ledger's gradient at θ^t: some round t−s, s = 0..R, is a ledger round."""
    return any(ledger_round(config, t - s) for s in range(config.ledger.hops + 1))


class LedgerProbes(ProbeSchedule):
    """The ledger's probes for ``OnlineCascades``: every source's whole-batch probe (j, t) of every ledger round t,
    probe id t·N + j, computed when asked (a long run has N probes per ledger round)."""

    def __init__(self, config: Any):
        self.config, self.n = config, config.nodes

    def __bool__(self) -> bool:
        return bool(self.config.ledger.enabled)

    def starting(self, u: int) -> list[Probe]:
        """The probes of round u: every source's, if u is a ledger round."""
        return [Probe(u * self.n + j, u, j) for j in range(self.n)] if ledger_round(self.config, u) else []

    def round_of(self, probe_id: int) -> int:
        """The probe round t of probe ``probe_id`` (t·N + j)."""
        return probe_id // self.n

    def in_flight(self, hops: int, u: int) -> list[int]:
        """Ids of the probes whose perturbation exists after round u's gossip (t ≤ u < t + R), ascending."""
        return [t * self.n + j for t in range(max(0, u - hops + 1), u + 1) if ledger_round(self.config, t)
                for j in range(self.n)]


def cascade_variants(config: Any) -> list[str]:
    """The ledger's variants that propagate a perturbation per source (curvature, second-order, exact-readout), in
    order."""
    return [v for v in config.ledger.variants if v != "first-order"]


class PathWeights:
    """First-reached path weights: F^{(s)}_{kj} = (W^{t+s−1} ⋯ W^t)_{kj} for k ∈ N^{(s)}(j), else 0 (concepts §3).

    ``mixing(t)`` returns W^t (scipy, N x N). Cached per s for a static W (``static``).
    """

    def __init__(self, mixing: Any, n: int, static: bool):
        self.mixing, self.n, self.static = mixing, n, static
        self._cache: dict[tuple[int, int], sp.csr_array] = {}

    def first_reached(self, t: int, s: int) -> sp.csr_array:
        """Return F^{(s)} for the probe round t: csr [N, N], rows targets k, columns sources j."""
        key = (0 if self.static else t, s)
        if key not in self._cache:  # sparse throughout: dense N x N products took 2 GB each at N = 16,384
            product = sp.identity(self.n, dtype=np.float64, format="csr")
            reached = product != 0  # support of P^{(0)} .. P^{(s-1)}
            for u in range(s):
                if u:
                    reached = (reached + (product != 0)) != 0
                product = sp.csr_array(self.mixing(t + u)) @ product
            first = sp.csr_array(product - product.multiply(reached))
            first.eliminate_zeros()
            self._cache[key] = first
        return self._cache[key]

    def terms(self, config: Any, u: int, columns: np.ndarray | None = None) -> list[tuple[int, int, sp.csr_array]]:
        """Return [(t, s, F^{(s)}[:, columns])] for every ledger round t = u − s, s = 1..R: the hop terms
        measured at the start of round u (``columns``: the hosted sources; default all)."""
        out = []
        if not self.static:  # time-varying W: products of probe rounds no later round reads
            for key in [key for key in self._cache if key[0] < u - config.ledger.hops]:
                del self._cache[key]
        for s in range(1, config.ledger.hops + 1):
            if ledger_round(config, u - s):
                f = self.first_reached(u - s, s)
                out.append((u - s, s, f if columns is None else sp.csr_array(f[:, columns])))
        return out


class LedgerExaminer:
    """The ledger's part of one ``ParticipantBlock`` (sources j: its hosted participants).

    Per round u: ``start(u)`` before the local step (gradient at θ^u if the round needs it, and θ^u on ledger
    rounds), ``take_delta(u)`` after it, ``terms(u, paths, gradients, ids)`` after gossip.
    """

    def __init__(self, block: Any, config: Any):
        self.block, self.config = block, config
        self.shared = round_quantities(block)  # Δ^t and ∇L(θ^u; z′), shared with the block's other hooks
        self.gradient: torch.Tensor | None = None
        self.deltas: dict[int, torch.Tensor] = {}  # probe round t -> Δ^t [P, D] of the hosted sources

    def start(self, u: int) -> torch.Tensor | None:
        """Take g = ∇L(θ^u; z′) [P, D] of the hosted participants if round u needs it (returned), and
        keep θ^u on ledger rounds."""
        self.gradient = self.shared.gradients(u, self.config.ledger.zprime) if ledger_active(self.config, u) else None
        if ledger_round(self.config, u):
            self.shared.keep_before(u)
        return self.gradient

    def take_delta(self, u: int) -> None:
        """After round u's local step: keep Δ^u = θ^{u+½} − θ^u on ledger rounds."""
        if ledger_round(self.config, u):
            self.deltas[u] = self.shared.update(u)[0].clone()  # read by R + 1 rounds, in float64 (exactly)

    def terms(self, u: int, paths: list[tuple[int, int, sp.csr_array]], gradients: list[torch.Tensor | np.ndarray],
              ids: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
        """Return the ledger terms measured at round u (None if u needs none).

        ``gradients``: g blocks whose concatenation holds the rows of the participants ``ids`` (default: every
        group's blocks in global participant order, [N, D]); they must cover every target of ``paths``;
        ``paths``: ``PathWeights.terms`` of round u for the hosted sources. Returns arrays [E] sorted by
        (probe_round, source, target): ``step`` s (0: the self term q_j's e_j^{(½)}), ``probe_round`` t = u − s,
        ``source`` j, ``target`` k (global ids) and ``value`` P^{(s)}_{kj} g_kᵀ Δ_j^t (without q_k).
        """
        if self.gradient is None:
            return None
        device, nodes = self.block.device, self.block.nodes
        parts: dict[str, list] = {f: [] for f in FIELDS}

        def add(step: int, t: int, source: np.ndarray, target: np.ndarray, value: torch.Tensor) -> None:
            for f, v in zip(FIELDS, (np.full(len(source), step), np.full(len(source), t), source, target,
                                     value.cpu().numpy()), strict=True):
                parts[f].append(v)

        if paths:  # the g blocks received, converted once (the own block's rows serve the self term)
            blocks = [(torch.as_tensor(b) if isinstance(b, np.ndarray) else b).to(device) for b in gradients]
            g = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
            ids = np.arange(len(g)) if ids is None else ids
            row_of = np.full(int(ids.max()) + 1, -1)  # global id -> row of g (own nodes and targets are in ids)
            row_of[ids] = np.arange(len(ids))
            own_g = g[torch.as_tensor(row_of[nodes], device=device)]
        else:
            own_g = self.gradient
        if u in self.deltas:
            add(0, u, nodes, nodes, torch.linalg.vecdot(own_g.double(), self.deltas[u].double()))
        hops = [(t, s, coo) for t, s, coo in ((t, s, sp.coo_array(f)) for t, s, f in paths or []) if coo.nnz]
        if hops:  # float64 a slice of the coordinates at a time, each slice of g converted once for every hop
            dots = [torch.zeros(coo.nnz, dtype=torch.float64, device=device) for _, _, coo in hops]
            for cut in float64_chunks(g.shape[1], g.shape[0] + 2 * len(nodes), device):
                g64 = g[:, cut].double()
                for total, (t, _, coo) in zip(dots, hops, strict=True):
                    total += edge_dots([(g64, self.deltas[t][:, cut].double())], row_of[coo.row], coo.col)[0]
            for total, (t, s, coo) in zip(dots, hops, strict=True):
                add(s, t, nodes[coo.col], coo.row.astype(np.int64),
                    torch.as_tensor(coo.data, dtype=torch.float64, device=device) * total)
        for t in [t for t in self.deltas if t <= u - self.config.ledger.hops]:
            del self.deltas[t]  # no later round reads it
        return sort_terms({f: np.concatenate(v) if v else np.zeros(0) for f, v in parts.items()})

    def snapshot(self, u: int) -> dict[str, np.ndarray]:
        """The kept updates after round u, per hosted row: ``ledger.delta`` [P, R, D] (Δ^{u−i} in slot i,
        zeros where none) and ``ledger.rounds`` [P, R] (the probe round, −1 where none)."""
        hops, pop = self.config.ledger.hops, self.block.population
        delta = np.zeros((self.block.size, hops, pop.state.shape[1]), np.float32)
        rounds = np.full((self.block.size, hops), -1, np.int64)
        for i in range(hops):
            if u - i in self.deltas:
                delta[:, i] = self.deltas[u - i].cpu().numpy()
                rounds[:, i] = u - i
        return {"ledger.delta": delta, "ledger.rounds": rounds}

    def restore(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Set the kept updates from a ``snapshot`` (None or no ledger arrays: none)."""
        self.deltas, self.gradient = {}, None
        self.shared.forget()
        if arrays is None or "ledger.rounds" not in arrays:
            return
        for i in range(arrays["ledger.rounds"].shape[1]):
            t = int(arrays["ledger.rounds"][0, i]) if len(arrays["ledger.rounds"]) else -1
            if t >= 0:
                self.deltas[t] = torch.as_tensor(np.array(arrays["ledger.delta"][:, i]), device=self.block.device)


def sort_terms(terms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return ``terms`` (FIELDS -> [E]) in (probe_round, source, target) order, ids as int64."""
    terms = {f: (np.asarray(v, np.float64) if f == "value" else np.asarray(v).astype(np.int64))
             for f, v in terms.items()}
    order = np.lexsort((terms["target"], terms["source"], terms["probe_round"]))
    return {f: v[order] for f, v in terms.items()}


def combine_terms(parts: list[dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
    """Merge the ``terms`` of several blocks (None if no block measured any)."""
    parts = [p for p in parts if p is not None]
    return sort_terms({f: np.concatenate([p[f] for p in parts]) for f in FIELDS}) if parts else None


def join_variants(first: dict[str, np.ndarray] | None, cascade: dict[str, np.ndarray] | None,
                  variants: list[str]) -> dict[str, np.ndarray] | None:
    """One round's terms of every variant on the same rows: ``KEYS`` -> [E] and one value column per variant of
    ``VARIANTS`` (NaN where not computed), sorted by (probe_round, source, target).

    ``first``: the first-order terms (``LedgerExaminer.terms``, combined) or None; ``cascade``: the cascade variants'
    (curvature, second-order, exact-readout: ``LedgerHook``'s cascade records, combined) or None. Both count the same
    terms — the self term and every k ∈ N^{(s)}(j) — so their keys must agree; a mismatch is a bug and raises."""
    cascaded = [v for v in variants if v != "first-order"]
    if first is None and (cascade is None or not cascaded):
        return None
    if cascade is not None and cascaded:
        order = np.lexsort((cascade["target"], cascade["source"], cascade["probe_round"]))
        cascade = {f: np.asarray(cascade[f]).astype(np.int64)[order] for f in KEYS} | {
            v: np.asarray(cascade[v], np.float64)[order] for v in cascaded}
    base = first if first is not None else cascade
    out = {f: base[f] for f in KEYS}
    n = len(out["step"])
    for v in VARIANTS:
        out[v] = np.full(n, np.nan)
    if first is not None and "first-order" in variants:
        out["first-order"] = first["value"]
    if cascade is not None and cascaded:
        if first is not None and not all(np.array_equal(first[f], cascade[f]) for f in KEYS):
            raise RuntimeError("the ledger's first-order and cascade terms count different (probe round, source, "
                               f"target, step) rows: {n} against {len(cascade['step'])}")
        for v in cascaded:
            out[v] = cascade[v]
    return out


class ContributionLedger:
    """The driver's pairwise ledger L[j→k] (cumulative q_k-weighted DICE-E terms), one per variant.

    Args: n: N participants; q: participant weights q_k [N]; variants: the variants summed (``VARIANTS``).
    """

    def __init__(self, n: int, q: np.ndarray, variants: list[str] | tuple[str, ...] = ("first-order",)):
        self.n, self.q, self.variants = n, np.asarray(q, np.float64), list(variants)
        self._keys = np.zeros(0, np.int64)  # source * n + target, sorted
        self._sums = {v: np.zeros(0, np.float64) for v in self.variants}

    def rows(self, u: int, terms: dict[str, np.ndarray]) -> dict[str, Any]:
        """Add the terms measured at round u (``join_variants``; or ``FIELDS`` with ``value`` the first-order
        term); return their rows of ``contributions.parquet``."""
        if "value" in terms and "first-order" not in terms:
            terms = {**terms, "first-order": terms["value"]}
        source, target = terms["source"], terms["target"]
        keys = source * self.n + target
        out = {"round": np.full(len(keys), u, np.int32), "probe_round": terms["probe_round"], "step": terms["step"],
               "source": source, "target": target}
        merged = self._keys
        for v in VARIANTS:
            influence = self.q[target] * terms[v] if v in self.variants else np.full(len(keys), np.nan)
            out[f"influence{SUFFIX[v]}"] = influence
            if v in self.variants:
                merged, self._sums[v] = sum_by_key([self._keys, keys], [self._sums[v], influence])
        self._keys = merged
        at = np.searchsorted(self._keys, keys)
        for v in VARIANTS:
            out[f"cumulative{SUFFIX[v]}"] = self._sums[v][at] if v in self.variants else np.full(len(keys), np.nan)
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The sums as arrays (a checkpoint's part): ``keys``, and ``sums`` (first-order), ``sums_curvature``,
        ``sums_second_order``, ``sums_exact_readout`` for the variants kept."""
        return {"keys": self._keys} | {f"sums{SUFFIX[v]}": self._sums[v] for v in self.variants}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the sums from ``state()`` (empty: none)."""
        self._keys = np.asarray(arrays.get("keys", np.zeros(0, np.int64)), np.int64)
        self._sums = {v: np.asarray(arrays.get(f"sums{SUFFIX[v]}", np.zeros(len(self._keys))), np.float64)
                      for v in self.variants}

    def matrix(self, variant: str = "first-order") -> np.ndarray:
        """Return L [N, N] of ``variant`` with L[j, k] = L[j→k] (0 for pairs never within R hops)."""
        out = np.zeros(self.n * self.n)
        out[self._keys] = self._sums[variant]
        return out.reshape(self.n, self.n)

    def totals(self, variant: str = "first-order") -> np.ndarray:
        """Return T_j = Σ_k L[j→k] [N] of ``variant``."""
        return self.matrix(variant).sum(axis=1)


def shares(totals: np.ndarray, by_variant: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Return the rows of ``shares.parquet``: share, harmful flag and rank from the ranking totals T [N] (see the
    module docstring for the rule); ``by_variant``: every variant's totals for the ``total`` (first-order),
    ``total_curvature``, ``total_second_order`` and ``total_exact_readout`` columns (default: ``totals`` are the
    first-order ones; a variant not given is NaN)."""
    totals = np.asarray(totals, np.float64)
    by_variant = {"first-order": totals} if by_variant is None else by_variant
    # A total that is not a number (a term read where no loss is defined) has no share and ranks last; the others
    # share the budget as if it were not there.
    helpful = np.maximum(-totals, 0.0)
    budget = np.nansum(helpful)
    share = helpful / budget if budget > 0 else np.where(np.isnan(totals), np.nan, 0.0)
    rank = np.empty(len(totals), np.int32)
    rank[np.argsort(totals, kind="stable")] = np.arange(1, len(totals) + 1)  # NaN sorts last
    out = {"participant": np.arange(len(totals), dtype=np.int32)}
    out["total"] = np.asarray(by_variant.get("first-order", np.full(len(totals), np.nan)), np.float64)
    out |= {"share": share, "harmful": totals > 0, "rank": rank}
    for v in VARIANTS[1:]:
        out[f"total{SUFFIX[v]}"] = np.asarray(by_variant.get(v, np.full(len(totals), np.nan)), np.float64)
    return out


# -- the method: its round hook (in every participant block), its router and its driver ---------------------


@dataclass
class LedgerMessage:
    """What a block sends on a ledger round: its g = ∇L(θ^u; z′) [P, D] (None: first-order off) and its
    stepped perturbations (``OnlineCascades.outgoing``; None: no cascade variant on)."""

    gradient: Any = None
    cascades: Any = None


class LedgerRouter(Router):
    """Routes the messages of round u: block g reads those of the blocks hosting the targets its sources reach
    within R hops (itself among them; for the first-order g) and, with a cascade variant on, those whose
    participants its rows of W^u read (for the perturbations); it gets the path weights of its sources' terms as
    ``info``."""

    def __init__(self, config: Any, topology: Any, blocks: list[np.ndarray], mixing: Any):
        super().__init__(config, topology, blocks, mixing)
        self.paths = PathWeights(topology.mixing_matrix, topology.n, not topology.time_varying)
        self.first = "first-order" in config.ledger.variants
        self.cascades = bool(cascade_variants(config))

    def routes(self, t: int) -> list[Route]:
        out = []
        w = sp.csr_array(self.mixing(t)) if self.cascades else None
        for g, block in enumerate(self.blocks):
            reads = {g}
            terms = self.paths.terms(self.config, t, block) if self.first else []
            if terms:
                targets = np.unique(np.concatenate([f.tocoo().row for _, _, f in terms]))
                reads |= set(self.owner[targets].tolist())
            if w is not None:
                reads |= set(self.owner[sp.csr_array(w[block]).indices].tolist())
            out.append(Route(sorted(reads), terms))
        return out


class LedgerHook(RoundHook):
    """The ledger in one block: g = ∇L(θ^u; z′) at the start of rounds that need it (sent to the blocks whose
    sources reach these participants), Δ^t kept on ledger rounds, the hosted sources' first-order terms after gossip;
    with a cascade variant (curvature, second-order, exact-readout), every hosted source's perturbation started on
    ledger rounds, stepped and gossiped like the in-loop DICE-E, and the hosted targets' terms recorded."""

    name = "ledger"
    router = LedgerRouter

    def __init__(self, block: Any, config: Any):
        super().__init__(block, config)
        self.first = "first-order" in config.ledger.variants
        self.examiner = LedgerExaminer(block, config)
        variants = cascade_variants(config)
        self.cascades = OnlineCascades(block, config, LedgerProbes(config), config.ledger.hops, variants,
                                       config.ledger.zprime, first_reached_only=True,
                                       with_b=config.ledger.second_order_b,
                                       exact_b=config.ledger.exact_readout_b) if variants else None

    @classmethod
    def sends(cls, config: Any) -> Callable[[int], bool]:
        return lambda t: ledger_active(config, t)

    def before_local_step(self, t: int) -> None:
        self.examiner.start(t)
        if self.cascades is not None:
            self.cascades.start(t)  # the same z′ gradients at θ^t of the hosted rows (``round_quantities``)

    def after_local_step(self, t: int) -> None:
        if self.first:
            self.examiner.take_delta(t)
        if self.cascades is not None:
            self.cascades.take_updates(t)

    def message(self, t: int, local: bool) -> Any:
        gradient = self.examiner.gradient if self.first else None
        return LedgerMessage(gradient if local or gradient is None else gradient.cpu().numpy(),
                             None if self.cascades is None else self.cascades.outgoing(local))

    def after_gossip(self, t: int, inbox: Inbox) -> dict[str, Any] | None:
        if not inbox.messages:
            return None
        first = cascade = None
        if self.first:
            first = self.examiner.terms(t, inbox.info, [m.gradient for m in inbox.messages],
                                        np.concatenate(inbox.ids))
        if self.cascades is not None:
            by_block = {int(ids[0]): m.cascades for ids, m in zip(inbox.ids, inbox.messages, strict=True)
                        if len(ids)}
            self.cascades.mix(inbox.weights, inbox.mixing_ids,
                              [by_block.get(int(ids[0])) if len(ids) else None for ids in inbox.mixing_ids])
            cascade = self._cascade_terms()
        return None if first is None and cascade is None else {"first": first, "cascade": cascade}

    def _cascade_terms(self) -> dict[str, np.ndarray] | None:
        """This round's cascade variants' terms of the hosted targets: ``KEYS`` and one column per cascade
        variant (without q_k)."""
        terms = self.cascades.terms()
        if terms is None:
            return None
        n = self.config.nodes
        return {"step": terms["step"], "probe_round": terms["probe_id"] // n, "source": terms["probe_id"] % n,
                "target": terms["target"]} | {v: terms[v] for v in self.cascades.variants}

    def snapshot(self, t: int) -> dict[str, np.ndarray]:
        out = self.examiner.snapshot(t) if self.first else {}
        if self.cascades is not None:  # prefixed: the in-loop DICE-E's own perturbations are cascade.*
            out |= {f"ledger.{k}": v for k, v in self.cascades.snapshot(t).items()}
        return out

    def restore(self, arrays: Mapping[str, np.ndarray] | None) -> None:
        self.examiner.restore(arrays)
        if self.cascades is not None:
            self.cascades.restore(None if arrays is None else
                                  {k[len("ledger."):]: v for k, v in arrays.items() if k.startswith("ledger.cascade.")})


def combine_records(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Merge the blocks' records of one round: first-order terms (``combine_terms``) and cascade terms."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    cascades = [p["cascade"] for p in parts if p["cascade"] is not None]
    return {"first": combine_terms([p["first"] for p in parts]),
            "cascade": {f: np.concatenate([c[f] for c in cascades]) for f in cascades[0]} if cascades else None}


class LedgerDriver(DriverHook):
    """The driver's pairwise ledger L[j→k] of each variant: the ``contributions`` table every round, ``shares`` at
    the end (ranked by ``ledger.rank_by``)."""

    name = "ledger"
    tables = {"contributions": CONTRIBUTIONS}

    def __init__(self, experiment: Any):
        super().__init__(experiment)
        self.variants = list(experiment.config.ledger.variants)
        self.ledger = ContributionLedger(experiment.config.nodes, experiment.q, self.variants)

    combine = staticmethod(combine_records)

    def on_round(self, t: int, record: Any) -> dict[str, Any]:
        if record is None:
            return {}
        terms = join_variants(record["first"], record["cascade"], self.variants)
        return {} if terms is None else {"contributions": self.ledger.rows(t, terms)}

    def finish(self) -> dict[str, Any]:
        ranking = self.experiment.config.ledger.ranking
        return {"shares": shares(self.ledger.totals(ranking), {v: self.ledger.totals(v) for v in self.variants})}

    def finish_schemas(self) -> dict[str, Any]:
        return {"shares": SHARES}

    def state(self) -> dict[str, np.ndarray]:
        return self.ledger.state()

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.ledger.load_state(arrays)


LEDGER_METHOD = Method("ledger", lambda config: bool(config.ledger.enabled), LedgerHook, LedgerDriver)
