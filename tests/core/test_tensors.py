"""What a block publishes for a device transport is a copy of its tensors, whatever structure a hook returns."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch

from dice_ray.core.tensors import tensor_copies


@dataclass
class Message:
    gradient: Any
    cascades: Any = None


class Pair(NamedTuple):
    rows: np.ndarray
    arrays: dict


def test_tensor_copies_copy_every_tensor_at_any_depth_and_share_the_rest() -> None:
    state = torch.arange(12.0).reshape(4, 3).requires_grad_()
    live = state * 2  # attached to a graph
    view = state.detach()[1:3]  # a view of a larger tensor: only its own elements are copied
    rows = np.array([1, 2])
    message = Message(live, {7: Pair(rows, {"delta": view, "opt": [view, None]})})
    copied = tensor_copies(message)
    assert isinstance(copied, Message) and isinstance(copied.cascades[7], Pair)
    tensors = [copied.gradient, copied.cascades[7].arrays["delta"], copied.cascades[7].arrays["opt"][0]]
    for got, want in zip(tensors, [live, view, view], strict=True):
        assert torch.equal(got, want.detach()) and not got.requires_grad
        assert got.untyped_storage().data_ptr() != want.untyped_storage().data_ptr()
    assert tensors[1].untyped_storage().nbytes() == view.numel() * 4
    assert copied.cascades[7].rows is rows and copied.cascades[7].arrays["opt"][1] is None
    with torch.no_grad():
        state.zero_()  # the block steps on: the copies keep what was published
    assert tensors[1].tolist() == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]


def test_tensor_copies_onto_one_device() -> None:
    message = {"a": torch.ones(2, dtype=torch.float64), "b": (torch.zeros(3), np.zeros(1))}
    copied = tensor_copies(message, torch.device("meta"))  # a device other than the tensors' own
    assert copied["a"].device.type == copied["b"][0].device.type == "meta"
    assert copied["a"].dtype == torch.float64 and copied["b"][1] is message["b"][1]


@dataclass(frozen=True)
class Frozen:
    a: Any
    b: Any = field(init=False, default=None)


def test_tensor_copies_reach_plain_objects_sets_mapping_subclasses_and_fields_set_after_init() -> None:
    live = torch.ones(3)
    frozen = Frozen(live)
    object.__setattr__(frozen, "b", live)  # a field outside __init__, set afterwards
    counts = defaultdict(list, {1: [live]})
    message = [SimpleNamespace(x=live, rows=np.arange(2)), {live + 1}, counts, frozen]
    space, in_set, mapping, copied = tensor_copies(message)
    found = [space.x, next(iter(in_set)), mapping[1][0], copied.a, copied.b]
    assert all(isinstance(t, torch.Tensor) for t in found)
    assert not any(t.untyped_storage().data_ptr() == live.untyped_storage().data_ptr() for t in found)
    assert isinstance(mapping, defaultdict) and mapping.default_factory is list and mapping[2] == []
    assert space.rows is message[0].rows and isinstance(copied, Frozen)
