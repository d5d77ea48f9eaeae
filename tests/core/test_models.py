"""The model registry: every model fits its data shapes, steps under vmap, and users can add their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import BATCHNORM_MLP
from torch import nn

import dice_ray
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


@pytest.mark.parametrize("pool", ["native", "gather"])
def test_the_cnn_pools_before_its_relu_with_the_numbers_of_relu_then_pool(tmp_path, pool: str) -> None:
    """The registered CNN pools, then applies ReLU (a quarter of the elements): whole runs, in-loop DICE-E of every
    order and DICE-GT included, equal bit for bit those of the usual conv-ReLU-maxpool order."""

    @register_model("test-cnn-relu-first")
    def relu_first(input_shape, num_classes):
        model = build_model("cnn", input_shape, num_classes)
        order = [type(layer) for layer in model]
        assert order[1:3] == [nn.MaxPool2d, nn.ReLU] and order[4:6] == [nn.MaxPool2d, nn.ReLU]
        layers = list(model)
        layers[1:3], layers[4:6] = layers[2:0:-1], layers[5:3:-1]
        return nn.Sequential(*layers)  # the same parameters, in the same order (ReLU and pooling hold none)

    runs = {}
    for name in ("cnn", "test-cnn-relu-first"):
        config = dice_ray.RunConfig(
            nodes=4, rounds=4, seed=3, model={"name": name, "pool": pool},
            data={"dataset": "digits", "heldout_size": 8}, optim={"name": "sgd", "batch_size": 4},
            influence={"enabled": True, "online": True, "hops": 2, "rounds": [1], "sources": [0],
                       "variants": "first-order,curvature,second-order"},
            output={"progress": False, "eval_every": 1, "out": str(tmp_path / name)})
        runs[name] = dice_ray.run(config, engine="local")
    pooled_first, relu_first_run = runs["cnn"], runs["test-cnn-relu-first"]
    assert isinstance(build_model("test-cnn-relu-first", (1, 8, 8), 10)[1], nn.ReLU)
    columns = ["train_loss", "val_loss", "heldout_loss", "heldout_acc", "consensus_distance"]
    columns = [c for c in columns if c in pooled_first.rounds]
    assert len(columns) >= 4 and pooled_first.rounds[columns].equals(relu_first_run.rounds[columns])
    assert len(pooled_first.influence) > 0 and pooled_first.influence.equals(relu_first_run.influence)


def test_a_model_with_batchnorm_steps_as_a_pure_function_and_dice_e_runs_through_it(tmp_path) -> None:
    """DICE-E differentiates the local step as a pure function (``Population.functional_step`` under torch.func):
    with BatchNorm it normalizes by the batch's statistics, as training does, and updates nothing (it used to update
    the layer's counter in place, which torch.func refuses: DICE-E beyond one hop stopped with an error). Offline
    and in the loop, every variant runs to finite numbers."""

    @register_model("test-mlp-batchnorm")
    def mlp_batchnorm(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 16), nn.BatchNorm1d(16), nn.Tanh(),
                             nn.Linear(16, num_classes))

    torch.manual_seed(0)
    model = build_model("test-mlp-batchnorm", (1, 8, 8), 10)
    pop = Population(model, initial_state(model, np.arange(3), 0, "independent"), OptimizerSpec("momentum", 0.1))
    x, y = torch.randn(3, 4, 1, 8, 8), torch.randint(0, 10, (3, 4))
    params, opt, buffers = pop.params.clone(), {n: v.clone() for n, v in pop.opt_state.items()}, pop.buffers.clone()
    counter = model[2].num_batches_tracked.clone()
    step = torch.func.jvp(lambda p: pop.functional_step(p, opt, x, y), (params,), (torch.ones_like(params),))
    new_params = step[0][0]
    assert torch.equal(pop.buffers, buffers) and torch.equal(model[2].num_batches_tracked, counter)
    pop.half_step(x, y)  # training's step: the same parameters, and it updates the running statistics
    torch.testing.assert_close(new_params, pop.params, rtol=1e-6, atol=1e-7)
    assert not torch.equal(pop.buffers, buffers) and model[2].track_running_stats
    for online in (False, True):
        config = dice_ray.RunConfig(
            nodes=4, rounds=4, seed=1, model={"name": "test-mlp-batchnorm"},
            data={"dataset": "digits", "heldout_size": 8}, optim={"name": "sgd", "batch_size": 4},
            influence={"enabled": True, "online": online, "hops": 2, "rounds": [1], "sources": [0],
                       "variants": "first-order,curvature,second-order,exact-readout"},
            output={"progress": False, "out": str(tmp_path / f"online-{online}")})
        estimates = dice_ray.run(config, engine="local").influence.filter(like="est_")
        assert len(estimates) > 0 and np.isfinite(estimates.to_numpy()).all()



class _SharedBatchNorm(nn.Module):
    """One BatchNorm layer called twice per forward pass, and one never called."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)
        self.norm, self.unused = nn.BatchNorm1d(16), nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.first(x.flatten(1))))
        return self.head(self.norm(torch.tanh(self.second(h))))


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize("shared", [False, True])
def test_the_pure_local_step_moves_batchnorm_statistics_from_its_one_forward_pass(shared: bool, vectorize: str) -> None:
    """``functional_state_step`` of a model with BatchNorm is training's step over the whole state (the parameters,
    and the running statistics as torch's training pass moves them: once per call of a layer, not at all for a
    layer the pass does not call) and takes the statistics from the forward pass its gradient runs: one forward pass
    per step (two before: every DICE-E step through a BatchNorm model paid a third more), in the vmapped and the
    looped form."""
    torch.manual_seed(0)
    model = _SharedBatchNorm() if shared else build_model(BATCHNORM_MLP, (1, 8, 8), 10)
    pop = Population(model, initial_state(model, np.arange(3), 0, "independent"), OptimizerSpec("momentum", 0.1),
                     vectorize=vectorize)
    x, y = torch.randn(3, 4, 1, 8, 8), torch.randint(0, 10, (3, 4))
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    state, opt = pop.state.clone(), {n: v.clone() for n, v in pop.opt_state.items()}
    stepped, _ = torch.func.jvp(lambda s: pop.functional_state_step(s, opt, x, y), (state,),
                                (torch.ones_like(state),))
    hook.remove()
    assert len(forwards) == (1 if vectorize == "vmap" else 3)  # once for all, or once per participant
    assert torch.equal(pop.state, state)  # pure: nothing written
    pop.half_step(x, y)
    width = pop.param_layout.width
    assert not torch.equal(pop.buffers, state[:, width:])
    torch.testing.assert_close(stepped[0], pop.state, rtol=1e-6, atol=1e-7)

class _SpareHead(nn.Module):
    """A model with a layer its forward pass never calls (a spare head, say): parameters no loss reads."""

    def __init__(self, inputs: int, num_classes: int) -> None:
        super().__init__()
        self.body, self.spare = nn.Linear(inputs, num_classes), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))


def test_parameters_the_forward_pass_does_not_read_stay_put_and_every_method_runs(tmp_path) -> None:
    """A parameter no forward pass reads has gradient 0, as torch.optim leaves it (training stopped with autograd's
    'appears to not have been used in the graph'); the others train, and DICE-E in every variant, proximal influence
    and the ledger run through the model."""
    torch.manual_seed(0)
    model = _SpareHead(64, 10)
    pop = Population(model, initial_state(model, np.arange(3), 0, "independent"), OptimizerSpec("adam", 0.01))
    before = {n: v.clone() for n, v in pop.param_layout.views(pop.params).items()}
    pop.half_step(torch.randn(3, 4, 1, 8, 8), torch.randint(0, 10, (3, 4)))
    after = pop.param_layout.views(pop.params)
    assert all(torch.equal(after[n], before[n]) for n in ("spare.weight", "spare.bias"))
    assert not torch.equal(after["body.weight"], before["body.weight"])

    register_model("test-spare-head")(lambda shape, classes: _SpareHead(int(np.prod(shape)), classes))
    config = dice_ray.RunConfig(
        nodes=4, rounds=4, seed=1, model={"name": "test-spare-head"}, data={"dataset": "digits", "heldout_size": 8},
        optim={"name": "adam", "lr": 0.01, "batch_size": 4}, proximal={"enabled": True},
        ledger={"enabled": True, "hops": 2},
        influence={"enabled": True, "online": True, "hops": 2, "rounds": [1], "sources": [0],
                   "variants": "first-order,curvature,second-order,exact-readout"},
        output={"progress": False, "out": str(tmp_path / "run")})
    run = dice_ray.run(config, engine="local")
    estimates = run.influence.filter(like="est_")
    assert len(estimates) > 0 and np.isfinite(estimates.to_numpy()).all()
    for table, columns in (("proximal", ["score", "update_cosine"]), ("shares", ["total", "share"])):
        values = run.table(table)[columns].to_numpy()
        assert len(values) > 0 and np.isfinite(values).all()


def test_what_dice_e_cannot_estimate_through_batchnorm_is_refused_before_the_run(tmp_path) -> None:
    """A single sample's probe (its removal moves the batch statistics every other sample's gradient reads), a
    BatchNorm without a momentum (a cumulative average: a counter per participant) and, for the influence methods,
    another layer that tracks running statistics are refused by ``prepare``."""
    from dice_ray.config import build_config
    from dice_ray.experiment import prepare

    @register_model("test-mlp-cumulative-batchnorm")
    def cumulative(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 8), nn.BatchNorm1d(8, momentum=None),
                             nn.Linear(8, num_classes))

    base = {"nodes": 4, "data": {"dataset": "digits"}, "model": {"name": BATCHNORM_MLP}}
    prepare(build_config({**base, "influence": {"enabled": True}}))  # whole minibatches: fine
    with pytest.raises(InputError, match=r"^influence.probe_samples \(--probe-samples\) 1: model "
                                         r"'test-mlp-tanh-batchnorm' normalizes by batch"):
        prepare(build_config({**base, "influence": {"enabled": True, "probe_samples": 1}}))
    with pytest.raises(InputError, match="BatchNorm layer '2' has momentum=None"):
        prepare(build_config({**base, "model": {"name": "test-mlp-cumulative-batchnorm"}}))

    @register_model("test-conv-instance-norm")
    def instance_norm(input_shape, num_classes):
        return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.InstanceNorm2d(4, track_running_stats=True),
                             nn.Flatten(), nn.LazyLinear(num_classes))

    other = {**base, "model": {"name": "test-conv-instance-norm"}}
    prepare(build_config(other))  # training alone is fine; DICE-E differentiates BatchNorm's statistics only
    with pytest.raises(InputError, match="layer '1' tracks running statistics, which DICE-E differentiates"):
        prepare(build_config({**other, "proximal": {"enabled": True}}))


def test_models_with_a_buffer_no_forward_reads_or_batchnorm_without_running_statistics(tmp_path) -> None:
    """Found by an audit: a floating-point buffer the forward pass never reads stopped every z′ gradient over the
    state (autograd's unused input); BatchNorm without running statistics stopped the first evaluation (its size
    was measured on one sample). Both run, with every DICE-E variant, in the loop and replayed alike."""

    class Scaled(nn.Module):
        def __init__(self, inputs: int, classes: int):
            super().__init__()
            self.register_buffer("input_scale", torch.ones(1))  # kept, never read
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.Tanh(), nn.BatchNorm1d(16),
                                     nn.Linear(16, classes))

        def forward(self, x):
            return self.net(x)

    register_model("test-unused-buffer")(lambda shape, classes: Scaled(int(np.prod(shape)), classes))
    register_model("test-batch-statistics-only")(lambda shape, classes: nn.Sequential(
        nn.Flatten(), nn.Linear(int(np.prod(shape)), 16), nn.BatchNorm1d(16, track_running_stats=False), nn.Tanh(),
        nn.Linear(16, classes)))
    for name in ("test-unused-buffer", "test-batch-statistics-only"):
        tables = {}
        for online in (False, True):
            config = dice_ray.RunConfig(
                nodes=4, rounds=4, seed=1, model={"name": name}, data={"dataset": "digits", "heldout_size": 8},
                optim={"name": "sgd", "batch_size": 4},
                influence={"enabled": True, "online": online, "hops": 2, "rounds": [1], "sources": [0],
                           "variants": "first-order,curvature,second-order,exact-readout"},
                output={"progress": False, "out": str(tmp_path / f"{name}-{online}")})
            tables[online] = dice_ray.run(config, engine="local").influence.filter(like="est_")
        assert len(tables[True]) and np.isfinite(tables[True].to_numpy()).all()
        np.testing.assert_allclose(tables[True].to_numpy(), tables[False].to_numpy(), rtol=1e-5, atol=1e-9)


def test_a_model_or_loss_whose_outputs_do_not_fit_is_refused_before_the_run() -> None:
    """Outputs that are not [N, classes] (one too many per sample, or one number per sample), and a loss that cannot
    read them, are one line from ``prepare``: before, the first trained silently and the second failed in the first
    step with PyTorch's traceback."""
    from dice_ray.config import build_config
    from dice_ray.experiment import prepare

    register_model("test-three-extra-outputs")(lambda shape, classes: nn.Sequential(
        nn.Flatten(), nn.Linear(int(np.prod(shape)), classes + 3)))
    register_model("test-one-output-per-sample")(lambda shape, classes: nn.Sequential(
        nn.Flatten(), nn.Linear(int(np.prod(shape)), 1), nn.Flatten(0)))

    def config(name: str) -> dice_ray.RunConfig:
        return build_config({"nodes": 4, "rounds": 2, "data": {"dataset": "digits"}, "model": {"name": name}})

    with pytest.raises(InputError, match=r"model 'test-three-extra-outputs' returns outputs of shape \[2, 13\] for 2 "
                                         r"samples of digits; a run needs \[2, 10\]"):
        prepare(config("test-three-extra-outputs"))
    with pytest.raises(InputError, match=r"returns outputs of shape \[2\] for 2 samples of digits; a run needs \[2, "
                                         r"10\]"):
        prepare(config("test-one-output-per-sample"))
    prepare(config("mlp"))  # the registered models fit
    dice_ray.register_dataset("test-one-test-sample")(lambda: (np.zeros((40, 3), np.float32), np.arange(40) % 2,
                                                               np.zeros((1, 3), np.float32), np.zeros(1, np.int64)))
    prepare(build_config({"nodes": 4, "rounds": 2, "data": {"dataset": "test-one-test-sample"}}))  # checked on 1

    @dice_ray.register_loss("test-batch-mean")
    class BatchMean(dice_ray.Loss):  # one number for the batch, not one per sample
        def per_sample(self, outputs, targets):
            return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(InputError, match=r"loss 'test-batch-mean' returns \[\] for 2 samples; per_sample must return "
                                         r"one loss per sample, \[2\]"):
        prepare(build_config({"nodes": 4, "rounds": 2, "data": {"dataset": "digits"},
                              "model": {"loss": "test-batch-mean"}}))
