"""What tests in several modules share: a small recorded window and the literal replay that DICE-E's exactness checks
differentiate (concepts §4), a run config from a base with changes, and tables compared to float32 rounding.
Importable from any test (the root conftest's folder is on the path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dice_ray.config import RunConfig, build_config
from dice_ray.core.models import register_model
from dice_ray.core.population import differentiable_running_statistics
from dice_ray.experiment import prepare
from dice_ray.methods.dice.estimator import Window, state_losses
from dice_ray.methods.dice.measure import window_for
from dice_ray.methods.dice.trajectory import record_trajectory

# A tanh MLP with BatchNorm after the activation: running statistics in the state. (Before it, on the digits'
# constant pixels, the first layer's gradient is 0 up to rounding, as BatchNorm's input gradient sums to 0 over the
# batch; Adam turns that rounding into steps, so a replay in float64 leaves the float32 run there.)
BATCHNORM_MLP = "test-mlp-tanh-batchnorm"


@register_model(BATCHNORM_MLP)
def mlp_tanh_batchnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 16), nn.Tanh(), nn.BatchNorm1d(16),
                         nn.Linear(16, num_classes))


# The same with LayerNorm after the activation (no running statistics: its state is the parameters alone).
LAYERNORM_MLP = "test-mlp-tanh-layernorm"


@register_model(LAYERNORM_MLP)
def mlp_tanh_layernorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 16), nn.Tanh(), nn.LayerNorm(16),
                         nn.Linear(16, num_classes))


def make_window(topology: str = "ring", nodes: int = 6, lr: float = 0.1, optimizer: str = "sgd",
                t0: int = 2, hops: int = 3, batch: int = 8, dtype: torch.dtype = torch.float32,
                idle: list[int] = (), model: str = "mlp-tanh"):
    """A recorded window (``idle``: participants left with no data, ``data.shrink`` fraction 1)."""
    cfg = build_config({"nodes": nodes, "topology": {"name": topology},
                        "data": {"dataset": "digits", "heldout_size": 64, "shrink": {"ids": list(idle), "fraction": 1}},
                        "model": {"name": model},
                        "optim": {"name": optimizer, "lr": lr, "batch_size": batch}})
    experiment = prepare(cfg)
    window = window_for(experiment, record_trajectory(experiment, t0, hops))
    if dtype == torch.float64:  # the same window, every tensor in double precision
        traj, minibatch = window.trajectory, window.batches
        traj.states = [s.double() for s in traj.states]
        traj.halves = [s.double() for s in traj.halves]
        traj.opt_states = [{k: v.double() for k, v in o.items()} for o in traj.opt_states]
        window.model = window.model.double()
        window.heldout = (window.heldout[0].double(), window.heldout[1])
        window.batches = lambda t: (minibatch(t)[0].double(), minibatch(t)[1])
    return window, experiment


def explicit_replay(window: Window, source: int, hops: int, lag: float = 0.0):
    """The run from θ_j^{t0+½} on, as a differentiable function of j's half-step state (parameters, and BatchNorm's
    running statistics where the model has them): returns the held-out losses of every participant after each of the
    next ``hops`` rounds (plain tensors ops). Participants with no data (``window.idle``) do not step.

    ``lag`` (Adam, a whole-batch probe: 1): j's step counter runs ``lag`` behind the factual one, and ``run``'s third
    argument ε moves each later step of j by (1 + ε) times the counter's own difference at the factual state,
    O_j(θ_j, n) − O_j(θ_j, n − lag) (a constant). Then K(ε) = run(θ_j^{t0+½} + εΔ, s_j + εΔ_s, ε) is the factual run
    at ε = 0 and the counterfactual one at ε = −1: DICE-GT is K(0) − K(−1), the curvature estimate K′(0) and the
    second-order one K′(0) − ½K″(0) (concepts §4)."""
    traj = window.trajectory
    n, width = traj.states[0].shape
    idle = torch.as_tensor(np.isin(np.arange(n), window.idle))
    jumps = {}  # s -> O_j(θ_j, n) − O_j(θ_j, n − lag) at the factual state of round t0 + s (parameters, optimizer)
    for s in range(1, hops if lag else 0):
        pop = window.population(s, np.array([source]))
        factual = {k: v[[source]] for k, v in traj.opt_states[s].items()}
        behind = {**factual, "step": factual["step"] - lag}
        x, y = (v[[source]] for v in window.batches(traj.t0 + s))
        (p1, o1), (p0, o0) = (pop.functional_state_step(pop.state, o, x, y) for o in (factual, behind))
        jumps[s] = (p1 - p0).detach(), {k: (o1[k] - o0[k]).detach() for k in o1 if k != "step"}
    row = torch.as_tensor(np.arange(n) == source)[:, None]

    def run(half_source: torch.Tensor, opt_source: dict[str, torch.Tensor], eps: torch.Tensor | None = None):
        halves = traj.halves[0].clone()
        halves = torch.cat([halves[:source], half_source[None], halves[source + 1:]])
        opt = {k: torch.cat([v[:source], opt_source[k][None], v[source + 1:]]) if k in opt_source else v.clone()
               for k, v in traj.opt_states[1].items()}
        if lag:
            opt["step"] = opt["step"] - lag * row[:, 0].to(opt["step"].dtype)
        scale = 1 + (0 if eps is None else eps)
        out = []
        for s in range(1, hops + 1):
            states = torch.as_tensor(traj.mixing[s - 1].toarray(), dtype=halves.dtype) @ halves
            pop = window.population(s, np.arange(n), states=states.detach())
            window.model.eval()
            with differentiable_running_statistics(window.model):
                out.append(state_losses(pop, states, *window.heldout, shared_input=True))
            window.model.train()
            if s == hops:
                break
            x, y = window.batches(traj.t0 + s)
            params, stepped = pop.functional_state_step(states, opt, x, y)
            if lag:
                params = params + row * scale * jumps[s][0]
                stepped = {k: v + row.reshape(-1, *[1] * (v.dim() - 1)) * scale * jumps[s][1][k]
                           if k in jumps[s][1] else v for k, v in stepped.items()}
            halves = torch.where(idle[:, None], states, params)
            opt = {k: torch.where(idle.reshape(-1, *[1] * (v.dim() - 1)), opt[k], v) if k in opt else v
                   for k, v in stepped.items()}
        return tuple(out)

    return run, width


def config_from(base: dict[str, Any], out: Path, **changes: Any) -> RunConfig:
    """``base`` with ``changes`` (``section__field=value``) and the run directory ``out``, validated."""
    data = json.loads(json.dumps(base))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        data.setdefault(section, {})[field] = value
    data["output"]["out"] = str(out)
    return build_config(data)


def assert_same_tables(got: dict[str, pd.DataFrame], want: dict[str, pd.DataFrame], rel: float = 1e-6) -> None:
    """The same tables, columns and rows; float columns equal within ``rel`` of each column's largest magnitude
    (NaN where the other is NaN), the others exactly."""
    assert got.keys() == want.keys()
    for name, table in want.items():
        mine = got[name]
        assert list(mine.columns) == list(table.columns) and len(mine) == len(table), name
        for column in table.columns:
            if pd.api.types.is_float_dtype(table[column].dtype):
                a, b = mine[column].to_numpy(np.float64), table[column].to_numpy(np.float64)
                scale = max(float(np.nanmax(np.abs(b))) if np.isfinite(b).any() else 0.0, 1e-12)
                assert np.array_equal(np.isnan(a), np.isnan(b)), f"{name}.{column}"
                assert np.nanmax(np.abs(a - b), initial=0.0) <= rel * scale, f"{name}.{column}"
            else:
                pd.testing.assert_series_equal(mine[column], table[column], obj=f"{name}.{column}")
