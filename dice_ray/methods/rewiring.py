"""Collaborator selection (concepts §5): every K rounds each participant re-chooses whom it listens to.

Before rounds K, 2K, … every participant k takes a candidate pool — its current in-neighbours plus
``rewiring.candidates`` random other participants (more where fewer would leave the pool short of m) — and keeps m
of them as its in-neighbours:

- ``influence``: the m with the lowest cumulative proximal influence Σ_t p_{k←l}^t (most helpful: negative
  lowers k's loss). A candidate k never heard scores 0 (neutral), so it replaces a harmful neighbour but
  not a helpful one; ties are broken in a random order. A neighbour that sends no change (a free rider, a
  participant without data) scores 0 too. A participant that has no score for any of its in-neighbours (no
  validation data to score them on) keeps them, having nothing to choose by (m of them at random where it has
  more, topped up with candidates at random where fewer).
- ``outlier``: judged against one's own neighbourhood, which drifts less than an absolute rule (later in
  training honest neighbours' cumulative scores turn positive too, and ``influence`` then swaps them for
  never-heard candidates). An in-neighbour is dropped only if its cumulative score is positive and above the
  median of k's in-neighbours by more than ``rewiring.outlier_z`` robust standard deviations (1.4826 × MAD);
  the free places go to the pool's other candidates, never-heard ones counting as the median and known
  outliers never, the lowest first (ties in a random order). In-degrees are brought to m the same way.
- ``random``: m of the same pool at random (the baseline), from the rewiring seed.

The choice is directed — k decides whom k listens to; l is not forced to listen back — so a participant
everyone drops keeps listening but is heard by no one. W is rebuilt with Metropolis–Hastings weights over
the new in-degrees (W_kl = 1/(1 + max(deg_k, deg_l)), W_kk = 1 − Σ; every in-degree is m, so all weights
are 1/(m+1)); row-stochastic with self-loops. Such a graph need not be strongly connected (that is the
point of excluding someone), but it must be *rooted*: one strongly connected component that reaches
everyone, so honest participants still reach consensus. If a choice is not rooted, the previous W stays
(its rows are recorded as ``kept``; a warning line says so). W is row-stochastic but not doubly stochastic: column
l sums to (1 + the number of participants keeping l)/(m + 1), so consensus weighs the participants many keep more.
Pure numpy/scipy; the driver hands the new W to the engine.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field
from scipy.sparse import csgraph

from dice_ray.core.topology import TIME_VARYING, metropolis_weights
from dice_ray.hooks import DriverHook, Method
from dice_ray.results import REWIRING
from dice_ray.sections import RECORDED, Section


class RewiringConfig(Section):
    """Collaborator selection (concepts §5): every K rounds each participant keeps m in-neighbours. Off with none."""

    mode: Literal["none", "influence", "outlier", "random"] = Field(
        "none", description="none: static W; influence: keep the m candidates with the lowest (most helpful) "
                            "cumulative proximal influence; outlier: drop only in-neighbours whose cumulative "
                            "influence is a harmful outlier among one's in-neighbours and fill their places from "
                            "the candidates; random: keep m random candidates")
    every: int = Field(10, ge=1, description="K: rewire before rounds K, 2K, ...")
    keep: int = Field(4, ge=1, description="m: in-neighbours each participant keeps")
    candidates: int = Field(4, ge=0, description="random non-neighbours added to each participant's "
                                                 "candidate pool (besides its current in-neighbours; more where "
                                                 "the pool would hold fewer than keep)")
    seed: int | None = Field(None, ge=0, lt=2**32, description="seed of the random candidates and of random "
                                                               "rewiring (default: the run's seed)")
    outlier_z: float = Field(3.0, gt=0, le=100, description="outlier mode: an in-neighbour is dropped when its "
                                                            "cumulative influence is positive and exceeds the "
                                                            "median of one's in-neighbours by this many robust "
                                                            "standard deviations (1.4826 MAD)")

    def check(self, config: Any) -> None:
        if self.mode == "none":
            return
        if self.mode in ("influence", "outlier") and not config.proximal.enabled:
            raise ValueError(f"rewiring.mode {self.mode!r} needs proximal influence (proximal.enabled, --proximal)")
        if self.every > config.rounds - 1 and not RECORDED.get():  # it rewires before rounds K, 2K, ...: none here
            raise ValueError(f"rewiring.every {self.every} rewires before round {self.every}, but the run has rounds "
                             f"0..{config.rounds - 1}: no rewiring would happen")
        if self.keep > config.nodes - 1:
            raise ValueError(f"rewiring.keep {self.keep} exceeds the {config.nodes - 1} other participants")
        if config.topology.name in TIME_VARYING:
            raise ValueError(f"rewiring needs a static topology, got time-varying {config.topology.name!r}")
        if config.influence.enabled:
            raise ValueError("rewiring changes W during the run; DICE influence (influence.enabled, --influence) "
                             "replays the static topology: use one or the other")


def in_neighbor_sets(w: Any) -> list[np.ndarray]:
    """Return, per participant k, the sorted ids l ≠ k with W[k, l] > 0."""
    w = sp.csr_array(w)
    out = []
    for k in range(w.shape[0]):
        cols, vals = w.indices[w.indptr[k]:w.indptr[k + 1]], w.data[w.indptr[k]:w.indptr[k + 1]]
        out.append(np.sort(cols[(vals > 0) & (cols != k)]).astype(np.int64))
    return out


def metropolis_mixing(in_neighbors: list[np.ndarray]) -> sp.csr_array:
    """Return the Metropolis–Hastings W [N, N] of the directed graph l → k for l in ``in_neighbors[k]``."""
    n = len(in_neighbors)
    rows = np.concatenate([np.full(len(nb), k) for k, nb in enumerate(in_neighbors)]).astype(np.int64)
    cols = np.concatenate(in_neighbors).astype(np.int64)
    return metropolis_weights(sp.csr_array((np.ones(len(rows)), (rows, cols)), shape=(n, n)))


def is_rooted(w: Any) -> bool:
    """True iff one strongly connected component of W's graph reaches every participant (the condensation
    has exactly one component without incoming edges): the condition for consensus under gossip."""
    w = sp.coo_array(w)
    positive = sp.csr_array((np.ones(int((w.data > 0).sum())), (w.row[w.data > 0], w.col[w.data > 0])),
                            shape=w.shape)
    count, labels = csgraph.connected_components(positive, directed=True, connection="strong")
    coo = positive.tocoo()
    cross = labels[coo.row] != labels[coo.col]
    fed = np.zeros(count, bool)
    fed[labels[coo.row[cross]]] = True  # row k receives from column l: k's component has an incoming edge
    return int((~fed).sum()) == 1


def _outlier_choice(current: np.ndarray, extras: np.ndarray, s_current: np.ndarray, s_extras: np.ndarray,
                    keep: int, z: float) -> np.ndarray:
    """The ``outlier`` rule for one participant (see the module docstring); ``extras`` are in random order."""
    known = s_current[~np.isnan(s_current)]
    median = float(np.median(known)) if len(known) else 0.0
    spread = 1.4826 * float(np.median(np.abs(known - median))) if len(known) else 0.0
    limit = median + z * spread

    def outlier(s: np.ndarray) -> np.ndarray:
        return ~np.isnan(s) & (s > 0) & (s > limit)

    def filled(s: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(s), median, s)

    def ranked(ids: np.ndarray, s: np.ndarray) -> np.ndarray:  # the non-outliers, lowest score first
        ok = ~outlier(s)
        return ids[ok][np.argsort(filled(s[ok]), kind="stable")]

    stay = ranked(current, s_current)[:keep]
    fresh = ranked(extras, s_extras)
    pick = np.concatenate([stay, fresh[: keep - len(stay)]])
    if len(pick) < keep:  # more outliers than candidates: the least harmful of them make up the number
        pool, s = np.concatenate([current, extras]), np.concatenate([s_current, s_extras])
        rest = np.isin(pool, pick, invert=True)
        pick = np.concatenate([pick, pool[rest][np.argsort(s[rest], kind="stable")][: keep - len(pick)]])
    return pick


def _draw_others(n: int, excluded: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``rng.choice(others, min(size, len(others)), replace=False)`` for ``others`` the participants 0..n−1 not in
    ``excluded``, ascending, without building ``others`` (O(n) per participant made rewiring O(N² log N): 43 s at
    N = 16,384): the same draws, then each index among the others mapped to its id past the excluded below it."""
    excluded = np.unique(excluded)
    idx = rng.choice(n - len(excluded), min(size, n - len(excluded)), replace=False)
    return idx + np.searchsorted(excluded - np.arange(len(excluded)), idx, side="right")


def select_collaborators(mode: str, current: list[np.ndarray], keep: int, extra: int, rng: np.random.Generator,
                         scores: Any = None, outlier_z: float = 3.0) -> list[np.ndarray]:
    """Return the new in-neighbour set of every participant (sorted int64 arrays of size ``keep``).

    ``current[k]``: k's in-neighbours now; the pool adds ``extra`` random others (not k, not current), or as many as
    the pool needs to hold ``keep``.
    ``scores(k, pool)`` -> cumulative proximal influence [len(pool)] (NaN: never scored; read as 0 by
    ``influence``, as the neighbourhood's median by ``outlier``); needed for both. ``random`` keeps ``keep``
    of the pool at random. ``outlier_z``: the ``outlier`` rule's threshold.
    """
    n = len(current)
    chosen = []
    for k in range(n):
        pool = np.concatenate([current[k], _draw_others(n, np.append(current[k], k),
                                                         max(extra, keep - len(current[k])), rng)])
        if mode == "outlier":
            extras = rng.permutation(pool[len(current[k]):])  # random tie-break among candidates
            s = np.asarray(scores(k, np.concatenate([current[k], extras])), np.float64)
            pick = _outlier_choice(current[k], extras, s[:len(current[k])], s[len(current[k]):], keep, outlier_z)
            chosen.append(np.sort(pick).astype(np.int64))
            continue
        pool = rng.permutation(pool)  # random tie-break
        if mode == "influence":
            s, own = np.asarray(scores(k, pool), np.float64), np.isin(pool, current[k])
            if own.any() and np.isnan(s[own]).all():  # it cannot judge: its in-neighbours first, as they are
                s = -own.astype(np.float64)
            pick = pool[np.argsort(np.nan_to_num(s, nan=0.0), kind="stable")[:keep]]
        else:
            pick = pool[:keep]
        chosen.append(np.sort(pick).astype(np.int64))
    return chosen


class Rewirer:
    """Collaborator selection during a run: decides when to rewire, builds the new W, records history.

    Args:
        config: the run config (``rewiring`` section). w0: W^0 [N, N]. ledger: the run's
        ``proximal.ProximalLedger`` (cumulative scores; None for random rewiring without proximal influence).
    """

    def __init__(self, config: Any, w0: Any, ledger: Any = None):
        self.settings = config.rewiring
        self.seed = config.seed if self.settings.seed is None else self.settings.seed
        self.w = sp.csr_array(w0)
        self.ledger = ledger
        self.history: list[dict[str, Any]] = []
        self.fallbacks: list[int] = []

    def due(self, t: int) -> bool:
        """True iff the graph is rewired before round t (t = K, 2K, …)."""
        return t > 0 and t % self.settings.every == 0

    def _score(self, k: int, pool: np.ndarray) -> np.ndarray:
        if self.ledger is None:
            return np.full(len(pool), np.nan)
        return self.ledger.cumulative(k, pool)

    def rewire(self, t: int) -> sp.csr_array:
        """Choose the in-neighbours used from round t on; return the new W (the old one if not rooted)."""
        current = in_neighbor_sets(self.w)
        rng = np.random.default_rng([self.seed, t, 7001])
        chosen = select_collaborators(self.settings.mode, current, self.settings.keep, self.settings.candidates,
                                      rng, self._score, self.settings.outlier_z)
        w = metropolis_mixing(chosen)
        if not is_rooted(w):
            self.fallbacks.append(t)
            chosen, w = current, self.w
            print(f"warning: rewiring before round {t}: the participants' choices leave no group that reaches "
                  f"everyone (not rooted), so W stays as it was until the next rewiring (manifest.json: "
                  f"rewiring_fallbacks)", file=sys.stderr)
        for k, (old, new) in enumerate(zip(current, chosen, strict=True)):
            for action, ids in (("kept", np.intersect1d(old, new)), ("added", np.setdiff1d(new, old)),
                                ("dropped", np.setdiff1d(old, new))):
                score = self._score(k, ids)
                self.history += [{"round": t, "participant": k, "neighbor": int(nb), "action": action,
                                  "cumulative_score": None if np.isnan(s) else float(s)}
                                 for nb, s in zip(ids.tolist(), score.tolist(), strict=True)]
        self.w = w
        return w


# -- the method: driver side only (it changes W between rounds; no block does anything) ----------------------


class RewiringDriver(DriverHook):
    """Collaborator selection during a run: a new W before every K-th round from the proximal ledger's
    cumulative scores (when proximal influence runs); its history is ``rewiring.parquet``."""

    name = "rewiring"

    def __init__(self, experiment: Any):
        super().__init__(experiment)
        self.rewirer = Rewirer(experiment.config, experiment.topology.mixing_matrix(0))

    def setup(self, drivers: Mapping[str, DriverHook]) -> None:
        proximal = drivers.get("proximal")
        self.rewirer.ledger = getattr(proximal, "ledger", None)
        config = self.experiment.config
        blind = [k for k, v in enumerate(self.experiment.partition.val) if not len(v)]
        if blind and self.rewirer.ledger is not None and config.proximal.zprime == "validation":
            named = ", ".join(map(str, blind[:10])) + (" …" if len(blind) > 10 else "")
            print(f"warning: {len(blind)} participant(s) ({named}) have no validation data to score their "
                  f"in-neighbours on, so they keep them at every rewiring (--proximal-zprime heldout scores every "
                  f"pair on the shared batch)", file=sys.stderr)

    def due(self, t: int) -> bool:
        return self.rewirer.due(t)

    def before_round(self, t: int) -> sp.csr_array:
        return self.rewirer.rewire(t)

    def mixing(self) -> sp.csr_array:
        return self.rewirer.w

    def finish(self) -> dict[str, Any]:
        return {"rewiring": self.rewirer.history}

    def finish_schemas(self) -> dict[str, Any]:
        return {"rewiring": REWIRING}

    def summary(self) -> dict[str, Any]:
        return {"rewiring_fallbacks": self.rewirer.fallbacks}

    def state(self) -> dict[str, np.ndarray]:
        w, h = sp.csr_array(self.rewirer.w), self.rewirer.history
        scores = [np.nan if r["cumulative_score"] is None else r["cumulative_score"] for r in h]
        return {"w.data": w.data, "w.indices": w.indices, "w.indptr": w.indptr, "w.shape": np.array(w.shape),
                "fallbacks": np.array(self.rewirer.fallbacks, np.int64),
                **{f"history.{key}": np.array([r[key] for r in h], dtype) for key, dtype in _HISTORY.items()},
                "history.cumulative_score": np.array(scores, np.float64)}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        if not arrays:
            self.rewirer.w = sp.csr_array(self.experiment.topology.mixing_matrix(0))
            self.rewirer.history, self.rewirer.fallbacks = [], []
            return
        self.rewirer.w = sp.csr_array((arrays["w.data"], arrays["w.indices"], arrays["w.indptr"]),
                                      shape=tuple(arrays["w.shape"].tolist()))
        self.rewirer.fallbacks = arrays["fallbacks"].tolist()
        columns = {key: arrays[f"history.{key}"].tolist() for key in [*_HISTORY, "cumulative_score"]}
        self.rewirer.history = [
            {key: (None if key == "cumulative_score" and np.isnan(values[i]) else values[i])
             for key, values in columns.items()} for i in range(len(columns["round"]))]


_HISTORY = {"round": np.int64, "participant": np.int64, "neighbor": np.int64, "action": np.str_}

REWIRING_METHOD = Method("rewiring", lambda config: config.rewiring.mode != "none", None, RewiringDriver)
