"""What a researcher registers — a data set, a loss, a model — is either run as PyTorch would run it or refused in one
line before any work (``data.registry.as_dataset``, ``experiment.check_model``, ``check_outputs``, ``check_loss``).
Each case here once ran to a wrong number, or stopped mid-run with a traceback."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dice_ray
from dice_ray.config import build_config
from dice_ray.core.losses import register_loss
from dice_ray.core.models import register_model
from dice_ray.core.population import OptimizerSpec, Population, initial_state
from dice_ray.data import Dataset, load_dataset
from dice_ray.errors import InputError
from dice_ray.experiment import prepare


def _features(n: int = 240, d: int = 6) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    return x, (np.abs(x[:, 0] * 3).astype(np.int64) % 3)


def _split(x: np.ndarray, y: np.ndarray, test_y: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    return x[:200], y[:200], x[200:], y[200:] if test_y is None else test_y


def _with_nan(where: str) -> tuple[np.ndarray, ...]:
    x, y = _features()
    x = x.copy()
    x[200 + 6 if where == "test" else 3, 2] = np.nan if where == "test" else np.inf
    return _split(x, y)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _torch_sets(kind: str) -> tuple:
    x, y = _features(40)
    if kind == "dicts":
        items = [{"x": torch.from_numpy(x[i]), "y": int(y[i])} for i in range(40)]
    elif kind == "ragged":
        items = [(torch.from_numpy(x[i][:4] if i == 3 else x[i]), int(y[i])) for i in range(40)]
    else:
        items = [(torch.from_numpy(x[i]), int(y[i])) for i in range(40)]
    return _Pairs(items[:30]), _Pairs([] if kind == "empty" else items[30:])


REFUSED_DATA = {
    "string labels": (lambda: _split(_features()[0], np.array(["cat", "dog", "emu"])[_features()[1]]),
                      r"training targets of dtype <U3 are not numbers"),
    # cross-entropy ignores label -100: the held-out loss was the mean over the other samples, 8x too small
    "an ignored test label": (lambda: _split(*_features(), np.where(np.arange(40) % 8, -100, 1)),
                              r"class labels must lie in 0\.\.2 \(training and test labels lie in -100\.\.2\)"),
    "a fractional test label": (lambda: _split(*_features(), np.full(40, 1.6)),
                                r"its training labels are integers \(classes\), but some test labels are not whole"),
    "NaN in a test input": (lambda: _with_nan("test"), r"1 of its test inputs hold NaN or infinite values \(the "
                                                        r"first at index 6\)"),
    "inf in a training input": (lambda: _with_nan("train"), r"1 of its training inputs hold NaN or infinite"),
    "NaN in a regression target": (lambda: _split(_features()[0], np.where(np.arange(240) == 5, np.nan,
                                                                           1.0).astype(np.float32)),
                                   r"1 of its training targets hold NaN"),
    "flat inputs": (lambda: _split(_features()[0][:, 0].copy(), _features()[1]),
                    r"inputs of shape \[200\] \(train\) and \[40\] \(test\); a sample needs a shape of its own, "
                    r"\[n, features, \.\.\.\] \(\[n, 1\] for one feature\)"),
    "regression targets of two widths": (lambda: _split(_features()[0], np.ones((240, 3), np.float32),
                                                        np.ones(40, np.float32)),
                                         r"regression targets of shape \[3\] per training sample and \[\] per test"),
    "dict items": (lambda: _torch_sets("dicts"), r"a training Dataset's items must be \(input, target\) pairs, got "
                                                 "dict"),
    "an empty test Dataset": (lambda: _torch_sets("empty"), r"its test Dataset is empty"),
    # from an audit: each ran, or failed mid-run after the run directory was written
    "one class": (lambda: _split(_features()[0], np.zeros(240, np.int64)),
                  r"every training label is 0; a classifier needs at least two classes"),  # accuracy 1.000
    "a Dataset with a label past its classes": (lambda: Dataset("x", *_split(*_features(), np.full(40, 7)), 3, (6,)),
                                                r"class labels must lie in 0\.\.2"),  # an IndexError in round 0
    "a Dataset with NaN": (lambda: Dataset("x", *_with_nan("train"), 3, (6,)), r"1 of its training inputs hold NaN"),
    "items of two shapes": (lambda: _torch_sets("ragged"), r"training item 3's input has shape \[4\], item 0's "
                                                           r"\[6\]; every item needs one shape"),
    "a uint64 label past int64": (lambda: _split(_features()[0], np.where(np.arange(240) == 3, 2**64 - 1,
                                                                           _features()[1]).astype(np.uint64)),
                                  r"class labels up to 18446744073709551615, beyond int64"),  # it read -1
    "a factory that fails": (lambda: open("/nonexistent/my.csv"),
                             r"its factory <lambda>\(\) failed: FileNotFoundError: \[Errno 2\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_DATA))
def test_data_a_run_cannot_read_is_refused_in_one_line_before_any_work(case: str, tmp_path: Path) -> None:
    factory, message = REFUSED_DATA[case]
    name = f"test-refused-{case.replace(' ', '-')}"
    dice_ray.register_dataset(name, factory)
    with pytest.raises(InputError, match=rf"^data set '{name}': {message}"):
        dice_ray.run(dice_ray.RunConfig(nodes=4, data={"dataset": name}, output={"out": str(tmp_path / "run")}),
                     engine="local")
    assert not (tmp_path / "run").exists()


def test_a_stray_huge_label_is_refused_by_the_models_size_before_it_is_built(tmp_path: Path) -> None:
    """A label of 10^9 (an id column) makes C = 10^9 + 1 classes: building the model asked for 256 GB (a traceback,
    or the OOM killer). Its size is counted on PyTorch's meta device first."""
    x, y = _features()
    y = y.copy()
    y[0] = 10**9
    dice_ray.register_dataset("test-huge-label", lambda: _split(x, y))
    with pytest.raises(InputError, match=r"the 4 participants' stacked states \(65,000,00\d,\d+ numbers each"):
        dice_ray.run(dice_ray.RunConfig(nodes=4, data={"dataset": "test-huge-label"},
                                        output={"out": str(tmp_path / "run")}), engine="local")
    assert not (tmp_path / "run").exists()


def test_boolean_labels_are_classes_and_a_regressions_declared_width_is_its_targets() -> None:
    x, y = _features()
    dice_ray.register_dataset("test-boolean-labels", lambda: _split(x, y == 1))
    data = load_dataset("test-boolean-labels")
    assert data.y_train.dtype == np.int64 and data.num_classes == 2 and set(np.unique(data.y_train)) == {0, 1}
    dice_ray.register_dataset("test-declared-width", lambda: _split(x, np.ones((240, 3), np.float32)), num_classes=1)
    with pytest.raises(InputError, match=r"num_classes=1 declared for regression targets of width 3"):
        load_dataset("test-declared-width")
    grads = [(torch.from_numpy(x[i]).requires_grad_(), int(y[i])) for i in range(40)]  # tensors autograd tracks
    dice_ray.register_dataset("test-tracked-items", lambda: (_Pairs(grads[:30]), _Pairs(grads[30:])))
    np.testing.assert_array_equal(load_dataset("test-tracked-items").x_train, x[:30])


def _config(dataset: str, **sections) -> dice_ray.RunConfig:
    return build_config({"nodes": 4, "data": {"dataset": dataset, "heldout_size": 8}, **sections})


@register_loss("test-outside-torch")
class _OutsideTorch(dice_ray.Loss):
    def per_sample(self, outputs, targets):
        return torch.from_numpy((outputs.detach().numpy() ** 2).mean(axis=1))


@register_loss("test-float32-weights")
class _Float32Weights(dice_ray.Loss):
    def per_sample(self, outputs, targets):
        return F.cross_entropy(outputs, targets, weight=torch.linspace(0.5, 1.5, outputs.shape[1]), reduction="none")


@register_loss("test-huber")
class _Huber(dice_ray.Loss):
    def per_sample(self, outputs, targets):
        return F.huber_loss(outputs, F.one_hot(targets, outputs.shape[1]).to(outputs.dtype), reduction="none").mean(1)


def test_losses_a_runs_methods_cannot_compute_with_are_refused_before_any_work() -> None:
    """Integer targets with mse (read as classes: every output was fitted to the one target), float targets with
    cross-entropy, a loss with no gradient (stopped at the first step), one that fails in float64 (stopped after
    training, at DICE-GT) and one forward mode cannot differentiate (stopped at DICE-E) — the last two only where a
    method needs it."""
    x, y = _features()
    dice_ray.register_dataset("test-counts", lambda: _split(x, y))
    dice_ray.register_dataset("test-float-labels", lambda: _split(x, y.astype(np.float32)))
    with pytest.raises(InputError, match=r"targets of width 1 for outputs of width 3 \(its targets are integers, "
                                         r"which dice-ray reads as class labels"):
        prepare(_config("test-counts", model={"name": "mlp", "loss": "mse"}))
    with pytest.raises(InputError, match=r"^loss 'cross-entropy' cannot read .* \(its targets are floating-point, "
                                         r"which dice-ray reads as regression targets"):
        prepare(_config("test-float-labels"))
    with pytest.raises(InputError, match=r"^loss 'test-outside-torch' has no gradient in the model's outputs"):
        prepare(_config("digits", model={"loss": "test-outside-torch"}))
    prepare(_config("digits", model={"loss": "test-float32-weights"}, ledger={"enabled": True},
                    proximal={"enabled": True}))
    with pytest.raises(InputError, match=r"^loss 'test-float32-weights' fails on float64 outputs"):
        prepare(_config("digits", model={"loss": "test-float32-weights"},
                        proximal={"enabled": True, "readout": "exact"}))
    with pytest.raises(InputError, match=r"^loss 'test-float32-weights' fails on float64 outputs, in which DICE-GT"):
        prepare(_config("digits", model={"loss": "test-float32-weights"}, influence={"enabled": True}))
    prepare(_config("digits", model={"loss": "test-huber"}, influence={"enabled": True, "variants": "first-order"}))
    with pytest.raises(InputError, match=r"^loss 'test-huber': forward mode cannot differentiate it, which DICE-E's "
                                         r"curvature variant needs"):
        prepare(_config("digits", model={"loss": "test-huber"}, influence={"enabled": True}))
    with pytest.raises(InputError, match=r"second-order and exact-readout variants need"):
        prepare(_config("digits", model={"loss": "test-huber"},
                        ledger={"enabled": True, "variants": "first-order,exact-readout"}))


class _Noisy(nn.Module):
    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        return self.body(h + 0.1 * torch.randn_like(h) if self.training else h)


class _Writes(nn.Module):
    """A forward pass that writes a buffer of its own: an integer call counter, or a float running mean."""

    def __init__(self, inputs: int, classes: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.body = nn.Linear(inputs, classes)
        self.register_buffer("seen", torch.zeros((), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.add_(1 if not self.seen.is_floating_point() else x.mean().detach())
        return self.body(x.flatten(1))


class _Tuple(nn.Module):
    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor):
        return self.body(x.flatten(1)), x


REFUSED_MODELS = {
    "dropout": (lambda n, c: nn.Sequential(nn.Flatten(), nn.Linear(n, 16), nn.Dropout(0.5), nn.Linear(16, c)), {},
                r"layer '2' is dropout, random in every training step"),
    "noise": (lambda n, c: _Noisy(n, c), {}, r"its training forward pass is random"),
    "an integer buffer it writes": (lambda n, c: _Writes(n, c, torch.int64), {},
                                    r"its forward pass writes buffer 'seen', which is not a floating-point tensor"),
    "a float buffer it writes, with DICE": (lambda n, c: _Writes(n, c, torch.float32), {"influence": {"enabled": True}},
                                            r"its forward pass writes buffer 'seen' \(not BatchNorm's running "
                                            r"statistics\), and DICE"),
    "a float64 parameter": (lambda n, c: nn.Sequential(nn.Flatten(), nn.Linear(n, c).double()), {},
                            r"parameter '1.weight' is torch.float64, and participants' states are stacked in float32"),
    "tuple outputs": (lambda n, c: _Tuple(n, c), {}, r"returns a tuple, not a tensor"),
    "spectral norm": (lambda n, c: nn.Sequential(nn.Flatten(),
                                                 nn.utils.parametrizations.spectral_norm(nn.Linear(n, c))), {},
                      r"cannot take the local step with participants stacked \(vectorized by vmap\): Batching rule "
                      r"not implemented"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_MODELS))
def test_models_whose_step_is_no_function_of_the_state_are_refused_before_any_work(case: str) -> None:
    """Dropout stopped the first vmapped step (and made looped runs irreproducible); an integer buffer the forward pass
    writes was shared by all participants and lost by checkpoints; a float one stopped DICE mid-run; a float64
    parameter promoted the whole state and stopped at gossip; spectral norm, which vmap cannot batch, stopped the first
    round (``check_step`` takes one local step of two participants first)."""
    factory, sections, message = REFUSED_MODELS[case]
    name = f"test-model-{case.replace(' ', '-')}"
    register_model(name)(lambda shape, classes: factory(int(np.prod(shape)), classes))
    with pytest.raises(InputError, match=rf"^model '{name}': {message}|^model '{name}' {message}"):
        prepare(_config("digits", model={"name": name}, **sections))


class _Silent(nn.Module):
    """A model whose forward pass raises an error without a message (``raise ValueError``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError


def test_an_error_without_a_message_is_named_by_its_type_in_the_one_line() -> None:
    """The one-line errors quote the first line of the error they catch; an empty message was an IndexError traceback
    (``str(err).splitlines()[0]``)."""
    register_model("test-model-silent")(lambda shape, classes: _Silent())
    with pytest.raises(InputError, match=r"^model 'test-model-silent' does not fit digits inputs of shape .*: "
                                         r"ValueError$"):
        prepare(_config("digits", model={"name": "test-model-silent"}))


def test_a_float_buffer_the_forward_pass_writes_trains_without_dice() -> None:
    register_model("test-model-float-buffer")(lambda shape, classes: _Writes(int(np.prod(shape)), classes,
                                                                             torch.float32))
    prepare(_config("digits", model={"name": "test-model-float-buffer"}, proximal={"enabled": True}))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_frozen_parameters_are_constants_of_the_step_as_torch_optim_keeps_them(optimizer: str, tmp_path: Path) -> None:
    """A layer with ``requires_grad`` False (fixed random features) is not stepped — with weight decay, momentum or
    Adam — as torch.optim does not step it (it was trained: 28% off after 3 steps); the trained layers equal
    torch.optim's bit for bit; every method runs through it, and with SGD and momentum the exact readout agrees with
    DICE-GT (to 1e-3: it expands the later hops' steps to second order, Adam at this rate is not near)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    model[1].requires_grad_(False)
    start = initial_state(model, np.arange(2), 0, "independent")
    pop = Population(model, start.clone(), OptimizerSpec(optimizer, 0.05, weight_decay=0.01))
    assert pop.param_layout.names == ["3.weight", "3.bias"] and pop.buffer_layout.names == ["1.weight", "1.bias"]
    batches = [(torch.randn(2, 4, 1, 8, 8), torch.randint(0, 10, (2, 4))) for _ in range(3)]
    for x, y in batches:
        pop.half_step(x, y)
    width = pop.param_layout.width
    for k in range(2):
        reference = copy.deepcopy(model)
        first = {**pop.param_layout.views(start[k, :width]), **pop.buffer_layout.views(start[k, width:])}
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.copy_(first[name])
        trained = [p for p in reference.parameters() if p.requires_grad]
        step = (torch.optim.Adam(trained, lr=0.05, weight_decay=0.01) if optimizer == "adam" else
                torch.optim.SGD(trained, lr=0.05, momentum=0.9 if optimizer == "momentum" else 0, weight_decay=0.01))
        for x, y in batches:
            step.zero_grad()
            F.cross_entropy(reference(x[k]), y[k]).backward()
            step.step()
        got = {**pop.param_layout.views(pop.params[k]), **pop.buffer_layout.views(pop.buffers[k])}
        for name, p in reference.named_parameters():
            assert torch.equal(got[name], p), name
    register_model("test-frozen-features")(lambda shape, classes: copy.deepcopy(model))
    run = dice_ray.run(build_config({
        "nodes": 4, "rounds": 4, "seed": 1, "model": {"name": "test-frozen-features"},
        "data": {"dataset": "digits", "heldout_size": 8}, "optim": {"name": optimizer, "lr": 0.05, "batch_size": 4},
        "influence": {"enabled": True, "hops": 2, "rounds": [1], "sources": [0],
                      "variants": "first-order,curvature,second-order,exact-readout"},
        "proximal": {"enabled": True}, "ledger": {"enabled": True, "hops": 2},
        "output": {"progress": False, "out": str(tmp_path / "run")}}), engine="local")
    dice = run.influence
    assert len(dice) > 0 and np.isfinite(dice.filter(like="est_").to_numpy()).all()
    if optimizer != "adam":
        np.testing.assert_allclose(dice["est_exact_readout"], dice["gt"], rtol=1e-3)


def test_label_flip_is_refused_on_regression_targets() -> None:
    dice_ray.register_dataset("test-flip-regression", lambda: _split(_features()[0], np.ones(240, np.float32)))
    with pytest.raises(InputError, match=r"^misbehavior label-flip turns class labels y into C-1-y, and "
                                         r"test-flip-regression has regression targets"):
        prepare(_config("test-flip-regression", model={"name": "mlp", "loss": "mse"},
                        misbehavior={"kind": "label-flip", "count": 1}))


class _CallsBatchNormByHand(nn.Module):
    """Moves a BatchNorm layer's running statistics through ``F.batch_norm`` without calling the layer."""

    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.body, self.norm, self.head = nn.Linear(inputs, 16), nn.BatchNorm1d(16), nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.batch_norm(self.body(x.flatten(1)), self.norm.running_mean, self.norm.running_var, self.norm.weight,
                         self.norm.bias, self.training)
        return self.head(torch.tanh(h))


class _Constants(nn.Module):
    """A float16 buffer and a NaN-holding one, never written; a float32 scale the forward pass reads."""

    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(inputs, classes)
        self.register_buffer("halved", torch.ones(3, dtype=torch.float16))
        self.register_buffer("missing", torch.full((2,), float("nan")))
        self.register_buffer("scale", torch.full((inputs,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1) * self.scale)


def test_the_model_checks_follow_what_the_methods_do_with_the_step() -> None:
    """A float buffer the forward pass writes trains, and runs with the ledger's first order, but not with a ledger
    variant that differentiates the step (it stopped mid-run); BatchNorm moved without calling the layer is refused
    where DICE-E moves the statistics by the layer's calls (it read 0 where training moved 0.1); a float16 buffer and
    a NaN buffer that nothing writes are accepted."""
    register_model("test-model-writes-float")(lambda shape, classes: _Writes(int(np.prod(shape)), classes,
                                                                             torch.float32))
    prepare(_config("digits", model={"name": "test-model-writes-float"}, ledger={"enabled": True}))
    with pytest.raises(InputError, match=r"writes buffer 'seen' \(not BatchNorm's running statistics\), and DICE-E"):
        prepare(_config("digits", model={"name": "test-model-writes-float"},
                        ledger={"enabled": True, "variants": "first-order,curvature"}))
    register_model("test-model-batchnorm-by-hand")(lambda shape, classes: _CallsBatchNormByHand(int(np.prod(shape)),
                                                                                                 classes))
    prepare(_config("digits", model={"name": "test-model-batchnorm-by-hand"}))
    with pytest.raises(InputError, match=r"moves BatchNorm layer 'norm''s running statistics without calling"):
        prepare(_config("digits", model={"name": "test-model-batchnorm-by-hand"}, influence={"enabled": True}))
    register_model("test-model-constants")(lambda shape, classes: _Constants(int(np.prod(shape)), classes))
    prepare(_config("digits", model={"name": "test-model-constants"}, influence={"enabled": True}))


@pytest.mark.parametrize("norm", [False, True])
def test_the_pure_step_is_a_function_of_the_whole_state_with_or_without_batchnorm(norm: bool) -> None:
    """Along a constant's direction (a buffer the forward pass reads) the pure local step's derivative is the finite
    difference of the step, with and without BatchNorm (the step without BatchNorm read the constants elsewhere and
    had derivative 0 there)."""
    torch.manual_seed(0)
    model = _Constants(64, 10).double()
    del model.halved, model.missing
    if norm:
        model = nn.Sequential(model, nn.BatchNorm1d(10)).double()
    pop = Population(model, initial_state(model, np.arange(3), 0, "independent").double(),
                     OptimizerSpec("momentum", 0.1))
    x, y = torch.randn(3, 4, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (3, 4))
    opt = {n: v.double() for n, v in pop.opt_state.items()}
    tangent = torch.zeros_like(pop.state)
    column = pop.param_layout.width + pop.buffer_layout.offsets[pop.buffer_layout.names.index(
        "0.scale" if norm else "scale")]
    tangent[:, column] = 1.0
    _, derivative = torch.func.jvp(lambda s: pop.functional_state_step(s, opt, x, y)[0], (pop.state,),
                                   (tangent,))
    h = 1e-6
    ahead, behind = (pop.functional_state_step(pop.state + sign * h * tangent, opt, x, y)[0] for sign in (1, -1))
    width = pop.param_layout.width
    assert derivative[:, :width].abs().max() > 1e-3
    torch.testing.assert_close(derivative, (ahead - behind) / (2 * h), rtol=1e-6, atol=1e-8)


def test_the_data_checks_read_what_runs_read() -> None:
    """Regression targets [n, 1] beside [n] are one width; numbers in object arrays are numbers; a float64 input beyond
    float32's range is refused as the infinity it would become."""
    x, y = _features()
    dice_ray.register_dataset("test-widths", lambda: _split(x, np.ones((240, 1), np.float32), np.ones(40, np.float32)))
    assert load_dataset("test-widths").num_classes == 1
    dice_ray.register_dataset("test-object-labels", lambda: _split(x, np.array(list(y), dtype=object)))
    assert load_dataset("test-object-labels").y_train.dtype == np.int64
    wide = x.astype(np.float64)
    wide[210, 0] = 1e39
    dice_ray.register_dataset("test-beyond-float32", lambda: _split(wide, y))
    with pytest.raises(InputError, match=r"1 of its test inputs hold NaN or infinite values \(the first at index 10\)"):
        load_dataset("test-beyond-float32")


def test_a_resume_finds_the_state_layout_it_was_written_with(tmp_path: Path) -> None:
    """A run records the order of its model's tensors in a state row; a run of a model with frozen parameters written
    before they became constants of the step (no record: every parameter trained) is not resumed with columns read
    in another order, nor one whose record differs."""
    import json

    register_model("test-frozen-resume")(lambda shape, classes: _frozen_head(int(np.prod(shape)), classes))
    out = tmp_path / "run"
    config = build_config({"nodes": 4, "rounds": 4, "model": {"name": "test-frozen-resume"},
                           "data": {"dataset": "digits", "heldout_size": 8},
                           "output": {"progress": False, "out": str(out), "checkpoint_every": 2}})
    dice_ray.run(config, engine="local")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["state_layout"] == {"trained": ["3.weight", "3.bias"], "frozen": ["1.weight", "1.bias"],
                                                 "buffers": []}
    def stopped(layout: dict | None) -> None:  # the run as if stopped after its last checkpoint
        (out / "rounds.parquet").unlink(missing_ok=True)
        if layout is None:
            manifest["model"].pop("state_layout")
        else:
            manifest["model"]["state_layout"] = layout
        (out / "manifest.json").write_text(json.dumps({**manifest, "status": "interrupted"}))

    stopped(manifest["model"]["state_layout"])
    dice_ray.resume(out, engine="local")
    for recorded in (None, {"trained": ["1.weight", "1.bias", "3.weight", "3.bias"], "frozen": [], "buffers": []}):
        stopped(recorded)
        with pytest.raises(InputError, match=r"holds participants' states laid out as .* \(written by another "
                                             r"dice-ray\)"):
            dice_ray.resume(out, engine="local")


def _frozen_head(inputs: int, classes: int) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.Tanh(), nn.Linear(16, classes))
    model[1].requires_grad_(False)
    return model


class _OwnDraws(nn.Module):
    """Draws tensors in its own ``__init__``: a parameter of its own, and weight norm's parametrization originals,
    which no ``reset_parameters`` redraws."""

    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__()
        self.body = nn.utils.parametrizations.weight_norm(nn.Linear(inputs, classes))
        self.temperature = nn.Parameter(torch.rand(classes) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1)) * self.temperature


def test_what_a_model_draws_in_its_own_init_is_a_function_of_the_seed(tmp_path: Path) -> None:
    """The same config and seed give the same numbers for a model that draws tensors in ``__init__`` (they came from
    whatever state torch's global generator was in: every run, and every actor, started elsewhere)."""
    import pandas as pd

    register_model("test-own-draws")(lambda shape, classes: _OwnDraws(int(np.prod(shape)), classes))
    tables = []
    for stray in (1, 2):
        torch.manual_seed(stray)  # the global generator in another state before each run
        config = build_config({"nodes": 4, "rounds": 2, "model": {"name": "test-own-draws"},
                               "data": {"dataset": "digits", "heldout_size": 8},
                               "output": {"progress": False, "out": str(tmp_path / f"run{stray}")}})
        tables.append(dice_ray.run(config, engine="local").rounds)
    pd.testing.assert_frame_equal(tables[0], tables[1])


def test_lazy_modules_take_their_shapes_before_the_run(tmp_path: Path) -> None:
    """A model of lazy modules trains and runs DICE (it stopped at the first state drawn: 'Can't access the shape of an
    uninitialized parameter')."""
    register_model("test-lazy")(lambda shape, classes: nn.Sequential(nn.Flatten(), nn.LazyLinear(16), nn.Tanh(),
                                                                     nn.LazyLinear(classes)))
    run = dice_ray.run(build_config({"nodes": 4, "rounds": 2, "model": {"name": "test-lazy"},
                                     "data": {"dataset": "digits", "heldout_size": 8},
                                     "influence": {"enabled": True, "hops": 1, "rounds": [0]},
                                     "output": {"progress": False, "out": str(tmp_path / "run")}}), engine="local")
    assert np.isfinite(run.rounds["train_loss"]).all() and np.isfinite(run.influence["est_curvature"]).all()


def _weight_norm_mlp(norm) -> Callable:
    return lambda shape, classes: nn.Sequential(nn.Flatten(), norm(nn.Linear(int(np.prod(shape)), 16)), nn.Tanh(),
                                                nn.Linear(16, classes))


def test_the_old_weight_norm_runs_dice_as_its_parametrization_does(tmp_path: Path) -> None:
    """The deprecated ``torch.nn.utils.weight_norm`` keeps its weight as a computed tensor, which ``copy.deepcopy``
    refuses: DICE's float64 model copy stopped after training with PyTorch's RuntimeError. Its tables now equal those of
    the parametrization form (the same function, the same initial draws)."""
    import warnings

    tables = {}
    for form, norm in (("old", nn.utils.weight_norm), ("new", nn.utils.parametrizations.weight_norm)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the old form
            register_model(f"test-weight-norm-{form}")(_weight_norm_mlp(norm))
            tables[form] = dice_ray.run(build_config({
                "nodes": 4, "rounds": 3, "model": {"name": f"test-weight-norm-{form}"},
                "data": {"dataset": "digits", "heldout_size": 8},
                "influence": {"enabled": True, "hops": 2, "rounds": [0], "variants": ["first-order"]},
                "output": {"progress": False, "out": str(tmp_path / form)}}), engine="local").influence
    assert np.isfinite(tables["old"]["est_first_order"]).all() and (tables["old"]["gt"] != 0).any()
    np.testing.assert_allclose(tables["old"]["gt"], tables["new"]["gt"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(tables["old"]["est_first_order"], tables["new"]["est_first_order"], rtol=1e-6,
                               atol=1e-9)


@pytest.mark.parametrize("variants", [["curvature"], ["second-order"]])
def test_a_model_forward_mode_cannot_differentiate_is_refused_where_dice_e_needs_it(variants: list[str]) -> None:
    """The old weight norm has no forward-mode rule: curvature and second-order DICE-E stopped after training."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        register_model("test-weight-norm-old")(_weight_norm_mlp(nn.utils.weight_norm))
        with pytest.raises(InputError, match="forward mode cannot differentiate its local step"):
            prepare(_config("digits", model={"name": "test-weight-norm-old"},
                            influence={"enabled": True, "variants": variants}))
        prepare(_config("digits", model={"name": "test-weight-norm-old"},
                        influence={"enabled": True, "variants": ["first-order"]}))


def test_a_model_is_copied_and_redrawn_after_vmapped_steps() -> None:
    """After a vmapped step the old weight norm's computed weight is a tensor without storage: redrawing the initial
    state (a block's restart with no checkpoint) stopped with an internal assert, and a float64 copy could not be
    made. Both work, and give what they give before any step."""
    import warnings

    from dice_ray.core.population import copy_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = _weight_norm_mlp(nn.utils.weight_norm)((3,), 2)
    before = initial_state(model, np.arange(2), 0)
    pop = Population(model, before.clone(), OptimizerSpec(), vectorize="vmap")
    pop.half_step(torch.randn(2, 4, 3), torch.tensor([[0, 1, 0, 1]] * 2))
    torch.testing.assert_close(initial_state(model, np.arange(2), 0), before, rtol=0, atol=0)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert copy_model(model).double()(x).dtype == torch.float64
