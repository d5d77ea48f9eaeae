"""Model registry: name -> factory(input_shape, num_classes) -> ``nn.Module``.

A user adds a model with the decorator::

    from dice_ray.core.models import register_model

    @register_model("my-net")
    def my_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return ...

and selects it with ``--model my-net`` (the module defining it must be imported first, for example from
a run config's ``model.import_module``). Input shape (channels-first) and class count always come from
the data set, so one model definition serves every data set it fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dice_ray.core.convolution import use_conv_mode
from dice_ray.core.pooling import use_pool_mode
from dice_ray.registry import Registry

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Return a decorator registering ``factory(input_shape, num_classes) -> nn.Module`` as ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        return MODELS.add(name, factory)

    return decorator


def model_names() -> tuple[str, ...]:
    """Return the registered model names, sorted."""
    return tuple(sorted(MODELS.names()))


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """Return a freshly initialized model ``name`` for ``input_shape`` inputs and ``num_classes`` outputs, built with
    torch's generator seeded by ``seed`` (and the global generator left as it was).

    A participant's initial state (``population.initial_state``) redraws every module that has ``reset_parameters``
    from the run's seed; a tensor a model draws in its own ``__init__`` (a parameter of its own, a parametrization's
    originals) keeps the value drawn here, so it too is a function of the seed, the same in every process and actor
    (it was drawn from whatever state the global generator had: another value in every run). Lazy modules
    (``nn.LazyLinear``, ...) take their shapes from one pass over zeros here, before anything reads their sizes."""
    factory = MODELS.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(tuple(input_shape), int(num_classes))
        if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()
               for m in model.modules()):  # lazy modules take their shapes from one pass over zeros (eval mode)
            training = model.training
            with torch.no_grad():
                model.eval()(torch.zeros(2, *input_shape))
            model.train(training)
        return model


def use_layer_modes(model: nn.Module, conv: str, pool: str, device: torch.device | str) -> None:
    """Make ``model``'s stacked convolutions and max poolings compute as ``model.conv`` and ``model.pool`` say on
    ``device`` (another kernel or layout for the same layers: the numbers stay the same, to float32 rounding)."""
    use_conv_mode(model, conv, torch.device(device))
    use_pool_mode(model, pool, device)


class MLP(nn.Module):
    """Flatten, then Linear-activation layers, then a linear classifier (the paper's MLP: hidden 128, 64)."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, activation: str = "relu"):
        super().__init__()
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), acts[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The paper's MLP: hidden layers 128 and 64 with ReLU."""
    return MLP(math.prod(input_shape), (128, 64), num_classes, "relu")


@register_model("mlp-tanh")
def mlp_tanh(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The paper's MLP with tanh: a smooth loss surface, for exactness checks of DICE-E (concepts §4)."""
    return MLP(math.prod(input_shape), (128, 64), num_classes, "tanh")


@register_model("logreg")
def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (a single linear layer)."""
    return MLP(math.prod(input_shape), (), num_classes)


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small CNN: two 3x3 conv-maxpool-ReLU blocks (16, 32 channels), then a 64-unit hidden layer.

    Each block pools before its ReLU: the usual conv-ReLU-maxpool function, bit for bit, derivatives included (a
    window's maximum commutes with the monotone ReLU, and both send a window's gradient to its first maximum or
    nowhere), with the ReLU on a quarter of the elements.
    """
    channels, height, width = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small (e.g. 32x32) inputs: 3x3 stem without max-pooling, as usual for CIFAR."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@register_model("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-18 (11M parameters, BatchNorm buffers mixed like parameters): meant for GPUs."""
    return ResNet18(input_shape[0], num_classes)
