"""DICE-E's derivatives of a participant do not depend on how many participants share its vmapped pass.

A pass of 1-2 participants takes other kernels than larger passes (on 3-channel convolutions: float32 rounding), and
DICE-E differentiates row sets whose size depends on how actors split the participants and on which probes reach
whom. So such sets compute padded with copies of their last row, as a local step's passes do: the forward-mode
derivative of the local step (the Jacobian J), and the z′ Hessian forms uᵀH′v, equal the same rows' in a block of 6,
bit for bit. (The forms sharing one primal pass over tangents on a shared z′ still depend on the block's size, at
float32 rounding: see ``shared_primal_hessian_forms``.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import jvp

from dice_ray.core.models import build_model
from dice_ray.core.population import OptimizerSpec, Population, initial_state
from dice_ray.methods.dice.estimator import shared_primal_hessian_forms, zprime_hessian_forms

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.func.jvp's note on torch.jit.script

ROWS = (slice(0, 1), slice(1, 3), slice(3, 6))  # blocks of 1, 2 and 3 rows, against the block of all 6


@pytest.fixture(scope="module")
def case() -> dict:
    net = build_model("cnn", (3, 12, 12), 4)
    gen = torch.Generator().manual_seed(0)
    state = initial_state(net, np.arange(6), 0, "independent")
    width = Population(net, state.clone(), OptimizerSpec()).params.shape[1]
    return {"net": net, "state": state, "x": torch.randn(6, 8, 3, 12, 12, generator=gen),
            "y": torch.randint(0, 4, (6, 8), generator=gen), "xs": torch.randn(10, 3, 12, 12, generator=gen),
            "ys": torch.randint(0, 4, (10,), generator=gen), "u": torch.randn(6, width, generator=gen),
            "v": torch.randn(6, width, generator=gen), "t": torch.randn(6, 2, width, generator=gen)}


def population(case: dict, rows: slice = slice(None), spec: OptimizerSpec | None = None) -> Population:
    return Population(case["net"], case["state"][rows].clone(), spec or OptimizerSpec())


def test_the_local_steps_jacobian_of_one_or_two_rows_is_theirs_in_a_larger_block(case: dict) -> None:
    spec = OptimizerSpec("momentum", lr=0.05)

    def jacobian_times_u(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        pop = population(case, rows, spec)
        opt = {name: value.clone() for name, value in pop.opt_state.items()}
        zeros = {name: torch.zeros_like(value) for name, value in opt.items()}
        new, (d_params, d_opt) = jvp(lambda p, o: pop.functional_step(p, o, case["x"][rows], case["y"][rows]),
                                     (pop.params, opt), (case["u"][rows], zeros))
        assert new[0].shape == pop.params.shape and d_opt["momentum_buffer"].shape == pop.params.shape
        return new[0], d_params

    whole = jacobian_times_u(slice(0, 6))
    for rows in ROWS:
        assert all(torch.equal(a, b[rows]) for a, b in zip(jacobian_times_u(rows), whole, strict=True))


def test_hessian_forms_of_one_or_two_rows_are_theirs_in_a_larger_block(case: dict) -> None:
    def forms(rows: slice) -> list[torch.Tensor]:
        pop, u, v = population(case, rows), case["u"][rows], case["v"][rows]
        return [zprime_hessian_forms(pop, u, v, case["x"][rows], case["y"][rows]),
                zprime_hessian_forms(pop, u, v, case["xs"], case["ys"], shared_input=True),
                shared_primal_hessian_forms(pop, case["t"][rows], case["x"][rows], case["y"][rows])]

    whole = forms(slice(0, 6))
    assert all(f.shape[0] == 6 for f in whole)
    for rows in ROWS:
        assert all(torch.equal(a, b[rows]) for a, b in zip(forms(rows), whole, strict=True))
