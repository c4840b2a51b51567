"""The dataset readers against tiny files written here in each real on-disk format."""

from __future__ import annotations

import gzip
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mu_runner.data.formats import (
    load_cifar,
    load_digits,
    load_imagefolder,
    load_mnist,
    make_synthetic,
)
from mu_runner.errors import DatasetError

# --------------------------------------------------------------------------- writers


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    """Write an IDX file of unsigned bytes: big-endian magic, big-endian dims, then the data."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    payload = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)
    return path


def write_mnist(
    root: Path, folder: str = "MNIST", gz: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """Four IDX files in torchvision's layout with 6 train and 4 test images of 5x4 pixels."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        write_idx(root / folder / "raw" / name, arr, gz=gz)
    return arrays


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f)


def cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar10(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Five train batches of 2 images and a test batch of 3, with the real key names."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    train_imgs, train_lbls = [], []
    for i in range(1, 6):
        imgs, lbls = cifar_images(rng, 2), [int(v) for v in rng.integers(0, 10, 2)]
        write_pickle(
            folder / f"data_batch_{i}",
            {
                b"batch_label": b"x",
                b"labels": lbls,
                b"data": imgs.reshape(2, 3072),
                b"filenames": [b"a", b"b"],
            },
        )
        train_imgs.append(imgs)
        train_lbls += lbls
    test_imgs, test_lbls = cifar_images(rng, 3), [0, 9, 4]
    write_pickle(folder / "test_batch", {b"labels": test_lbls, b"data": test_imgs.reshape(3, 3072)})
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    write_pickle(
        folder / "batches.meta",
        {b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072},
    )
    return np.concatenate(train_imgs), train_lbls, test_imgs, test_lbls


# --------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist(tmp_path, gz=gz)
    src = load_mnist(tmp_path)
    assert src.train.images.dtype == torch.uint8 and src.train.labels.dtype == torch.int64
    assert src.train.images.shape == (6, 1, 5, 4) and src.test.images.shape == (4, 1, 5, 4)
    assert np.array_equal(src.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(src.train.labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(src.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(src.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert src.classes == [str(i) for i in range(10)] and src.shape == (1, 5, 4)


def test_fashion_mnist_layout_and_class_names(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path, folder="FashionMNIST", gz=True, seed=3)
    src = load_mnist(tmp_path, variant="fashion_mnist")
    assert np.array_equal(src.test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert (
        src.classes[0] == "T-shirt/top"
        and src.classes[9] == "Ankle boot"
        and len(src.classes) == 10
    )
    with pytest.raises(DatasetError, match="data=mnist: expected MNIST IDX files"):
        load_mnist(tmp_path, variant="mnist")  # only FashionMNIST/ was written


def test_mnist_missing_directory(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as err:
        load_mnist(root)
    msg = str(err.value)
    assert str(root / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert "data.download" in msg and "\n" not in msg


def test_mnist_truncated_idx(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DatasetError) as err:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(err.value) and "corrupt" in str(err.value)


def test_mnist_bad_magic(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    # A labels file carrying the images magic number (2051 instead of 2049).
    write_idx(
        tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), magic=2051
    )
    with pytest.raises(DatasetError) as err:
        load_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(err.value) and "corrupt" in str(err.value)


def test_mnist_truncated_gzip(tmp_path: Path) -> None:
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DatasetError) as err:
        load_mnist(tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(err.value) and "corrupt" in str(err.value)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DatasetError) as err:
        load_mnist(tmp_path)
    assert "train-labels-idx1-ubyte" in str(err.value) and "corrupt" in str(err.value)


def test_mnist_short_header(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:9])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.*corrupt"):
        load_mnist(tmp_path)


def fake_torchvision(monkeypatch: pytest.MonkeyPatch, **classes: object) -> list[tuple]:
    """Stand-in torchvision.datasets (the real import costs seconds and downloads need internet)."""
    calls: list[tuple] = []
    datasets = types.ModuleType("torchvision.datasets")
    for name, action in classes.items():

        def dataset(root, train, download, _name=name, _action=action):
            calls.append((_name, root, train, download))
            _action(Path(root))

        setattr(datasets, name, dataset)
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


def test_download_calls_torchvision_then_parses(tmp_path: Path, monkeypatch) -> None:
    calls = fake_torchvision(
        monkeypatch,
        FashionMNIST=lambda root: write_mnist(root, folder="FashionMNIST"),
        CIFAR10=write_cifar10,
    )
    assert len(load_mnist(tmp_path, variant="fashion_mnist", download=True).train) == 6
    assert len(load_cifar(tmp_path, num_classes=10, download=True).test) == 3
    assert calls == [
        ("FashionMNIST", str(tmp_path), True, True),
        ("CIFAR10", str(tmp_path), True, True),
    ]


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch) -> None:
    def offline(root: Path) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried 2 mirrors.")

    fake_torchvision(monkeypatch, MNIST=offline)
    with pytest.raises(DatasetError, match="download failed") as err:
        load_mnist(tmp_path, download=True)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_round_trip(tmp_path: Path) -> None:
    train_imgs, train_lbls, test_imgs, test_lbls = write_cifar10(tmp_path)
    src = load_cifar(tmp_path, num_classes=10)
    assert src.train.images.shape == (10, 3, 32, 32) and src.test.images.shape == (3, 3, 32, 32)
    assert np.array_equal(src.train.images.numpy(), train_imgs)  # batches 1..5 in order
    assert src.train.labels.tolist() == train_lbls and src.test.labels.tolist() == test_lbls
    assert np.array_equal(src.test.images.numpy(), test_imgs)
    assert src.classes[0] == "airplane" and src.classes[9] == "truck"
    assert src.train.labels.dtype == torch.int64


def test_cifar_row_is_channel_major(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    # Replace test_batch with one hand-made row: R plane, G plane, B plane, each 32x32 row-major.
    row = np.zeros(3072, np.uint8)
    row[0 * 1024 + 0 * 32 + 1] = 11  # R, y=0, x=1
    row[1 * 1024 + 5 * 32 + 7] = 22  # G, y=5, x=7
    row[2 * 1024 + 31 * 32 + 30] = 33  # B, y=31, x=30
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "test_batch", {b"labels": [3], b"data": row[None]})
    img = load_cifar(tmp_path).test.images[0]
    assert img[0, 0, 1] == 11 and img[1, 5, 7] == 22 and img[2, 31, 30] == 33
    assert int(img.sum()) == 11 + 22 + 33


def test_cifar100_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    train, test = cifar_images(rng, 4), cifar_images(rng, 2)
    write_pickle(
        folder / "train",
        {
            b"data": train.reshape(4, 3072),
            b"fine_labels": [0, 99, 50, 7],
            b"coarse_labels": [0, 1, 2, 3],
        },
    )
    write_pickle(
        folder / "test",
        {b"data": test.reshape(2, 3072), b"fine_labels": [42, 1], b"coarse_labels": [5, 6]},
    )
    write_pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [b"x"] * 20,
        },
    )
    src = load_cifar(tmp_path, num_classes=100)
    assert np.array_equal(src.train.images.numpy(), train) and np.array_equal(
        src.test.images.numpy(), test
    )
    assert src.train.labels.tolist() == [0, 99, 50, 7] and src.test.labels.tolist() == [42, 1]
    assert src.num_classes == 100 and src.classes[99] == "c99"


def test_cifar_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_cifar(tmp_path / "x")
    msg = str(err.value)
    assert str(tmp_path / "x" / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "data.download" in msg and "data=cifar10" in msg
    with pytest.raises(DatasetError, match="cifar-100-python"):
        load_cifar(tmp_path / "x", num_classes=100)


def test_cifar_garbage_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError) as err:
        load_cifar(tmp_path)
    assert "data_batch_3" in str(err.value) and "corrupt" in str(err.value)


def test_cifar_missing_key_and_bad_shape(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8)})  # no b"labels"
    with pytest.raises(DatasetError, match=r"data_batch_2.*corrupt"):
        load_cifar(tmp_path)
    write_pickle(
        folder / "data_batch_2", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}
    )
    with pytest.raises(DatasetError, match=r"data_batch_2.*corrupt"):
        load_cifar(tmp_path)
    write_pickle(folder / "data_batch_2", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DatasetError, match=r"data_batch_2.*corrupt"):
        load_cifar(tmp_path)


# --------------------------------------------------------------------------- image folders

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 100, 50), (7, 7, 7)]


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_flat_folder(root: Path) -> dict[str, int]:
    """Classes with 3, 2 and 5 solid-colour images of assorted sizes; the colour is the class."""
    counts = {"alice": 3, "bob": 2, "carol": 5}
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            ext = [".png", ".PNG", ".bmp"][i % 3]
            write_png(root / name / f"img{i}{ext}", COLOURS[c], (5 + 3 * i, 9 + i))
    (root / "alice" / "notes.txt").write_text("not an image, ignored by extension")
    return counts


def test_imagefolder_flat_split(tmp_path: Path) -> None:
    counts = write_flat_folder(tmp_path)
    src = load_imagefolder(tmp_path, image_size=6, channels=3, test_fraction=0.2, seed=0)
    assert src.classes == ["alice", "bob", "carol"]
    assert src.train.images.shape[1:] == (3, 6, 6) and src.train.images.dtype == torch.uint8
    assert len(src.train) + len(src.test) == sum(counts.values())
    for c, n in enumerate(counts.values()):
        n_train, n_test = int((src.train.labels == c).sum()), int((src.test.labels == c).sum())
        assert n_train >= 1 and n_test >= 1 and n_train + n_test == n
    # Solid colours survive the bilinear resize exactly, so every pixel tells its class.
    for split in (src.train, src.test):
        for img, label in zip(split.images, split.labels, strict=False):
            expected = torch.tensor(COLOURS[int(label)], dtype=torch.uint8)[:, None, None]
            assert torch.equal(img, expected.expand(3, 6, 6))
    again = load_imagefolder(tmp_path, image_size=6, test_fraction=0.2, seed=0)
    assert torch.equal(again.test.images, src.test.images) and torch.equal(
        again.test.labels, src.test.labels
    )


def test_imagefolder_grey(tmp_path: Path) -> None:
    write_flat_folder(tmp_path)
    src = load_imagefolder(tmp_path, image_size=4, channels=1)
    assert src.train.images.shape[1:] == (1, 4, 4)
    grey = Image.new("RGB", (1, 1), COLOURS[2]).convert("L").getpixel((0, 0))
    carol = src.train.images[src.train.labels == 2]
    assert bool((carol == grey).all())


def test_imagefolder_train_test_layout(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "x" / "a.png", COLOURS[0], (4, 4))
    write_png(tmp_path / "train" / "y" / "a.jpeg", COLOURS[1], (8, 3))
    write_png(tmp_path / "train" / "y" / "b.png", COLOURS[1], (4, 4))
    write_png(tmp_path / "test" / "y" / "c.png", COLOURS[3], (2, 2))
    src = load_imagefolder(tmp_path, image_size=3)
    assert src.classes == ["x", "y"]
    assert src.train.labels.tolist() == [0, 1, 1] and src.test.labels.tolist() == [1]
    assert torch.equal(src.test.images[0, :, 0, 0], torch.tensor(COLOURS[3], dtype=torch.uint8))
    write_png(tmp_path / "test" / "z" / "d.png", COLOURS[0], (2, 2))
    with pytest.raises(DatasetError, match="'z'"):
        load_imagefolder(tmp_path)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as err:
        load_imagefolder(tmp_path / "faces")
    assert str(tmp_path / "faces") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_imagefolder(tmp_path / "empty")
    write_flat_folder(tmp_path / "ds")
    (tmp_path / "ds" / "dave").mkdir()
    (tmp_path / "ds" / "dave" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="holds no images") as err:
        load_imagefolder(tmp_path / "ds")
    assert str(tmp_path / "ds" / "dave") in str(err.value)


def test_imagefolder_unreadable_image(tmp_path: Path) -> None:
    write_flat_folder(tmp_path)
    bad = tmp_path / "bob" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DatasetError) as err:
        load_imagefolder(tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- digits and synthetic


def test_digits_split() -> None:
    src = load_digits()
    assert len(src.train) + len(src.test) == 1797 and src.classes == [str(i) for i in range(10)]
    assert src.shape == (1, 8, 8) and src.train.images.dtype == torch.uint8
    assert int(src.train.images.max()) == 255 and src.train.labels.dtype == torch.int64
    for c in range(10):
        n_test, n_train = int((src.test.labels == c).sum()), int((src.train.labels == c).sum())
        assert abs(n_test / (n_test + n_train) - 0.2) < 0.01
    again = load_digits()
    assert torch.equal(again.test.images, src.test.images) and torch.equal(
        again.train.labels, src.train.labels
    )


def test_synthetic_shapes_and_determinism() -> None:
    a = make_synthetic(num_classes=4, channels=3, image_size=12, n_train=40, n_test=20, seed=5)
    assert a.train.images.shape == (40, 3, 12, 12) and a.test.images.shape == (20, 3, 12, 12)
    assert a.train.images.dtype == torch.uint8 and a.train.labels.dtype == torch.int64
    assert a.classes == ["0", "1", "2", "3"] and sorted(set(a.train.labels.tolist())) == [
        0,
        1,
        2,
        3,
    ]
    b = make_synthetic(num_classes=4, channels=3, image_size=12, n_train=40, n_test=20, seed=5)
    c = make_synthetic(num_classes=4, channels=3, image_size=12, n_train=40, n_test=20, seed=6)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    odd = make_synthetic(num_classes=2, channels=1, image_size=3, n_train=5, n_test=1)
    assert odd.shape == (1, 3, 3) and len(odd.test) == 1


def test_synthetic_is_learnable() -> None:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    src = make_synthetic(num_classes=10, channels=1, image_size=8, seed=0)
    x_train = src.train.images.flatten(1).numpy() / 255.0
    x_test = src.test.images.flatten(1).numpy() / 255.0
    # One BLAS thread: torch's spinning OpenMP workers can make a multi-threaded fit 50x slower.
    with threadpool_limits(1):
        clf = LogisticRegression(max_iter=1000).fit(x_train, src.train.labels.numpy())
    assert clf.score(x_test, src.test.labels.numpy()) > 0.8
