"""Probes (concepts §2): which (source j, round t, z) to measure, chosen from the run config."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dice_ray.config import RunConfig



@dataclass(frozen=True)
class Probe:
    """One probe: participant ``source`` (j), round ``round`` (t), and z = j's whole minibatch of that round
    (``sample_index`` None) or the single sample at position ``sample_index`` of it."""

    probe_id: int
    round: int
    source: int
    sample_index: int | None = None


def probe_rounds(config: RunConfig) -> list[int]:
    """Return the sorted probe rounds: ``influence.rounds``, every k-th round, or the last ``last`` rounds
    that leave room for R hops before the run ends."""
    inf = config.influence
    latest = config.rounds - 1 - inf.hops
    if inf.rounds is not None:
        return sorted(set(inf.rounds))
    if inf.every is not None:
        return list(range(inf.every - 1, latest + 1, inf.every))
    return list(range(max(0, latest - inf.last + 1), latest + 1))


def select_probes(config: RunConfig) -> list[Probe]:
    """Return every probe of the run, ordered by (round, source, sample): for each probe round and source, the
    whole-batch probe and ``probe_samples`` single-sample probes at distinct random batch positions (seeded)."""
    inf, n = config.influence, config.nodes
    probes: list[Probe] = []
    for t in probe_rounds(config):
        if inf.sources is not None:
            sources = sorted(set(inf.sources))
        elif inf.sample_sources is not None:
            rng = np.random.default_rng([config.seed, t, 1])
            sources = sorted(rng.choice(n, min(inf.sample_sources, n), replace=False).tolist())
        else:
            sources = list(range(n))
        for j in sources:
            probes.append(Probe(len(probes), t, j))
            if inf.probe_samples:
                rng = np.random.default_rng([config.seed, t, j, 2])
                for pos in sorted(rng.choice(config.optim.batch_size, inf.probe_samples, replace=False).tolist()):
                    probes.append(Probe(len(probes), t, j, int(pos)))
    return probes


# Replays of probes x participants reached beyond which a run says what its influence measurement will cost (the
# default, the last 10 rounds x every participant, is 10 N probes, each replaying the participants it reaches in
# R hops; see docs' alignment how-to, at scale).
COSTLY_REPLAYS = 200_000
FLIGHT_WARNING_BYTES = 4 * 2**30  # in-loop DICE-E perturbations (upper bound) said past this
REACH_SAMPLE = 32  # probes whose reach is counted to estimate the mean


def mean_reach(probes: list[Probe], hops: int, mixing: Callable[[int], Any]) -> float:
    """The mean number of participants a probe reaches in ``hops`` rounds (|S_R|, ``trajectory.reach``), over up to
    REACH_SAMPLE of ``probes`` evenly spaced; ``mixing(t)``: W^t (scipy)."""
    from dice_ray.methods.dice.trajectory import reach

    picked = probes[:: max(1, len(probes) // REACH_SAMPLE)][:REACH_SAMPLE]
    mixing = functools.cache(mixing)  # each round's W^t once (a time-varying topology draws it anew per call)
    return float(np.mean([len(reach([mixing(p.round + s) for s in range(hops)], p.source)[-1]) for p in picked]))


def influence_cost(config: RunConfig, state_width: int, mixing: Callable[[int], Any]) -> str | None:
    """One warning line when the run's influence measurement is large: probes x the participants each reaches
    (``mean_reach``; ``mixing(t)``: W^t) past COSTLY_REPLAYS, or, in the loop (``influence.online``), an upper bound
    of its perturbations' memory past FLIGHT_WARNING_BYTES (every probe in flight reaching every participant: D
    floats per perturbation carried through J, with the optimizer state's part, per docs' alignment how-to); None
    otherwise."""
    inf, n = config.influence, config.nodes
    if not inf.enabled:
        return None
    probes = select_probes(config)
    rounds = sorted({p.round for p in probes})
    fewer = "fewer: --sample-sources K (random participants a round), --probe-last L, --probe-rounds or --probe-sources"
    reached = mean_reach(probes, inf.hops, mixing)
    said = (f"{len(probes):,} probes ({len(rounds)} rounds x {len(probes) // max(1, len(rounds)):,} a round), each "
            f"following {reached:,.0f} of {n:,} participants on average")
    if inf.online:
        per_round = np.bincount([p.round for p in probes], minlength=config.rounds)
        flight = max(int(per_round[max(0, u - inf.hops): u + 1].sum()) for u in range(config.rounds))
        curved = any(v != "first-order" for v in inf.variants)
        second = any(v in ("second-order", "exact-readout") for v in inf.variants)
        slots = {"sgd": 0, "momentum": 1}.get(config.optim.name, 2)
        per = (curved + second) * (1 + slots)  # first-order: a scale per row (``online.ScaledUpdate``)
        bound = flight * n * state_width * per * 4
        if bound > FLIGHT_WARNING_BYTES:
            return (f"warning: influence: {said}; in the loop up to {flight:,} probes in flight keep up to "
                    f"{bound / 2**30:,.0f} GiB of perturbations (where a probe reaches every participant); {fewer}")
    if len(probes) * reached > COSTLY_REPLAYS:
        return (f"warning: influence: {said}: long (N = 256, the paper's MLP: ~12 probes a second on 2 cores, "
                f"fewer as the reach grows); {fewer}")
    return None
