"""Probes (concepts §2): which (source j, round t, z) to measure, chosen from the run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
