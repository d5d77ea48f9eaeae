"""Proximal influence (concepts §5): every examiner k scores each of its in-neighbours l, online, every round.

    p_{k←l}^t = q_k W^t_kl ∇L(θ_k^{t+1}; z′_k)ᵀ Δ_l^t,     Δ_l^t = θ_l^{t+½} − θ_l^t,

on k's own validation split z′_k (or the shared held-out batch). Δ_l^t is the update l actually sent: for
sign-flip, scale and free-ride participants the corrupted one. Positive: l's update raises k's loss
(harmful); negative: it lowers it (helpful). The self term l = k is not scored (the table is about
in-neighbours).

With ``proximal.readout`` ``exact`` the same pair is read with the loss itself (concepts §4, exact readout), at the
same state:

    p_{k←l}^t = q_k [L(θ_k^{t+1}; z′_k) − L(θ_k^{t+1} − W^t_kl Δ_l^t; z′_k)],

the counterfactual effect on k's loss of l's update of round t one gossip later (θ_k^{t+1} − W^t_kl Δ_l^t is k's
state had l not stepped): one forward pass over z′_k per edge, L(θ_k^{t+1}; z′_k) once per examiner.

``ProximalExaminer`` does the block's part inside a participant group (Ray actor or local engine): on scoring
rounds it reads Δ^t of the hosted participants and, after gossip, one vectorized gradient per examiner at θ^{t+1}
(both from the block's ``round_quantities``, computed once for every method that reads them), then takes a dot
product per edge. It
also measures the cosine of the two updates, cos(Δ_k, Δ_l), the baseline the detection report compares
with. Scores leave the block without q_k; the driver's ``ProximalLedger`` multiplies by q_k, keeps the
cumulative and windowed sums and writes ``proximal.parquet``. Pure torch and numpy: no Ray here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
from pydantic import Field

from dice_ray.core.tensors import as_tensor, edge_dots, float64_chunks, sum_by_key, to_device
from dice_ray.hooks import DriverHook, Inbox, Method, RoundHook
from dice_ray.methods.round_quantities import round_quantities
from dice_ray.results import PROXIMAL
from dice_ray.sections import Section

FIELDS = ("examiner", "neighbor", "weight", "dot", "cosine")



class ProximalConfig(Section):
    """Online proximal influence (concepts §5): every examiner k scores each in-neighbour l. Off unless ``enabled``."""

    enabled: bool = Field(False, description="score every in-neighbour by proximal influence "
                                             "p_{k←l} = q_k W_kl ∇L(θ_k^{t+1}; z′_k)ᵀ Δ_l (proximal.parquet)")
    every: int = Field(1, ge=1, description="score on every k-th round (rounds t with t % every == 0)")
    zprime: Literal["validation", "heldout"] = Field("validation", description="z′_k: the examiner's own "
                                                                              "validation split, or the "
                                                                              "shared held-out batch")
    window: int = Field(10, ge=1, description="scoring rounds summed in the windowed score")
    readout: Literal["first-order", "exact"] = Field(
        "first-order", description="first-order: p_{k←l} = q_k W_kl ∇L(θ_k^{t+1}; z′_k)ᵀ Δ_l; exact: the loss itself, "
                                   "q_k [L(θ_k^{t+1}; z′_k) − L(θ_k^{t+1} − W_kl Δ_l; z′_k)], the counterfactual "
                                   "effect of l's update (one forward pass over z′_k per edge)")

    def check(self, config: Any) -> None:
        if not self.enabled:
            return
        if self.zprime == "validation" and config.data.val_fraction == 0:
            raise ValueError("proximal.zprime 'validation' needs validation splits (data.val_fraction > 0)")


def scoring_round(config: Any, t: int) -> bool:
    """True iff round t is scored: proximal influence is enabled and t % proximal.every == 0."""
    return bool(config.proximal.enabled) and t % config.proximal.every == 0


class ProximalExaminer:
    """The proximal-influence part of one ``ParticipantBlock`` (the examiners k are its hosted participants).

    Per scoring round t: ``keep_before(t)`` before the block's ``half_step``, ``take_delta(t)`` right after it
    (Δ [P, D], kept as ``delta``), ``score(t, ...)`` after ``mix``. Δ^t and the z′ gradients come from the
    block's ``round_quantities``, shared with the ledger and in-loop DICE-E.
    """

    def __init__(self, block: Any, zprime: str = "validation", readout: str = "first-order"):
        self.block = block
        self.zprime = zprime
        self.readout = readout
        self.shared = round_quantities(block)
        self.delta: torch.Tensor | None = None

    def keep_before(self, t: int) -> None:
        """Keep θ^t of the hosted participants (before their local step)."""
        self.shared.keep_before(t)

    def take_delta(self, t: int) -> torch.Tensor:
        """Return and keep Δ^t = θ^{t+½} − θ^t [P, D] (the update each hosted participant sends)."""
        self.delta = self.shared.update(t)[0]
        return self.delta

    def score(self, t: int, weights: list[sp.csr_array], deltas: list[Any], source_ids: list[np.ndarray]) -> dict:
        """Score every in-neighbour of every hosted examiner in round t; call after ``mix`` (θ = θ^{t+1}).

        ``weights[b]`` [P, M_b]: the rows of W^t for the hosted participants over source block b, whose
        updates are ``deltas[b]`` [M_b, D] and whose global ids are ``source_ids[b]`` [M_b].
        Returns numpy arrays [E], one entry per edge l → k with W^t_kl > 0, l ≠ k, sorted by (examiner,
        neighbor): ``examiner``, ``neighbor`` (global ids), ``weight`` W^t_kl, ``dot`` W^t_kl ∇L(θ_k^{t+1};
        z′_k)ᵀ Δ_l (p_{k←l} without q_k; ``readout`` exact: L(θ_k^{t+1}; z′_k) − L(θ_k^{t+1} − W^t_kl Δ_l; z′_k)) and
        ``cosine`` cos(Δ_k, Δ_l) (0 where either update is zero).
        """
        device = self.block.device
        g, own = self.shared.gradients(t + 1, self.zprime), self.delta
        parts: dict[str, list] = {f: [] for f in FIELDS}
        for w, d, ids in zip(weights, deltas, source_ids, strict=True):
            coo = sp.coo_array(w)
            examiner, neighbor = self.block.nodes[coo.row], np.asarray(ids, np.int64)[coo.col]
            keep = (examiner != neighbor) & (coo.data > 0)
            rows, cols, data = coo.row[keep].astype(np.int64), coo.col[keep].astype(np.int64), coo.data[keep]
            d = as_tensor(d, device) if isinstance(d, np.ndarray) else d
            # Dot products and norms in float64, a slice of the coordinates at a time: float64 copies of whole blocks
            # took 6x the state's memory at N = 4,096 (sums of the slices' float64 parts: exact to float64 rounding).
            grad_dot, update_dot = (torch.zeros(len(rows), dtype=torch.float64, device=device) for _ in range(2))
            own_sq = torch.zeros(g.shape[0], dtype=torch.float64, device=device)
            d_sq = torch.zeros(d.shape[0], dtype=torch.float64, device=device)
            for cut in float64_chunks(g.shape[1], 2 * g.shape[0] + d.shape[0], device):
                a, own_a, b = (x[:, cut].double() for x in (g, own, d))
                parts_g, parts_u = edge_dots([(a, b), (own_a, b)], rows, cols)
                grad_dot += parts_g
                update_dot += parts_u
                own_sq += own_a.square().sum(dim=1)
                d_sq += b.square().sum(dim=1)
            weight = torch.as_tensor(data, dtype=torch.float64, device=device)
            at_rows, at_cols = to_device([rows, cols], device)
            norms = (own_sq[at_rows] * d_sq[at_cols]).sqrt()
            cosine = torch.where(norms > 0, update_dot / norms.clamp_min(1e-300), 0.0)
            score = weight * grad_dot if self.readout == "first-order" else self.exact_scores(t, rows, weight, d, cols)
            for f, v in zip(FIELDS, (examiner[keep], neighbor[keep], weight, score, cosine), strict=True):
                parts[f].append(v.cpu().numpy() if isinstance(v, torch.Tensor) else v)
        return sort_scores({f: np.concatenate(v) if v else np.zeros(0) for f, v in parts.items()})


    def exact_scores(self, t: int, rows: np.ndarray, weight: torch.Tensor, deltas: torch.Tensor,
                     cols: np.ndarray) -> torch.Tensor:
        """L(θ_k^{t+1}; z′_k) − L(θ_k^{t+1} − W^t_kl Δ_l; z′_k) [E] float64, per edge: examiner rows ``rows`` [E]
        (positions in the block), ``weight`` W^t_kl [E], the source block's updates ``deltas`` [M, D] and the
        edges' source rows ``cols`` [E]; call after ``mix``. A bounded number of edges at a time (each needs its
        own float64 state)."""
        pop, device = self.block.population, self.block.device
        factual = self.shared.losses(t + 1, self.zprime)
        out = []
        for cut in float64_chunks(len(rows), 2 * pop.state.shape[1], device):
            pos, src = to_device([rows[cut], cols[cut]], device)
            states = pop.state[pos].double()  # in float64, as the losses are read (``RoundQuantities.losses_at``)
            updates = deltas[src].double()
            states[:, : updates.shape[1]] -= weight[cut, None] * updates  # k's state had l not stepped
            out.append(factual[pos] - self.shared.losses_at(pos, states, self.zprime))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=device)


def sort_scores(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return ``scores`` (FIELDS -> [E]) in (examiner, neighbor) order, ids as int64."""
    scores = {**scores, "examiner": scores["examiner"].astype(np.int64),
              "neighbor": scores["neighbor"].astype(np.int64)}
    order = np.lexsort((scores["neighbor"], scores["examiner"]))
    return {f: np.asarray(v)[order] for f, v in scores.items()}


def combine_scores(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Merge the ``score`` outputs of several blocks into one, in (examiner, neighbor) order."""
    return sort_scores({f: np.concatenate([p[f] for p in parts]) for f in FIELDS})


class ProximalLedger:
    """The driver's running sums of proximal influence per pair (examiner k, neighbour l).

    Args:
        n: N participants. q: participant weights q_k [N]. misbehaving: ids of anomalous participants.
        window: number of scoring rounds summed in the windowed score.
    """

    def __init__(self, n: int, q: np.ndarray, misbehaving: np.ndarray, window: int):
        self.n, self.q, self.window = n, np.asarray(q, np.float64), window
        self.anomalous = np.isin(np.arange(n), misbehaving)
        self._keys = np.zeros(0, np.int64)  # examiner * n + neighbor, sorted
        self._sums = np.zeros(0, np.float64)
        self._recent: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=window)

    def rows(self, t: int, scores: dict[str, np.ndarray]) -> dict[str, Any]:
        """Add round t's ``scores`` (a block ``score`` output); return its rows of ``proximal.parquet``."""
        examiner, neighbor = scores["examiner"], scores["neighbor"]
        p = self.q[examiner] * scores["dot"]
        keys = examiner * self.n + neighbor
        self._keys, self._sums = sum_by_key([self._keys, keys], [self._sums, p])
        self._recent.append((keys, p))
        win_keys, win_sums = sum_by_key(*zip(*self._recent, strict=True))
        return {"round": np.full(len(p), t, np.int32), "examiner": examiner, "neighbor": neighbor,
                "weight": scores["weight"], "score": p,
                "cumulative_score": self._sums[np.searchsorted(self._keys, keys)],
                "window_score": win_sums[np.searchsorted(win_keys, keys)],
                "update_cosine": scores["cosine"], "neighbor_is_anomalous": self.anomalous[neighbor]}

    def state(self) -> dict[str, np.ndarray]:
        """The running sums as arrays (a checkpoint's part): keys and sums, and the window's rounds."""
        recent = list(self._recent)
        return {"keys": self._keys, "sums": self._sums,
                "recent_keys": np.concatenate([k for k, _ in recent]) if recent else np.zeros(0, np.int64),
                "recent_values": np.concatenate([v for _, v in recent]) if recent else np.zeros(0),
                "recent_lengths": np.array([len(k) for k, _ in recent], np.int64)}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the running sums from ``state()`` (empty: none)."""
        self._keys = np.asarray(arrays.get("keys", np.zeros(0, np.int64)), np.int64)
        self._sums = np.asarray(arrays.get("sums", np.zeros(0)), np.float64)
        self._recent = deque(maxlen=self.window)
        bounds = np.concatenate([[0], np.cumsum(arrays.get("recent_lengths", np.zeros(0, np.int64)))]).astype(int)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            self._recent.append((np.asarray(arrays["recent_keys"][a:b], np.int64),
                                 np.asarray(arrays["recent_values"][a:b], np.float64)))

    def cumulative(self, examiner: int, neighbors: np.ndarray) -> np.ndarray:
        """Return the cumulative score of (examiner, l) for each l of ``neighbors`` (NaN: never scored)."""
        keys = examiner * self.n + np.asarray(neighbors, np.int64)
        if not len(self._keys):
            return np.full(len(keys), np.nan)
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[at] == keys, self._sums[at], np.nan)


# -- the method: its round hook (in every participant block) and its driver --------------------------------


class ProximalHook(RoundHook):
    """Proximal influence in one block: θ^t kept before the local step of a scoring round, Δ^t taken after it
    and sent with the half-step, every hosted examiner's in-neighbours scored after gossip."""

    name = "proximal"

    def __init__(self, block: Any, config: Any):
        super().__init__(block, config)
        self.examiner = ProximalExaminer(block, config.proximal.zprime, config.proximal.readout)

    @classmethod
    def sends(cls, config: Any) -> Callable[[int], bool]:
        return lambda t: scoring_round(config, t)

    def before_local_step(self, t: int) -> None:
        if scoring_round(self.config, t):
            self.examiner.keep_before(t)

    def after_local_step(self, t: int) -> None:
        if scoring_round(self.config, t):
            self.examiner.take_delta(t)

    def message(self, t: int, local: bool) -> Any:
        return self.examiner.delta if local else self.examiner.delta.cpu().numpy()

    def after_gossip(self, t: int, inbox: Inbox) -> dict[str, np.ndarray] | None:
        if not scoring_round(self.config, t):
            return None
        return self.examiner.score(t, inbox.weights, inbox.messages, inbox.ids)

    def restore(self, arrays: Mapping[str, np.ndarray] | None) -> None:
        self.examiner.shared.forget()


class ProximalDriver(DriverHook):
    """The driver's ``ProximalLedger`` and the ``proximal`` table."""

    name = "proximal"
    tables = {"proximal": PROXIMAL}

    def __init__(self, experiment: Any):
        super().__init__(experiment)
        config = experiment.config
        self.ledger = ProximalLedger(config.nodes, experiment.q, experiment.misbehaving, config.proximal.window)

    combine = staticmethod(lambda parts: combine_scores(parts) if any(p is not None for p in parts) else None)

    def on_round(self, t: int, record: Any) -> dict[str, Any]:
        return {} if record is None else {"proximal": self.ledger.rows(t, record)}

    def state(self) -> dict[str, np.ndarray]:
        return self.ledger.state()

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.ledger.load_state(arrays)


PROXIMAL_METHOD = Method("proximal", lambda config: bool(config.proximal.enabled), ProximalHook, ProximalDriver)
