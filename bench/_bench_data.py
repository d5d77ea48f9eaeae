"""Synthetic image-shaped data sets for the benches, registered with dice-ray's data-set registry on import.

Only a fallback: the benches use ``data.dataset: synthetic`` with ``data.synthetic_shape`` where the run config
takes that field. Where it does not, they name this module in the run config's ``imports`` (so every Ray
worker imports it too; the benches put ``bench/`` on ``PYTHONPATH`` for them) and select one of:

- ``bench-random-1x28x28``  MNIST-shaped inputs (the CNN of ``bench_peers.py`` at N where mnist5k is too small)
- ``bench-random-3x32x32``  CIFAR-shaped inputs (``bench_gpu.py``)

10 classes; inputs are N(0, 1) noise plus half a class-dependent pattern, float32; ``DICE_BENCH_SAMPLES``
(environment, default 20,000) training samples and a fifth of that (at least 500) test samples, seeded by
the run seed. Only the shapes matter to the benches: they time steps, not accuracy.
"""

from __future__ import annotations

import os

import numpy as np

try:  # the registry's public home has moved during refactors; take whichever this version has
    from dice_ray import register_dataset  # type: ignore[attr-defined]
except ImportError:
    from dice_ray.data import register_dataset

SHAPES = {"bench-random-1x28x28": (1, 28, 28), "bench-random-3x32x32": (3, 32, 32)}
CLASSES = 10


def make(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of ``shape``-d inputs, sizes from ``DICE_BENCH_SAMPLES``."""
    n_train = int(os.environ.get("DICE_BENCH_SAMPLES", "20000"))
    n_test = max(500, n_train // 5)
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLASSES, *shape), dtype=np.float32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, CLASSES, n)
        x = rng.standard_normal((n, *shape), dtype=np.float32)
        x += 0.5 * centers[y]
        return x, y.astype(np.int64)

    return (*split(n_train), *split(n_test))


for _name, _shape in SHAPES.items():
    register_dataset(_name, lambda seed, _shape=_shape: make(_shape, seed), input_shape=_shape, num_classes=CLASSES)
