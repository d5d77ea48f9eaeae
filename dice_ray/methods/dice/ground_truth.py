"""DICE-GT (concepts §3): the influence of a probe measured by counterfactual replay.

The counterfactual run differs from the factual one only in the probe's local step: at round t0,
participant j steps on z_j^t minus z (for the whole batch: no step, optimizer state unchanged). Rounds
t0..t0+r-1 are replayed with identical minibatches and W^t, and only for the participants the cascade
has reached (S_s of ``trajectory.reach``): everyone else is exactly factual, so their recorded half-steps
are mixed in.

    d_k^{(s)} = L(θ_k^{t0+s}; z′) − L(θ_{k∖z}^{t0+s}; z′),   d_j^{(½)} = L(θ_j^{t0+½}; z′) − L(θ_{j∖z}^{t0+½}; z′).

The replay runs on the window's device (a CUDA window: the task that replays has a GPU); only the loss terms come
back to the host, as numpy.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from dice_ray.core.tensors import csr_tensor
from dice_ray.methods.dice.estimator import Cascade, Window
from dice_ray.methods.dice.trajectory import reach


def _heldout_losses(window: Window, states: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """L(θ_k; z′) [P] float64 in eval mode for the states [P, D] of participants ``rows`` (z′_k their own validation
    split when the window has one): GT terms are differences of nearly equal losses, so evaluated in float64
    (``Window.zprime_losses``)."""
    return window.zprime_losses(rows, states).cpu().numpy()


def counterfactual_half_step(window: Window, source: int,
                             removed: np.ndarray | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (θ_{j∖z}^{t0+½} [D], j's optimizer state after that step): the whole batch removed (no step)
    when ``removed`` is None, else the step on j's minibatch without positions ``removed``. A participant with no
    data does not step: its counterfactual is the factual θ_j^{t0+½} = θ_j^{t0}."""
    traj = window.trajectory
    opt = {name: value[[source]].clone() for name, value in traj.opt_states[0].items()}
    if removed is None or source in window.idle:
        return traj.states[0][source].clone(), {name: value[0] for name, value in opt.items()}
    x, y = window.batches(traj.t0)
    keep = np.setdiff1d(np.arange(x.shape[1]), removed)
    pop = window.population(0, np.array([source]))
    with torch.no_grad():
        params, new_opt = pop.functional_step(pop.params, opt, x[[source]][:, keep], y[[source]][:, keep])
        if window.update_factors is not None:  # a misbehaving source sends θ + c(θ' − θ)
            params = pop.params + float(window.update_factors[source]) * (params - pop.params)
    state = traj.states[0][source].clone()
    state[: params.shape[1]] = params[0]
    return state, {name: value[0] for name, value in new_opt.items()}


def ground_truth_cascade(window: Window, source: int, hops: int, removed: np.ndarray | None = None,
                         counterfactual: list[torch.Tensor] | None = None) -> Cascade:
    """Return DICE-GT's cascade d_k^{(s)}, s = 1..hops, of the probe (``source``, t0, z) where z is j's whole
    minibatch (``removed`` None) or the positions ``removed`` of it. If ``counterfactual`` is a list, the
    counterfactual states θ_{k∖z}^{t0+s} [|S_s|, D] (rows: the cascade's supports[s]) are appended to it for
    s = 1..hops (diagnostics: ``bench/alignment_floor.py``).

    The counterfactual steps are IEEE float32. Where the run's own steps were not (``window.replay_factual``: a tf32
    or bf16 run; or on a GPU, whose kernels for a replay's few rows need not round as the recording's for all),
    the factual side is replayed the same way from the same recorded states — the step on j's whole
    minibatch, then the reached participants' steps — so that a term compares like with like: against the recorded
    states it would also carry each replayed step's difference between the two arithmetics."""
    traj = window.trajectory
    supports = reach(traj.mixing[:hops], source)
    half_cf, opt_cf_source = counterfactual_half_step(window, source, removed)
    cf_states = _replay(window, supports, source, half_cf, opt_cf_source, hops)
    if counterfactual is not None:
        counterfactual.extend(state.clone() for state in cf_states)
    half, factual = factual_side(window, source, supports, hops)
    # every loss of the probe's own states in one float64 pass (seven calls at 3 hops took 44 s of a 165 s replay
    # stage): the half-steps, then each hop's counterfactual states (a row's loss is the same in any pass)
    rows = [np.array([source] * 2), *(supports[s] for s in range(1, hops + 1))]
    losses = _heldout_losses(window, torch.cat([torch.stack([half, half_cf]), *cf_states]), np.concatenate(rows))
    parts = np.split(losses, np.cumsum([len(r) for r in rows])[:-1])
    values = [np.zeros(1)] + [factual[s - 1] - parts[s] for s in range(1, hops + 1)]
    return Cascade(source, float(parts[0][0] - parts[0][1]), supports, values)


def factual_side(window: Window, source: int, supports: list[np.ndarray],
                 hops: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The factual θ_j^{t0+½} [D] and the z′ losses L(θ_k^{t0+s}; z′) [|S_s|] float64 (rows: ``supports[s]``),
    s = 1..hops, that DICE-GT's terms compare with: the recorded states' (the window's, shared by the round's probes),
    or where the run stepped in another arithmetic (``window.replay_factual``) those of the replay with nothing
    removed, kept on the window for the next probe: a source's probes (its whole batch, then its single samples) are
    consecutive and share it."""
    traj = window.trajectory
    if not window.replay_factual:
        return traj.halves[0][source], [window.test_losses(s, supports[s]).cpu().numpy() for s in range(1, hops + 1)]
    if window.factual_replay is None or window.factual_replay[0] != (source, hops):
        half, opt_source = counterfactual_half_step(window, source, np.zeros(0, np.int64))
        states = _replay(window, supports, source, half, opt_source, hops)
        hopped = [supports[s] for s in range(1, hops + 1)]
        losses = _heldout_losses(window, torch.cat(states), np.concatenate(hopped))
        window.factual_replay = (source, hops), (half, np.split(losses, np.cumsum([len(r) for r in hopped])[:-1]))
    return window.factual_replay[1]


def _replay(window: Window, supports: list[np.ndarray], source: int, half: torch.Tensor,
            opt_source: dict[str, torch.Tensor], hops: int) -> list[torch.Tensor]:
    """The states [|S_s|, D] of the participants S_s (``supports``) at rounds t0+s, s = 1..hops, when j's half-step
    of round t0 is ``half`` (its optimizer state then ``opt_source``) and everything else is the recorded run but
    the local steps of the participants reached so far, which are replayed.

    Only the reached participants are computed: their gossip reads the recorded half-steps of the participants they
    listen to, with the replayed ones in place, so a hop costs O((|S_s| + their in-neighbours) · D), not O(N · D)."""
    traj = window.trajectory
    cf_rows, cf_halves = supports[0], half[None]  # participants whose half-step differs from the recorded one
    cf_opt = {name: value[None] for name, value in opt_source.items()}
    out = []
    for s in range(1, hops + 1):
        rows = supports[s]
        with torch.no_grad():
            states = gossip_rows(traj.mixing[s - 1][rows], traj.halves[s - 1], cf_rows, cf_halves)  # S_s's states
        out.append(states)
        if s == hops:
            break
        # The local step of round t0+s for S_s; everyone else's half-step is the recorded one.
        index = window.index(rows)
        opt = {name: value[index].clone() for name, value in traj.opt_states[s].items()}
        at = torch.as_tensor(np.searchsorted(rows, cf_rows), device=states.device)
        for name, value in cf_opt.items():
            opt[name][at] = value
        pop = window.population(s, rows, states=states)
        pop.load_optimizer_state(opt)
        x, y = window.batches(traj.t0 + s)
        before = pop.params.clone()
        idle = window.idle_rows(rows)  # participants with no data do not step
        pop.half_step(x[index], y[index],
                      idle=None if idle is None else torch.as_tensor(np.flatnonzero(idle), device=states.device))
        window.corrupt_updates_(rows, before, pop)
        cf_rows, cf_halves = rows, pop.state
        cf_opt = {name: value.clone() for name, value in pop.opt_state.items()}
    return out


def gossip_rows(w: sp.csr_array, recorded: torch.Tensor, rows: np.ndarray, halves: torch.Tensor) -> torch.Tensor:
    """Σ_l w_kl θ_l^{t+½} [K, D] for the K rows of ``w`` (scipy CSR, K x N): θ_l^{t+½} the ``recorded`` half-steps
    [N, D], but ``halves`` [len(rows), D] for the participants ``rows`` (sorted ids). Only the columns ``w`` reads
    are gathered, and the product is the sparse one the engines gossip with (``Population.mix_``)."""
    columns = np.unique(w.indices)  # a row of W is never empty: it sums to 1
    device = recorded.device
    sources = recorded[torch.as_tensor(columns, device=device)]
    at = np.minimum(np.searchsorted(columns, rows), len(columns) - 1)
    read = columns[at] == rows
    sources[torch.as_tensor(at[read], device=device)] = halves[torch.as_tensor(np.flatnonzero(read), device=device)]
    local = sp.csr_array((w.data, np.searchsorted(columns, w.indices), w.indptr), shape=(w.shape[0], len(columns)))
    return torch.sparse.mm(csr_tensor(local, device, recorded.dtype), sources)
