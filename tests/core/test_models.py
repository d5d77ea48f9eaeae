"""The model registry: every model fits its data shapes, steps under vmap, and users can add their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dice_ray.core.models import build_model, model_names, register_model
from dice_ray.core.population import OptimizerSpec, Population, initial_state
from dice_ray.errors import InputError

SHAPES = {"mlp": (1, 8, 8), "mlp-tanh": (1, 28, 28), "logreg": (3, 32, 32), "cnn": (1, 28, 28),
          "resnet18": (3, 32, 32)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_model_maps_its_input_shape_to_class_logits(name: str) -> None:
    model = build_model(name, SHAPES[name], 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *SHAPES[name]))
    assert out.shape == (2, 7)


def test_resnet18_steps_as_a_population_and_updates_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10)
    pop = Population(model, initial_state(model, np.arange(2), 0, "independent"), OptimizerSpec("sgd", 0.01))
    assert pop.buffer_layout.width > 0  # running means and variances live in the state, and are mixed
    before = pop.state.clone()
    loss = pop.half_step(torch.randn(2, 4, 3, 32, 32), torch.randint(0, 10, (2, 4)))
    assert torch.isfinite(loss).all()
    assert not torch.equal(pop.buffers, before[:, pop.param_layout.width:])
    assert not torch.equal(pop.params, before[:, : pop.param_layout.width])


def test_users_register_their_own_model() -> None:
    @register_model("test-linear")
    def linear(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

    assert "test-linear" in model_names()
    assert build_model("test-linear", (1, 4, 4), 3)(torch.randn(5, 1, 4, 4)).shape == (5, 3)
    with pytest.raises(InputError, match="model 'nope' is unknown"):
        build_model("nope", (1, 4, 4), 3)
