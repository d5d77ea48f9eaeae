"""The data-set registry: name -> loader, the built-in sets, and ``register_dataset`` for a user's own data.

A user's data set is a factory that returns its train and test splits::

    import dice_ray

    @dice_ray.register_dataset("my-regression", input_shape=(4,), num_classes=1)
    def my_regression(seed: int):
        ...
        return x_train, y_train, x_test, y_test        # numpy arrays (or two torch Datasets)

and is selected by name (``data.dataset: my-regression``, ``--dataset my-regression``); the module defining it
is imported first through the run config's ``imports`` (also inside every Ray worker). Integer (and boolean) labels
are class labels (``num_classes`` defaults to their maximum + 1); float targets (regression, with a loss such
as ``mse``) keep their dtype, and ``num_classes`` is the model's output width (default: 1 for [n] targets,
m for [n, m]). User data is used as given: no normalization; what a run cannot read (labels outside 0..C−1,
targets that are not numbers, NaN or infinite values, ...) is refused in one ``InputError`` line.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from dice_ray.data.datasets import Dataset, load_digits, load_mnist5k, load_synthetic
from dice_ray.data.readers import load_cifar, load_mnist_like, load_tiny_imagenet
from dice_ray.errors import InputError, first_line
from dice_ray.registry import Registry, defining_module


@dataclass(frozen=True)
class DataOptions:
    """What a loader may read from the run config (``data`` section): the data folder, whether to download,
    the run seed and the synthetic generator's size."""

    data_dir: str | None = None
    download: bool = False
    seed: int = 0
    synthetic_samples: int = 10_000
    synthetic_classes: int = 10
    synthetic_shape: tuple[int, ...] = (1, 8, 8)


Loader = Callable[[DataOptions], Dataset]
_ON_DISK = ("mnist", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet")


def _on_disk(name: str) -> Loader:
    def load(options: DataOptions) -> Dataset:
        if options.data_dir is None:
            raise InputError(f"data.data_dir (--data-dir) is required for {name}")
        data_dir = os.path.abspath(os.path.expanduser(str(options.data_dir)))
        if name in ("mnist", "fashion-mnist"):
            return load_mnist_like(name, data_dir, options.download)
        if name in ("cifar10", "cifar100"):
            return load_cifar(name, data_dir, options.download)
        return load_tiny_imagenet(data_dir, options.download)

    return load


DATASETS: Registry[Loader] = Registry("data set", {
    "digits": lambda o: load_digits(),
    "mnist5k": lambda o: load_mnist5k(),
    "synthetic": lambda o: load_synthetic(o.seed, o.synthetic_samples, o.synthetic_classes,
                                          tuple(o.synthetic_shape)),
    **{name: _on_disk(name) for name in _ON_DISK},
})
BUILT_IN = DATASETS.names()


def dataset_names() -> tuple[str, ...]:
    """The registered data-set names: the built-in ones first, then the user's in registration order."""
    return DATASETS.names()


def _arrays(name: str, which: str, split: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) arrays of a torch ``Dataset`` of (input, target) pairs (its ``which`` split, of data set ``name``)."""
    items = [split[i] for i in range(len(split))]
    if not items:
        raise InputError(f"data set {name!r}: its {which} Dataset is empty")
    if any(not isinstance(item, (tuple, list)) or len(item) != 2 for item in items):
        bad = next(item for item in items if not isinstance(item, (tuple, list)) or len(item) != 2)
        raise InputError(f"data set {name!r}: a {which} Dataset's items must be (input, target) pairs, got "
                         f"{type(bad).__name__}" + (f" of {len(bad)}" if isinstance(bad, (tuple, list)) else ""))

    def array(value: Any) -> np.ndarray:
        return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)

    def stacked(values: list[np.ndarray], what: str) -> np.ndarray:
        odd = next((i for i, v in enumerate(values) if v.shape != values[0].shape), None)
        if odd is not None:
            raise InputError(f"data set {name!r}: {which} item {odd}'s {what} has shape {list(values[odd].shape)}, "
                             f"item 0's {list(values[0].shape)}; every item needs one shape")
        return np.stack(values)

    return (stacked([array(x) for x, _ in items], "input"), stacked([array(y) for _, y in items], "target"))


def _check_targets(name: str, y_train: np.ndarray, y_test: np.ndarray) -> bool:
    """Refuse targets dice-ray cannot read; return whether they are class labels (integers, or booleans)."""
    for which, y in (("training", y_train), ("test", y_test)):
        if y.dtype.kind not in "biuf":
            raise InputError(f"data set {name!r}: {which} targets of dtype {y.dtype} are not numbers; give integer "
                             "class labels or floating-point regression targets")
    classification = y_train.dtype.kind in "biu"
    if classification:
        if y_test.dtype.kind == "f" and not np.all(np.isfinite(y_test) & (y_test == np.round(y_test))):
            raise InputError(f"data set {name!r}: its training labels are integers (classes), but some test labels "
                             "are not whole numbers")
        return True
    if y_train.ndim > 2 or y_test.ndim > 2 or _width(y_train) != _width(y_test):
        raise InputError(f"data set {name!r}: regression targets of shape {list(y_train.shape[1:])} per training "
                         f"sample and {list(y_test.shape[1:])} per test sample (need [] or [m], of one width in both)")
    return False


def _width(y: np.ndarray) -> int:
    """The width of targets [n] (1) or [n, m] (m)."""
    return 1 if y.ndim == 1 else int(y.shape[1])


def _check_finite(name: str, x_train: np.ndarray, x_test: np.ndarray, y_train: np.ndarray,
                  y_test: np.ndarray) -> None:
    """Refuse inputs or targets that are NaN or infinite: every loss they reach would be."""
    for which, values in (("training inputs", x_train), ("test inputs", x_test), ("training targets", y_train),
                          ("test targets", y_test)):
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if not finite.all():
            raise InputError(f"data set {name!r}: {int((~finite).sum())} of its {which} hold NaN or infinite values "
                             f"(the first at index {int(np.argmin(finite))})")


def as_dataset(name: str, value: Any, input_shape: tuple[int, ...] | None = None,
               num_classes: int | None = None) -> Dataset:
    """Return a factory's ``value`` — a ``Dataset``, (x_train, y_train, x_test, y_test) arrays, or (train, test)
    torch Datasets — as a ``Dataset`` (float32 inputs; int64 class labels or float32 targets)."""
    if isinstance(value, Dataset):  # checked as its arrays are
        input_shape, num_classes = input_shape or value.input_shape, num_classes or value.num_classes
        value = (value.x_train, value.y_train, value.x_test, value.y_test)
    if isinstance(value, tuple) and len(value) == 2:
        (x_train, y_train), (x_test, y_test) = _arrays(name, "training", value[0]), _arrays(name, "test", value[1])
    elif isinstance(value, tuple) and len(value) == 4:
        x_train, y_train, x_test, y_test = (np.asarray(v) for v in value)
    else:
        raise InputError(f"data set {name!r}: its factory must return (x_train, y_train, x_test, y_test) arrays, "
                         f"(train, test) torch Datasets or a Dataset, got {type(value).__name__}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test) or not len(x_train) or not len(x_test):
        raise InputError(f"data set {name!r}: {len(x_train)} training inputs for {len(y_train)} targets and "
                         f"{len(x_test)} test inputs for {len(y_test)} targets (need equal, non-zero counts)")
    if x_train.ndim < 2 or x_test.ndim < 2:
        raise InputError(f"data set {name!r}: inputs of shape {list(x_train.shape)} (train) and {list(x_test.shape)} "
                         "(test); a sample needs a shape of its own, [n, features, ...] ([n, 1] for one feature)")
    for which, x in (("training", x_train), ("test", x_test)):
        if x.dtype.kind not in "biuf":
            raise InputError(f"data set {name!r}: {which} inputs of dtype {x.dtype} are not numbers")
    y_train, y_test = (np.array(y.tolist()) if y.dtype.kind == "O" else y for y in (y_train, y_test))  # numbers?
    classification = _check_targets(name, y_train, y_test)
    kind = np.int64 if classification else np.float32
    if classification and any(y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max
                              for y in (y_train, y_test)):  # int64 would wrap it to a negative label
        raise InputError(f"data set {name!r}: class labels up to {max(int(y.max()) for y in (y_train, y_test))}, "
                         "beyond int64; labels must lie in 0..num_classes - 1")
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf, refused below
        x_train, x_test = (np.ascontiguousarray(x, dtype=np.float32) for x in (x_train, x_test))
        y_train, y_test = (np.ascontiguousarray(y, dtype=kind) for y in (y_train, y_test))
    _check_finite(name, x_train, x_test, y_train, y_test)
    width = _width(y_train)
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max()) + 1) if classification else width
    elif not classification and num_classes != width:
        raise InputError(f"data set {name!r}: num_classes={num_classes} declared for regression targets of width "
                         f"{width} (a regression's num_classes is its output width)")
    shape = tuple(int(d) for d in (input_shape or x_train.shape[1:]))
    if tuple(x_train.shape[1:]) != shape or tuple(x_test.shape[1:]) != shape:
        raise InputError(f"data set {name!r}: inputs of shape {tuple(x_train.shape[1:])} (train) and "
                         f"{tuple(x_test.shape[1:])} (test), declared {shape}")
    if classification and (min(y_train.min(), y_test.min()) < 0 or max(y_train.max(), y_test.max()) >= num_classes):
        raise InputError(f"data set {name!r}: class labels must lie in 0..{num_classes - 1} (training and test "
                         f"labels lie in {min(y_train.min(), y_test.min())}..{max(y_train.max(), y_test.max())})")
    if classification and len(np.unique(y_train)) < 2:  # cross-entropy 0, accuracy 1: a result that means nothing
        raise InputError(f"data set {name!r}: every training label is {y_train[0]}; a classifier needs at least two "
                         "classes to tell apart")
    return Dataset(name, x_train, y_train, x_test, y_test, int(num_classes), shape)


def register_dataset(name: str, factory: Callable[..., Any] | None = None, *,
                     input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> Any:
    """Register ``factory`` as data set ``name``; usable as ``@register_dataset(name, ...)`` or called directly.

    ``factory(seed)`` (or ``factory()``) returns (x_train, y_train, x_test, y_test) numpy arrays, (train, test)
    torch ``Dataset``s of (input, target) pairs, or a ``Dataset``. ``input_shape`` and ``num_classes`` (for
    regression: the output width) default to what the arrays show. Returns the factory.
    """
    if name in BUILT_IN:
        raise ValueError(f"data set {name!r} is built in; choose another name")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        takes_seed = bool(inspect.signature(fn).parameters)

        def load(options: DataOptions) -> Dataset:
            try:
                value = fn(options.seed) if takes_seed else fn()
            except Exception as err:  # the user's code: one line naming it, before any work
                raise InputError(f"data set {name!r}: its factory {fn.__qualname__}() failed: "
                                 f"{first_line(err, named=True)}") from err
            return as_dataset(name, value, input_shape, num_classes)

        load.__module__ = defining_module(fn)  # where it was defined (``DATASETS.module``)
        DATASETS.add(name, load)
        return fn

    return decorator(factory) if factory is not None else decorator


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = False, seed: int = 0,
                 synthetic_samples: int = 10_000, synthetic_classes: int = 10,
                 synthetic_shape: tuple[int, ...] = (1, 8, 8)) -> Dataset:
    """Load data set ``name`` (one of ``dataset_names()``) as a channels-first ``Dataset``.

    ``seed`` only affects ``synthetic`` and user factories that take it (the other splits are fixed);
    ``data_dir`` and ``download`` only the on-disk sets. Raises ``InputError`` for an unknown name, a missing or
    corrupt data folder.
    """
    loader = DATASETS.get(name)
    options = DataOptions(data_dir, download, seed, synthetic_samples, synthetic_classes, tuple(synthetic_shape))
    return loader(options)
