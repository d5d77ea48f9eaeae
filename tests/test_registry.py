"""The registries of models, losses, misbehaviour kinds and data sets: one ``Registry`` class answers for all four."""

from __future__ import annotations

import functools

import pytest

from dice_ray.core.losses import LOSSES, build_loss
from dice_ray.core.misbehavior import KINDS
from dice_ray.core.models import MODELS, build_model, register_model
from dice_ray.data import DATASETS, load_dataset
from dice_ray.errors import InputError
from dice_ray.registry import Registry, defining_module


@pytest.mark.parametrize(("call", "line"), [
    (lambda: build_model("mpl", (1, 8, 8), 10), "model 'mpl' is unknown; choose one of "),
    (lambda: build_loss("cross-entropi"), "loss 'cross-entropi' is unknown; choose one of cross-entropy, mse"),
    (lambda: load_dataset("digit"), "data set 'digit' is unknown; choose one of digits, mnist5k"),
])
def test_an_unknown_name_is_one_line_with_the_closest_known_one(call, line: str) -> None:
    with pytest.raises(InputError) as err:
        call()
    assert str(err.value).startswith(line) and "(did you mean" in str(err.value) and "\n" not in str(err.value)


def test_every_kind_knows_the_module_that_registered_a_name() -> None:
    """What a recorded run's ``imports`` are checked against: the module of a user's entry, a built-in's own."""
    register_model("test-registry-model")(functools.partial(lambda shape, classes, width: None, width=3))
    assert MODELS.module("test-registry-model") == __name__  # through the partial, to the function
    assert MODELS.module("mlp") == "dice_ray.core.models"
    assert LOSSES.module("mse") == "dice_ray.core.losses"
    assert KINDS.module("scale") == "dice_ray.core.misbehavior" and KINDS.module("none") is None
    assert DATASETS.module("digits") == "dice_ray.data.registry" and DATASETS.module("no-such") is None


def test_names_keep_the_order_of_registration_and_a_later_entry_replaces_an_earlier() -> None:
    registry: Registry[int] = Registry("thing", {"b": 1, "a": 2})
    assert registry.add("c", 3) == 3 and registry.names() == ("b", "a", "c")
    registry.add("b", 4)
    assert registry.names() == ("b", "a", "c") and registry.get("b") == 4 and "c" in registry
    assert defining_module(functools.partial(functools.partial(len))) == "builtins"
