"""Readers for the on-disk dataset formats, plus the two sources that need no files.

Every reader returns a `Source` of uint8 N x C x H x W images and int64 labels held in memory.
The files are parsed here rather than through torchvision's dataset classes so that a missing
or damaged file becomes a one-line `DatasetError` naming that file and saying how to fix it;
torchvision is imported (lazily) only to download.
"""

from __future__ import annotations

import codecs
import gzip
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mu_runner.data.sources import ImageSet, Source
from mu_runner.errors import ConfigError, DatasetError

_DOWNLOAD_HINT = "set data.download=true on a machine with internet"
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
_FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# --------------------------------------------------------------------------- shared helpers


def _image_set(images: np.ndarray, labels: np.ndarray) -> ImageSet:
    """Wrap numpy arrays as an ImageSet.

    np.require copies only when needed: torch warns on (and must not write into) the read-only
    buffers np.frombuffer returns, while large writable arrays (CIFAR) are shared, not doubled.
    """
    return ImageSet(
        images=torch.from_numpy(np.require(images, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])),
        labels=torch.from_numpy(np.require(labels, np.int64, ["C_CONTIGUOUS", "WRITEABLE"])),
    )


def _corrupt(path: Path, why: str) -> DatasetError:
    """The error for a file that exists but cannot be what it claims to be."""
    return DatasetError(
        f"{path}: {why}; the file looks corrupted or truncated, delete and re-download it"
    )


def _require_files(paths: Sequence[Path], data: str, what: str, root: Path, archive: str) -> None:
    """Fail on the first missing file, saying where it was expected and how to obtain it."""
    for path in paths:
        if not path.is_file():
            raise DatasetError(
                f"data={data}: expected {what} at {path} (not found); {_DOWNLOAD_HINT}, "
                f"or put {archive} under data_dir={root}"
            )


def _download(data: str, fetch: Callable[[], object]) -> None:
    """Run a torchvision download, turning network/extraction failures into one-line errors."""
    try:
        fetch()
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(
            f"data={data}: download failed ({msg}); check internet access or copy the files by hand"
        ) from exc


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Out-of-range labels would crash far from here (in the loss), so catch them at load."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt(path, f"labels outside 0..{num_classes - 1}")


def _split_indices(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified seeded split: each class is permuted on its own so every class keeps its share.

    A class with >= 2 samples always keeps at least one in train and one in test; a class with a
    single sample goes to train. Indices come back sorted so the original order is preserved.
    """
    gen = torch.Generator().manual_seed(seed)  # own generator: independent of any global/run seed
    train, test = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
        n_test = min(max(round(len(idx) * test_fraction), 1), len(idx) - 1) if len(idx) >= 2 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --------------------------------------------------------------------------- digits


def load_digits() -> Source:
    """scikit-learn's bundled 8x8 digits (1797 images), 1 channel, fixed 80/20 stratified split.

    The split uses seed 0 regardless of the run seed, so every run sees the same test set.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    # Pixel values are 0..16; rescale to the full uint8 range like every other source.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = _split_indices(labels, 0.2, seed=0)
    return Source(
        train=_image_set(images[train_idx], labels[train_idx]),
        test=_image_set(images[test_idx], labels[test_idx]),
        classes=[str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------- MNIST (IDX)

# IDX magic numbers: 0x08 = unsigned byte data, low byte = number of dimensions.
_IDX_IMAGES = 2051  # 0x0803: N x H x W
_IDX_LABELS = 2049  # 0x0801: N


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (raw or gzip) of unsigned bytes, checking magic number and length."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise _corrupt(path, f"cannot be read ({type(exc).__name__})") from exc
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise _corrupt(path, f"bad IDX magic number {found} (expected {magic})")
    ndim = magic & 0xFF  # the low byte of the magic number is the number of dimensions
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"IDX header cut short ({len(raw)} bytes)")
    dims = [int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")]  # big-endian sizes
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise _corrupt(path, f"IDX file is {len(raw)} bytes, its header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(raw_dir: Path, name: str) -> Path:
    """Prefer the extracted file (what torchvision leaves) and fall back to the .gz archive."""
    plain = raw_dir / name
    gz = raw_dir / f"{name}.gz"
    return gz if not plain.is_file() and gz.is_file() else plain


def _read_idx_split(raw_dir: Path, prefix: str) -> ImageSet:
    """Read one images/labels pair of IDX files and check that they describe the same samples."""
    img_path = _idx_path(raw_dir, f"{prefix}-images-idx3-ubyte")
    lbl_path = _idx_path(raw_dir, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, _IDX_IMAGES)
    labels = _read_idx(lbl_path, _IDX_LABELS)
    if len(images) != len(labels):
        raise _corrupt(
            lbl_path, f"{len(labels)} labels but {img_path.name} holds {len(images)} images"
        )
    _check_labels(lbl_path, labels, 10)
    return _image_set(images[:, None, :, :], labels)


def load_mnist(root: str | Path, variant: str = "mnist", download: bool = False) -> Source:
    """MNIST or Fashion-MNIST IDX files in torchvision's layout.

    Files live in root/MNIST/raw/ or root/FashionMNIST/raw/, each extracted or still .gz.
    """
    folders = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
    if variant not in folders:
        raise ConfigError(f"data.variant={variant!r}: must be one of {sorted(folders)}")
    root = Path(root).expanduser()
    if download:
        import torchvision.datasets as tvd

        cls = tvd.MNIST if variant == "mnist" else tvd.FashionMNIST
        # train=True is enough: torchvision fetches all four files whenever any is missing.
        _download(variant, lambda: cls(str(root), train=True, download=True))
    raw_dir = root / folders[variant] / "raw"
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    _require_files(
        [_idx_path(raw_dir, n) for n in names],
        variant,
        f"{folders[variant]} IDX files",
        root,
        f"the four IDX files (raw or .gz) in {folders[variant]}/raw/",
    )
    classes = [str(i) for i in range(10)] if variant == "mnist" else list(_FASHION_CLASSES)
    return Source(
        train=_read_idx_split(raw_dir, "train"),
        test=_read_idx_split(raw_dir, "t10k"),
        classes=classes,
    )


# --------------------------------------------------------------------------- CIFAR (pickles)


@dataclass(frozen=True)
class _CifarLayout:
    """Where one CIFAR variant keeps its batches and which pickle keys it uses."""

    data: str  # the data= name users write
    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes
    archive: str
    tv_class: str  # torchvision.datasets class used for download


_CIFAR = {
    10: _CifarLayout(
        data="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        archive="cifar-10-python.tar.gz",
        tv_class="CIFAR10",
    ),
    100: _CifarLayout(
        data="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key=b"fine_labels",  # the 100 fine classes; coarse_labels (20 superclasses) unused
        names_key=b"fine_label_names",
        archive="cifar-100-python.tar.gz",
        tv_class="CIFAR100",
    ),
}


# What genuine CIFAR batches (and numpy arrays pickled with protocols 2 to 5) reference: the
# array and dtype reconstructors, and `_codecs.encode` (protocol 2 stores bytes through it). A
# pickle naming anything else is not a CIFAR batch; unpickling it could run arbitrary code.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_core("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


def _numpy_core(module: str, name: str):
    """numpy's array reconstructors: in numpy._core since numpy 2, numpy.core before."""
    import importlib

    try:
        return getattr(importlib.import_module(f"numpy._core.{module}"), name)
    except ImportError:  # numpy < 2
        return getattr(importlib.import_module(f"numpy.core.{module}"), name)


class _RefusedGlobal(Exception):
    """A pickle names a global that no CIFAR batch holds."""


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what genuine CIFAR files hold: dicts, lists, bytes, str, numbers, numpy arrays."""

    def find_class(self, module: str, name: str):
        make = _CIFAR_GLOBALS.get((module, name))
        if make is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return make()


def _read_pickle(path: Path, keys: Sequence[bytes], trust_files: bool = False) -> dict:
    """Unpickle one CIFAR file and check that it holds the expected keys.

    A restricted unpickler refuses any global a CIFAR batch does not hold (a crafted file cannot
    run code); `trust_files=True` (data.trust_files) uses plain pickle, as torchvision does.
    """
    try:
        with path.open("rb") as f:
            if trust_files:
                obj = pickle.load(f, encoding="bytes")
            else:
                obj = _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DatasetError(f"{path}: refuses to unpickle {exc}: not a CIFAR batch "
                           "(set data.trust_files=true only for files you trust)") from None
    except Exception as exc:  # unpickling damaged bytes can raise almost anything
        raise _corrupt(path, f"cannot be unpickled ({type(exc).__name__})") from exc
    missing = [k.decode() for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise _corrupt(path, f"missing key(s) {missing}")
    return obj


def _read_cifar_batch(
    path: Path, label_key: bytes, num_classes: int, trust_files: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One batch: rows of 3072 bytes (R plane, then G, then B, each 32x32 row-major) and labels."""
    batch = _read_pickle(path, [b"data", label_key], trust_files)
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _corrupt(path, f"data is {data.dtype} {data.shape}, expected uint8 N x 3072")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise _corrupt(path, f"{labels.size} labels for {len(data)} images")
    _check_labels(path, labels, num_classes)
    # The row layout is channel-major, so a plain reshape gives C x H x W.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(
    root: str | Path, num_classes: int = 10, download: bool = False, trust_files: bool = False
) -> Source:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python pickle batches as distributed.

    The batches are read with a restricted unpickler (numpy arrays, lists, dicts, bytes, numbers
    only); `trust_files=True` (data.trust_files) unpickles them unrestricted.
    """
    if num_classes not in _CIFAR:
        raise ConfigError(f"data.num_classes={num_classes}: CIFAR comes with 10 or 100 classes")
    lay, root = _CIFAR[num_classes], Path(root).expanduser()
    if download:
        import torchvision.datasets as tvd

        _download(
            lay.data, lambda: getattr(tvd, lay.tv_class)(str(root), train=True, download=True)
        )
    folder = root / lay.folder
    paths = [folder / n for n in (*lay.train, lay.test, lay.meta)]
    _require_files(
        paths,
        lay.data,
        f"{lay.title} python batches",
        root,
        f"the extracted '{lay.archive}' archive",
    )
    parts = [_read_cifar_batch(folder / n, lay.label_key, num_classes, trust_files) for n in lay.train]
    test_images, test_labels = _read_cifar_batch(folder / lay.test, lay.label_key, num_classes, trust_files)
    meta_path = folder / lay.meta
    names = _read_pickle(meta_path, [lay.names_key], trust_files)[lay.names_key]
    if not isinstance(names, (list, tuple)) or len(names) != num_classes:
        raise _corrupt(meta_path, f"expected {num_classes} class names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train = _image_set(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return Source(train=train, test=_image_set(test_images, test_labels), classes=classes)


# --------------------------------------------------------------------------- image folders


def _class_dirs(folder: Path) -> list[Path]:
    """Sub-folders that name classes, sorted; hidden ones (.git, .ipynb_checkpoints) are skipped."""
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _image_files(folder: Path) -> list[Path]:
    """Image files of one class folder, sorted so the order (and thus the split) is reproducible."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in _IMAGE_EXTENSIONS
    )
    if not files:
        exts = " ".join(sorted(e.lstrip(".") for e in _IMAGE_EXTENSIONS))
        raise DatasetError(f"data=imagefolder: class folder {folder} holds no images ({exts})")
    return files


def _load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode one image to a uint8 C x H x W array of the requested size and channel count."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    # UnidentifiedImageError and truncated-file errors are OSErrors.
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"data=imagefolder: cannot read image {path} ({type(exc).__name__}); "
            "remove or replace that file"
        ) from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _scan(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """All image files below folder/<class>/ with their class indices (into `classes`)."""
    files, labels = [], []
    for cls_dir in _class_dirs(folder):
        found = _image_files(cls_dir)
        files += found
        labels += [classes.index(cls_dir.name)] * len(found)
    return files, np.asarray(labels, dtype=np.int64)


def _stack(files: Sequence[Path], labels: np.ndarray, image_size: int, channels: int) -> ImageSet:
    """Decode and stack images; an empty list gives a correctly shaped empty set."""
    arrays = [_load_image(p, image_size, channels) for p in files]
    images = (
        np.stack(arrays) if arrays else np.empty((0, channels, image_size, image_size), np.uint8)
    )
    return _image_set(images, labels)


_Files = tuple[list[Path], np.ndarray]  # image paths and their class indices


def _folder_splits(root: Path, test_fraction: float, seed: int) -> tuple[list[str], _Files, _Files]:
    """Class names plus train and test file lists, from either folder layout (nothing decoded)."""
    split = (root / "train").is_dir() and (root / "test").is_dir()
    class_root = root / "train" if split else root
    classes = [p.name for p in _class_dirs(class_root)]
    if not classes:
        raise DatasetError(f"data=imagefolder: no class sub-folders in {class_root}")
    if split:
        # Test classes index into the train class list, so an extra test class has no label.
        unknown = sorted({p.name for p in _class_dirs(root / "test")} - set(classes))
        if unknown:
            raise DatasetError(
                f"data=imagefolder: {root / 'test'} has classes missing from train: {unknown}"
            )
        return classes, _scan(root / "train", classes), _scan(root / "test", classes)
    files, labels = _scan(root, classes)
    tr, te = _split_indices(labels, test_fraction, seed)
    return classes, ([files[i] for i in tr], labels[tr]), ([files[i] for i in te], labels[te])


def load_imagefolder(
    root: str | Path,
    image_size: int = 32,
    channels: int = 3,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Source:
    """A folder per class, either root/{train,test}/<class>/* or root/<class>/* split per class.

    Images are resized (bilinear) to image_size x image_size and converted to 1 or 3 channels.
    """
    if channels not in (1, 3):
        raise ConfigError(
            f"data.channels={channels}: image folders are read as 1 (grey) or 3 (RGB) channels"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction={test_fraction}: must be strictly between 0 and 1")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(
            f"data=imagefolder: expected a folder per class at {root} (not found); "
            "put one sub-folder of images per class there (or train/ and test/ holding them)"
        )
    classes, train, test = _folder_splits(root, test_fraction, seed)
    return Source(
        train=_stack(*train, image_size, channels),
        test=_stack(*test, image_size, channels),
        classes=classes,
    )


# --------------------------------------------------------------------------- synthetic


def _synthetic_split(
    prototypes: torch.Tensor, n: int, image_size: int, noise: float, gen: torch.Generator
) -> ImageSet:
    """Draw n balanced samples: a randomly shifted crop of the class prototype plus pixel noise."""
    num_classes, channels, padded, _ = prototypes.shape
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    max_offset = padded - image_size
    dy = torch.randint(0, max_offset + 1, (n,), generator=gen)
    dx = torch.randint(0, max_offset + 1, (n,), generator=gen)
    # Gather the shifted crops with index arithmetic instead of a Python loop over samples.
    rows = (dy[:, None] + torch.arange(image_size))[:, None, :, None]  # n x 1 x S x 1
    cols = (dx[:, None] + torch.arange(image_size))[:, None, None, :]  # n x 1 x 1 x S
    chans = torch.arange(channels)[None, :, None, None]
    clean = prototypes[labels[:, None, None, None], chans, rows, cols]
    noisy = clean + noise * torch.randn(clean.shape, generator=gen)
    images = torch.round(noisy.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return ImageSet(images=images, labels=labels.to(torch.int64))


def make_synthetic(
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 32,
    n_train: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    noise: float = 0.35,
) -> Source:
    """A generated, learnable data set of any shape, for tests and smoke runs without files.

    Each class has a smooth random prototype (a low-resolution random 0/1 image, upsampled
    bilinearly); samples are shifted crops of it plus Gaussian noise, quantised to uint8.
    Same seed, same data; the generator is private, so the global RNG is left untouched.
    """
    if min(num_classes, channels, image_size, n_train, n_test) < 1 or noise < 0:
        raise ConfigError(
            f"synthetic data: num_classes={num_classes}, channels={channels}, "
            f"image_size={image_size}, n_train={n_train}, n_test={n_test} must be >= 1 "
            f"and noise={noise} >= 0"
        )
    gen = torch.Generator().manual_seed(seed)
    shift = max(1, image_size // 16)  # a small translation: models must be a bit shift-tolerant
    low = max(4, image_size // 4)  # low resolution -> smooth patterns that survive the shift
    # Binary coarse cells give full-contrast prototypes: classes stay apart despite noise and shift.
    coarse = (torch.rand((num_classes, channels, low, low), generator=gen) > 0.5).float()
    prototypes = F.interpolate(
        coarse, size=(image_size + 2 * shift,) * 2, mode="bilinear", align_corners=False
    )
    return Source(
        train=_synthetic_split(prototypes, n_train, image_size, noise, gen),
        test=_synthetic_split(prototypes, n_test, image_size, noise, gen),
        classes=[str(i) for i in range(num_classes)],
    )
