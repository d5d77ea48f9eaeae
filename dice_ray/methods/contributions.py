"""Contribution accounting (issue 7): an online ledger of every participant's first-order DICE-E on every other.

For a ledger round t (``ledger.every``) and every source j, the whole-batch probe (j, t) has the first-order
DICE-E of SPEC §4 (J = I):

    DICE-E^{(R)}(j, t) = q_j ∇L(θ_j^t; z′)ᵀ Δ_j^t
                       + Σ_{s=1..R} Σ_{k ∈ N^{(s)}(j)} q_k P^{(s)}_{kj} ∇L(θ_k^{t+s}; z′)ᵀ Δ_j^t,

with Δ_j^t = θ_j^{t+½} − θ_j^t the update j sent, P^{(s)} = W^{t+s−1} ⋯ W^t and N^{(s)}(j) the participants
first reached at step s — exactly the ``est_first_order`` column of ``dice.parquet`` at hops R. The ledger adds
the term of target k to L[j→k] (the self term to L[j→j]); T_j = Σ_k L[j→k] is j's total contribution.

Adjoint view, online: at the start of every round u the participant groups take one batched gradient
g_k = ∇L(θ_k^u; z′) of every hosted k. That one pass serves the self term of round u's update (θ^u is where
round u starts) and hop s = u − t of every ledger round t in u−R..u−1, whatever the number of sources: only
dot products P^{(s)}_{kj} g_kᵀ Δ_j^t remain, for the pairs (k, j) of N^{(s)}(j) (sampled products, as in
``core.tensors.edge_dots``). Each group keeps the updates Δ of its own sources of the last R ledger rounds (they
are part of its checkpoint snapshot) and reads the other groups' gradients: with the ledger on, every group's
gradient block goes to every group on the rounds that need it. Hop terms need θ^{t+s} for t + s ≤ T − 1
(gradients are taken at round starts): probes of the last R rounds are truncated at hop T − 1 − t, as far as
the run goes; the influence tables, which need the whole window, probe rounds up to T − 1 − R only.

Sign (SPEC §2): influence = L(with) − L(without); negative: j's updates lowered the loss (helpful).
Shares: helpful participants (T_j < 0) split a positive budget, share_j = max(−T_j, 0) / Σ_l max(−T_l, 0);
a participant with T_j > 0 raised the network's weighted loss and is flagged harmful (share 0).

Pure torch and numpy: no Ray here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from dice_ray.core.tensors import edge_dots, sum_by_key
from dice_ray.hooks import DriverHook, Inbox, Method, RoundHook, Route, Router
from dice_ray.methods.proximal import ProximalExaminer
from dice_ray.results import CONTRIBUTIONS, SHARES

FIELDS = ("step", "probe_round", "source", "target", "value")


def ledger_round(config: Any, t: int) -> bool:
    """True iff round t's updates are probed by the ledger: ledger enabled and t % ledger.every == 0."""
    return bool(config.ledger.enabled) and t >= 0 and t % config.ledger.every == 0


def ledger_active(config: Any, t: int) -> bool:
    """True iff round t needs the ledger's gradient at θ^t: some round t−s, s = 0..R, is a ledger round."""
    return any(ledger_round(config, t - s) for s in range(config.ledger.hops + 1))


class PathWeights:
    """First-reached path weights: F^{(s)}_{kj} = (W^{t+s−1} ⋯ W^t)_{kj} for k ∈ N^{(s)}(j), else 0 (SPEC §3).

    ``mixing(t)`` returns W^t (scipy, N x N). Cached per s for a static W (``static``).
    """

    def __init__(self, mixing: Any, n: int, static: bool):
        self.mixing, self.n, self.static = mixing, n, static
        self._cache: dict[tuple[int, int], sp.csr_array] = {}

    def first_reached(self, t: int, s: int) -> sp.csr_array:
        """Return F^{(s)} for the probe round t: csr [N, N], rows targets k, columns sources j."""
        key = (0 if self.static else t, s)
        if key not in self._cache:
            product = np.eye(self.n)
            reached = product != 0  # support of P^{(0)} .. P^{(s-1)}
            for u in range(s):
                if u:
                    reached |= product != 0
                product = sp.csr_array(self.mixing(t + u)) @ product
            self._cache[key] = sp.csr_array(np.where(reached, 0.0, product))
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
        self._grads = ProximalExaminer(block, config.ledger.zprime)  # its ``gradients`` on the ledger's z′
        self.gradient: torch.Tensor | None = None
        self.deltas: dict[int, torch.Tensor] = {}  # probe round t -> Δ^t [P, D_params] (float64) of the hosted sources

    def start(self, u: int) -> torch.Tensor | None:
        """Take g = ∇L(θ^u; z′) [P, D_params] of the hosted participants if round u needs it (returned), and
        keep θ^u on ledger rounds."""
        self.gradient = self._grads.gradients() if ledger_active(self.config, u) else None
        if ledger_round(self.config, u):
            self._grads.keep_before()
        return self.gradient

    def take_delta(self, u: int) -> None:
        """After round u's local step: keep Δ^u = θ^{u+½} − θ^u on ledger rounds."""
        if ledger_round(self.config, u):
            self.deltas[u] = self._grads.take_delta().double()  # exact; converted once, read by R + 1 rounds

    def terms(self, u: int, paths: list[tuple[int, int, sp.csr_array]], gradients: list[torch.Tensor | np.ndarray],
              ids: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
        """Return the ledger terms measured at round u (None if u needs none).

        ``gradients``: g blocks whose concatenation holds the rows of the participants ``ids`` (default: every
        group's blocks in global participant order, [N, D_params]); they must cover every target of ``paths``;
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
            g = (blocks[0] if len(blocks) == 1 else torch.cat(blocks)).double()
            ids = np.arange(len(g)) if ids is None else ids
            row_of = np.full(int(ids.max()) + 1, -1)  # global id -> row of g (own nodes and targets are in ids)
            row_of[ids] = np.arange(len(ids))
            own_g = g[torch.as_tensor(row_of[nodes], device=device)]
        else:
            own_g = self.gradient.double()
        if u in self.deltas:
            add(0, u, nodes, nodes, torch.linalg.vecdot(own_g, self.deltas[u]))
        if paths:
            for t, s, f in paths:
                coo = sp.coo_array(f)
                if not coo.nnz:
                    continue
                rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
                [dots] = edge_dots([(g, self.deltas[t])], row_of[rows], cols)
                add(s, t, nodes[cols], rows, torch.as_tensor(coo.data, dtype=torch.float64, device=device) * dots)
        for t in [t for t in self.deltas if t <= u - self.config.ledger.hops]:
            del self.deltas[t]  # no later round reads it
        return sort_terms({f: np.concatenate(v) if v else np.zeros(0) for f, v in parts.items()})

    def snapshot(self, u: int) -> dict[str, np.ndarray]:
        """The kept updates after round u, per hosted row: ``ledger.delta`` [P, R, D_params] (Δ^{u−i} in slot i,
        zeros where none) and ``ledger.rounds`` [P, R] (the probe round, −1 where none)."""
        hops, pop = self.config.ledger.hops, self.block.population
        delta = np.zeros((self.block.size, hops, pop.params.shape[1]), np.float32)
        rounds = np.full((self.block.size, hops), -1, np.int64)
        for i in range(hops):
            if u - i in self.deltas:
                delta[:, i] = self.deltas[u - i].cpu().numpy()
                rounds[:, i] = u - i
        return {"ledger.delta": delta, "ledger.rounds": rounds}

    def restore(self, arrays: dict[str, np.ndarray] | None) -> None:
        """Set the kept updates from a ``snapshot`` (None or no ledger arrays: none)."""
        self.deltas, self.gradient = {}, None
        if arrays is None or "ledger.rounds" not in arrays:
            return
        for i in range(arrays["ledger.rounds"].shape[1]):
            t = int(arrays["ledger.rounds"][0, i]) if len(arrays["ledger.rounds"]) else -1
            if t >= 0:
                self.deltas[t] = torch.as_tensor(np.array(arrays["ledger.delta"][:, i]),
                                                 device=self.block.device).double()


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


class ContributionLedger:
    """The driver's pairwise ledger L[j→k] (cumulative q_k-weighted first-order DICE-E terms).

    Args: n: N participants; q: participant weights q_k [N].
    """

    def __init__(self, n: int, q: np.ndarray):
        self.n, self.q = n, np.asarray(q, np.float64)
        self._keys = np.zeros(0, np.int64)  # source * n + target, sorted
        self._sums = np.zeros(0, np.float64)

    def rows(self, u: int, terms: dict[str, np.ndarray]) -> dict[str, Any]:
        """Add the terms measured at round u; return their rows of ``contributions.parquet``."""
        source, target = terms["source"], terms["target"]
        influence = self.q[target] * terms["value"]
        keys = source * self.n + target
        self._keys, self._sums = sum_by_key([self._keys, keys], [self._sums, influence])
        return {"round": np.full(len(keys), u, np.int32), "probe_round": terms["probe_round"], "step": terms["step"],
                "source": source, "target": target, "influence": influence,
                "cumulative": self._sums[np.searchsorted(self._keys, keys)]}

    def state(self) -> dict[str, np.ndarray]:
        """The sums as arrays (a checkpoint's part)."""
        return {"keys": self._keys, "sums": self._sums}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the sums from ``state()`` (empty: none)."""
        self._keys = np.asarray(arrays.get("keys", np.zeros(0, np.int64)), np.int64)
        self._sums = np.asarray(arrays.get("sums", np.zeros(0)), np.float64)

    def matrix(self) -> np.ndarray:
        """Return L [N, N] with L[j, k] = L[j→k] (0 for pairs never within R hops)."""
        out = np.zeros(self.n * self.n)
        out[self._keys] = self._sums
        return out.reshape(self.n, self.n)

    def totals(self) -> np.ndarray:
        """Return T_j = Σ_k L[j→k] [N]."""
        return self.matrix().sum(axis=1)


def shares(totals: np.ndarray) -> dict[str, np.ndarray]:
    """Return the rows of ``shares.parquet`` for totals T [N] (see the module docstring for the rule)."""
    totals = np.asarray(totals, np.float64)
    helpful = np.maximum(-totals, 0.0)
    budget = helpful.sum()
    share = helpful / budget if budget > 0 else np.zeros_like(totals)
    rank = np.empty(len(totals), np.int32)
    rank[np.argsort(totals, kind="stable")] = np.arange(1, len(totals) + 1)
    return {"participant": np.arange(len(totals), dtype=np.int32), "total": totals, "share": share,
            "harmful": totals > 0, "rank": rank}


# -- the method: its round hook (in every participant block), its router and its driver ---------------------


class LedgerRouter(Router):
    """Routes the gradient blocks g of round u: block g reads those of the blocks hosting the targets its sources
    reach within R hops (itself among them), and gets the path weights of its sources' terms as ``info``."""

    def __init__(self, config: Any, topology: Any, blocks: list[np.ndarray], mixing: Any):
        super().__init__(config, topology, blocks, mixing)
        self.paths = PathWeights(topology.mixing_matrix, topology.n, not topology.time_varying)

    def routes(self, t: int) -> list[Route]:
        out = []
        for g, block in enumerate(self.blocks):
            terms = self.paths.terms(self.config, t, block)
            targets = np.unique(np.concatenate([f.tocoo().row for _, _, f in terms] or [np.zeros(0, np.int64)]))
            out.append(Route(sorted(set(self.owner[targets].tolist()) | {g}), terms))
        return out


class LedgerHook(RoundHook):
    """The ledger in one block: g = ∇L(θ^u; z′) at the start of rounds that need it (sent to the blocks whose
    sources reach these participants), Δ^t kept on ledger rounds, the hosted sources' terms after gossip."""

    name = "ledger"
    router = LedgerRouter

    def __init__(self, block: Any, config: Any):
        super().__init__(block, config)
        self.examiner = LedgerExaminer(block, config)

    @classmethod
    def sends(cls, config: Any) -> Callable[[int], bool]:
        return lambda t: ledger_active(config, t)

    def before_local_step(self, t: int) -> None:
        self.examiner.start(t)

    def after_local_step(self, t: int) -> None:
        self.examiner.take_delta(t)

    def message(self, t: int, local: bool) -> Any:
        gradient = self.examiner.gradient
        return gradient if local or gradient is None else gradient.cpu().numpy()

    def after_gossip(self, t: int, inbox: Inbox) -> dict[str, np.ndarray] | None:
        if not inbox.messages:
            return None
        return self.examiner.terms(t, inbox.info, inbox.messages, np.concatenate(inbox.ids))

    def snapshot(self, t: int) -> dict[str, np.ndarray]:
        return self.examiner.snapshot(t)

    def restore(self, arrays: Mapping[str, np.ndarray] | None) -> None:
        self.examiner.restore(arrays)


class LedgerDriver(DriverHook):
    """The driver's pairwise ledger L[j→k]: the ``contributions`` table every round, ``shares`` at the end."""

    name = "ledger"
    tables = {"contributions": CONTRIBUTIONS}

    def __init__(self, experiment: Any):
        super().__init__(experiment)
        self.ledger = ContributionLedger(experiment.config.nodes, experiment.q)

    combine = staticmethod(combine_terms)

    def on_round(self, t: int, record: Any) -> dict[str, Any]:
        return {} if record is None else {"contributions": self.ledger.rows(t, record)}

    def finish(self) -> dict[str, Any]:
        return {"shares": shares(self.ledger.totals())}

    def finish_schemas(self) -> dict[str, Any]:
        return {"shares": SHARES}

    def state(self) -> dict[str, np.ndarray]:
        return self.ledger.state()

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.ledger.load_state(arrays)


LEDGER_METHOD = Method("ledger", lambda config: bool(config.ledger.enabled), LedgerHook, LedgerDriver)
