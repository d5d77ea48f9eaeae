"""A window of the factual run, rounds t..t+R: what DICE-GT replays start from and DICE-E differentiates.

``Trajectory`` holds, for every participant, the local state θ^{t+s} before round t+s's local step, its
half-step θ^{t+s+½}, the optimizer state, and W^{t+s}; minibatches are recomputed from
(seed, participant, round), never stored. ``record_rounds`` trains with the same ``ParticipantBlock`` code the
engines run, so a window is exactly the run's, and keeps each round its windows need once (``Recording``: windows
that overlap share it). Tensors live on one device: the recording's; the CPU in Ray's object store, where the tasks
of a machine read one copy in place; a replay's where its window is (``Trajectory.to``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from dice_ray.core.participants import ParticipantBlock
from dice_ray.core.tensors import as_tensor

if TYPE_CHECKING:
    from dice_ray.experiment import Experiment


@dataclass
class Trajectory:
    """Rounds ``t0 .. t0 + horizon`` of a run, for all N participants (tensors on one device, ``device``).

    states[s]      [N, D]  θ^{t0+s} (parameters then buffers), s = 0..horizon
    halves[s]      [N, D]  θ^{t0+s+½}, s = 0..horizon-1
    opt_states[s]  name -> [N, D_params] (``step``: [N]) before round t0+s's local step, s = 0..horizon
    mixing[s]      W^{t0+s} (scipy CSR, N x N), s = 0..horizon-1
    """

    t0: int
    states: list[torch.Tensor]
    halves: list[torch.Tensor]
    opt_states: list[dict[str, torch.Tensor]]
    mixing: list[sp.csr_array]

    @property
    def device(self) -> torch.device:
        """The device every tensor of this window lives on."""
        return self.states[0].device

    def to(self, device: torch.device | str) -> Trajectory:
        """Return this window with every tensor on ``device`` (itself if they are there already)."""
        if self.device == torch.device(device):
            return self
        return Trajectory(self.t0, [s.to(device) for s in self.states], [h.to(device) for h in self.halves],
                          [{name: value.to(device) for name, value in opt.items()} for opt in self.opt_states],
                          self.mixing)

    @property
    def horizon(self) -> int:
        """R, the number of rounds after t0 this window covers."""
        return len(self.mixing)

    def window(self, t: int, hops: int) -> Trajectory:
        """Return the sub-window of rounds t..t+hops (no copies)."""
        a = t - self.t0
        if a < 0 or a + hops > self.horizon:
            raise ValueError(f"rounds {t}..{t + hops} are outside the recorded {self.t0}..{self.t0 + self.horizon}")
        return Trajectory(t, self.states[a: a + hops + 1], self.halves[a: a + hops],
                          self.opt_states[a: a + hops + 1], self.mixing[a: a + hops])


@dataclass
class Recording:
    """Rounds of a run, each held once (round -> tensors on one device): what the windows of its probe rounds read,
    however many windows cover a round (``window``).

    states[t], halves[t], opt_states[t], mixing[t] as in ``Trajectory``, for the rounds some window needs.
    Pickled (into Ray's object store) as numpy arrays, which every task that reads them maps in place: the tasks
    of a machine share one copy of each round (read-only: replays clone what they change)."""

    states: dict[int, torch.Tensor]
    halves: dict[int, torch.Tensor]
    opt_states: dict[int, dict[str, torch.Tensor]]
    mixing: dict[int, sp.csr_array]

    def window(self, t0: int, horizon: int) -> Trajectory:
        """Return the window t0..t0+horizon (no copies)."""
        return Trajectory(t0, [self.states[t0 + s] for s in range(horizon + 1)],
                          [self.halves[t0 + s] for s in range(horizon)],
                          [self.opt_states[t0 + s] for s in range(horizon + 1)],
                          [self.mixing[t0 + s] for s in range(horizon)])

    def __reduce__(self) -> tuple:
        def host(value: torch.Tensor) -> np.ndarray:
            return value.detach().cpu().numpy()

        opt_states = {t: {name: host(v) for name, v in opt.items()} for t, opt in self.opt_states.items()}
        return _recording_of_arrays, ({t: host(v) for t, v in self.states.items()},
                                      {t: host(v) for t, v in self.halves.items()}, opt_states, self.mixing)


def _recording_of_arrays(states: dict[int, np.ndarray], halves: dict[int, np.ndarray],
                         opt_states: dict[int, dict[str, np.ndarray]], mixing: dict[int, sp.csr_array]) -> Recording:
    """A pickled ``Recording``, its tensors on the CPU sharing the arrays' memory."""
    def tensor(a: np.ndarray) -> torch.Tensor:
        return as_tensor(a, torch.device("cpu"))

    return Recording({t: tensor(a) for t, a in states.items()}, {t: tensor(a) for t, a in halves.items()},
                     {t: {name: tensor(a) for name, a in opt.items()} for t, opt in opt_states.items()}, mixing)


def record_trajectory(experiment: Experiment, t0: int, horizon: int,
                      device: torch.device | str = "cpu") -> Trajectory:
    """Train ``experiment`` from round 0 in this process (on ``device``) and return the window t0..t0+horizon."""
    return record_rounds(experiment, [t0], horizon, device).window(t0, horizon)


def record_windows(experiment: Experiment, starts: list[int], horizon: int,
                   device: torch.device | str = "cpu") -> list[Trajectory]:
    """``record_rounds``' windows t..t+horizon for every t in ``starts`` (windows that overlap share tensors)."""
    recording = record_rounds(experiment, starts, horizon, device)
    return [recording.window(t0, horizon) for t0 in starts]


def record_rounds(experiment: Experiment, starts: list[int], horizon: int,
                  device: torch.device | str = "cpu") -> Recording:
    """Train ``experiment`` from round 0 in this process, on ``device``, and return the rounds of the windows
    t..t+horizon for every t in ``starts`` (tensors on ``device``). The rounds are the run's own (the same
    ``ParticipantBlock`` code as the engines, the same initial weights and minibatches on any device), so the windows
    match a run of the same config and seed; only rounds inside some window are kept.
    """
    block = ParticipantBlock.for_experiment(experiment, device=str(device))
    pop = block.population
    needed = {t + s for t in starts for s in range(horizon + 1)}
    recording = Recording({}, {}, {}, {})
    for t in range(max(starts) + horizon + 1):
        if t in needed:
            recording.states[t] = pop.state.clone()
            recording.opt_states[t] = {name: value.clone() for name, value in pop.opt_state.items()}
        if t == max(starts) + horizon:
            break
        block.half_step(t)
        w = experiment.topology.mixing_matrix(t)
        if t in needed:
            recording.halves[t], recording.mixing[t] = pop.state.clone(), w
        block.mix(block.mixing_rows(w), [pop.state])
    return recording


def reach(mixing: list[sp.csr_array], source: int | np.ndarray) -> list[np.ndarray]:
    """Return S_0 = {j} ⊆ S_1 ⊆ … ⊆ S_R (sorted ids): S_s holds every k with (W^{t+s'-1} ⋯ W^t)_{k j} > 0
    for some s' ≤ s — every participant whose local state the probe can have changed by round t+s. ``source`` may
    be several participants (sorted ids): then S_s is the union of theirs.

    The perturbation δ^{(s)} of concepts §4 is zero outside S_s; see ``first_reached`` for N^{(s)}(j).
    """
    sets = [np.atleast_1d(np.asarray(source))]
    current = sets[0]
    for w in mixing:
        hits = np.asarray((sp.csr_array(w[:, current]) != 0).sum(axis=1)).ravel()
        current = np.flatnonzero(hits > 0)
        sets.append(np.union1d(sets[-1], current))
    return sets


def first_reached(supports: list[np.ndarray]) -> list[np.ndarray]:
    """Return N^{(s)}(j) for s = 0..R (concepts §3): participants k ≠ j first reached at step s, i.e. in S_s
    but not in S_{s-1} (N^{(0)} is empty)."""
    seen = set(supports[0].tolist())
    out = [np.array([], np.int64)]
    for support in supports[1:]:
        new = np.array([k for k in support.tolist() if k not in seen], np.int64)
        seen.update(new.tolist())
        out.append(new)
    return out
