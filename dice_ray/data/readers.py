"""On-disk data sets in torchvision's layout, parsed here (numpy, PIL): MNIST, Fashion-MNIST, CIFAR-10/100,
Tiny ImageNet.

``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` are read from ``data_dir`` in torchvision's on-disk layout
(``MNIST/raw/``, ``FashionMNIST/raw/``, ``cifar-10-batches-py/``, ``cifar-100-python/``). The files are parsed
here, not through torchvision's dataset classes: those verify CIFAR files by md5, which rejects anything but the
official archives (a subset, a test fixture) with a vague "not found or corrupted". torchvision is used only to
fetch the files when ``download=True``. ``tiny-imagenet`` is the extracted ``tiny-imagenet-200/`` folder, decoded
with PIL; ``val`` is the test split. These files come from the data set's publisher (the CIFAR ones are Python
pickles, as published, read by an unpickler that builds arrays and plain containers only: a received run directory
names the data folder, and what it holds is read without running any code it names).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dice_ray.data.datasets import CHANNEL_STATS, Dataset, normalized_dataset
from dice_ray.errors import InputError, absent

_TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _missing(name: str, data_dir: str, expected: str, can_download: bool = True) -> InputError:
    what = absent(data_dir, "folder") if not os.path.isdir(data_dir) else f"does not contain {name}"
    hint = "set data.download (--download) to fetch it" if can_download else f"extract {_TINY_IMAGENET_URL} there"
    return InputError(f"data folder {data_dir} {what} (expected {expected}); {hint}")


def _corrupt(path: str, reason: str, can_download: bool = True) -> InputError:
    reason = " ".join(str(reason).split())[:200]
    hint = "delete it and set data.download (--download) to fetch it again" if can_download else "extract it again"
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
    expected = header + math.prod(dims)  # Python integers: a crafted header's product does not wrap to 0
    if len(raw) != expected:
        raise _corrupt(path, f"{len(raw)} bytes, expected {expected} for shape {tuple(dims)} (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_path(raw_dir: str, stem: str) -> str:
    plain = os.path.join(raw_dir, stem)
    return plain if os.path.isfile(plain) or not os.path.isfile(plain + ".gz") else plain + ".gz"


def load_mnist_like(name: str, data_dir: str, download: bool) -> Dataset:
    """MNIST or Fashion-MNIST (``name`` mnist, fashion-mnist) from the IDX files under ``data_dir`` (fetched there
    first if ``download``), normalized by the data set's channel statistics; x [n, 1, 28, 28] float32, y [n] int64.
    A missing or damaged file is an ``InputError`` naming it."""
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
    mean, std = CHANNEL_STATS[name]
    return normalized_dataset(
        name,
        _unit(x_tr)[:, None],
        y_tr,
        _unit(x_te)[:, None],
        y_te,
        10,
        np.array(mean),
        np.array(std),
    )


# What a CIFAR python-format batch may name: numpy's array and scalar reconstruction (old and new module paths; a
# subset written with labels as numpy integers names the scalar) and the text codec a Python 3 pickle of protocol 2
# turns bytes into (a data transform), nothing else.
_ARRAY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                  ("numpy._core.numeric", "_frombuffer"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts, strings and numbers only: any other global a file names
    (a function to call, a class to build) is refused before it is looked up, so reading a batch runs no code of the
    file's choosing. A run directory from someone else may name the data folder: its files are read this way."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a data batch has no use for")
        if name == "ndarray":
            return np.ndarray
        if name == "dtype":
            return np.dtype
        if name == "encode":
            import codecs

            return codecs.encode
        from numpy._core import multiarray, numeric

        return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}.get(name, numeric._frombuffer)


def _read_cifar_pickle(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python-format batch: returns (uint8 [n, 3, 32, 32], int64 [n])."""
    try:
        with open(path, "rb") as f:
            # The official python-format files are pickles (torchvision reads them with pickle.load); here only
            # numpy arrays and plain containers may come out of them (``_ArraysOnly``).
            entry = _ArraysOnly(f, encoding="latin1").load()
        data, labels = np.asarray(entry["data"]), np.asarray(entry[label_key])
        for what, values in (("pixels", data), ("labels", labels)):  # a cast would turn 300 into 44, 0.7 into 0
            if not values.size:
                raise ValueError(f"it holds no {what}")
            if values.dtype.kind not in "biu" or values.min() < 0 or values.max() > 255:
                raise ValueError(f"its {what} are {values.dtype} in {values.min()}..{values.max()} (CIFAR stores "
                                 "whole numbers in 0..255)")
        data, labels = data.astype(np.uint8), labels.astype(np.int64)
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
        MemoryError,  # an ndarray of the allowed kind asking for more memory than there is
    ) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise _corrupt(
            path, f"data of shape {data.shape} with {len(labels)} labels, expected [n, 3072], n labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, data_dir: str, download: bool) -> Dataset:
    """CIFAR-10 or CIFAR-100 (``name``) from the python-version batches under ``data_dir`` (fetched there first if
    ``download``; unpickled with numpy arrays and plain containers the only objects allowed, ``_ArraysOnly``),
    normalized by channel statistics; x [n, 3, 32, 32] float32, y [n] int64. A missing or damaged file is an
    ``InputError`` naming it."""
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
    mean, std = CHANNEL_STATS[name]
    return normalized_dataset(
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
                width, height = img.size  # before decoding: a crafted header may claim gigapixels
                arr = np.asarray(img.convert("RGB")) if (width, height) == (64, 64) else None
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise _corrupt(paths[i], f"{type(e).__name__}: {e}", can_download=False) from e
        if arr is None:
            raise _corrupt(paths[i], f"image is {width}x{height}, expected 64x64", can_download=False)
        out[i] = arr.transpose(2, 0, 1) * np.float32(1 / 255)

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for _ in pool.map(read, range(len(paths))):
            pass
    return out


def load_tiny_imagenet(data_dir: str, download: bool) -> Dataset:
    """Tiny ImageNet from the extracted ``tiny-imagenet-200/`` under ``data_dir`` (its validation images as the
    test split; it cannot be downloaded by dice-ray: ``download`` is refused); x [n, 3, 64, 64] float32, y [n]
    int64."""
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
    mean, std = CHANNEL_STATS["tiny-imagenet"]
    return normalized_dataset(
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
