"""Labelled image data sets read from local files only (never downloaded at run time).

``digits`` is scikit-learn's embedded 8x8 digits set; ``mnist``, ``fashion-mnist`` and ``kmnist`` are
read from a folder of IDX files in the MNIST format (gzip-compressed or plain); ``cifar10`` from the
standard ``cifar-10-batches-py`` folder of pickled batches.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn.datasets
import torch

from simulations.dataset_names import DATASET_NAMES, IDX_DATASETS, SPLITS

__all__ = [
    "DATASET_NAMES",
    "IDX_DATASETS",
    "SPLITS",
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_idx",
    "read_idx",
]

# CIFAR-10's python version: five training batches and one test batch, 10,000 images each.
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "t10k": ("test_batch",)}
CIFAR10_SIDE = 32

# IDX magic number: two zero bytes, a type code, the number of dimensions. Big-endian data follows.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class Dataset:
    """Images and labels held in memory.

    Attributes:
        x: images, float32 [N, C, H, W] with H = W, values in [0, 1].
        y: labels, int64 [N], in [0, num_classes).
        name: where the data came from (``"digits"``, ``"mnist"``, ...).
        num_classes: classes of the task (some may be absent from a subset).
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.ndim != 4 or self.x.shape[2] != self.x.shape[3]:
            raise ValueError(
                f"Dataset {self.name!r}: x must be float32 [N, C, H, W] with H = W, "
                f"got {self.x.dtype} {list(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != self.x.shape[:1]:
            raise ValueError(
                f"Dataset {self.name!r}: y must be int64 [N] with N = {len(self.x)}, "
                f"got {self.y.dtype} {list(self.y.shape)}"
            )
        if len(self.y) and not 0 <= int(self.y.min()) <= int(self.y.max()) < self.num_classes:
            raise ValueError(
                f"Dataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                f"got [{int(self.y.min())}, {int(self.y.max())}]"
            )

    @property
    def in_channels(self) -> int:
        return self.x.shape[1]

    @property
    def image_size(self) -> int:
        """Height = width of the images, in pixels."""
        return self.x.shape[2]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Dataset:
        """The examples at ``indices`` (in that order), with the same name and classes."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Dataset(self.x[index], self.y[index], self.name, self.num_classes)


def load_digits() -> Dataset:
    """scikit-learn's embedded handwritten digits: 1797 images [1797, 1, 8, 8], 10 classes.

    Pixel values are 0..16 in the source and are scaled to [0, 1].
    """
    bunch = sklearn.datasets.load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return Dataset(x, y, "digits", 10)


def load_idx(
    folder: str | Path, split: str = "t10k", *, name: str | None = None, num_classes: int = 10
) -> Dataset:
    """Images and labels from MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST).

    Reads ``{split}-images-idx3-ubyte`` and ``{split}-labels-idx1-ubyte`` from ``folder``, each
    gzip-compressed (``.gz``, preferred when both exist) or plain.

    Args:
        folder: the folder holding the files.
        split: the file prefix: ``"t10k"`` (test) or ``"train"``.
        name: the data set's name; defaults to the folder's name.
        num_classes: classes of the task (10 for all three data sets).

    Returns:
        A `Dataset` with images float32 [N, 1, 28, 28] scaled from bytes to [0, 1].

    Raises:
        FileNotFoundError: a file is missing (the message names the paths tried).
        ValueError: a bad magic number, unexpected dimensions, a truncated file, or image and
            label counts that differ.
    """
    folder = Path(folder)
    images = read_idx(_find_idx_file(folder, f"{split}-images-idx3-ubyte"))
    labels = read_idx(_find_idx_file(folder, f"{split}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{folder}: {split} images must be unsigned bytes [N, H, W], "
            f"got {images.dtype} {list(images.shape)}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{folder}: {split} labels must be [N], got {list(labels.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return Dataset(x, y, name or folder.name, num_classes)


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (gzip-compressed when its name ends in ``.gz``) as a native-endian array.

    The header is a magic number (two zero bytes, a type code, the number of dimensions) and then
    one big-endian uint32 size per dimension; the data follows, big-endian, in C order.

    Raises:
        ValueError: a bad magic number, a file whose length disagrees with its header, or a ``.gz`` file
            that is cut short or not gzip-compressed (the message names the file).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # a cut or mislabelled download
        raise ValueError(f"{path}: cannot be read as a gzip-compressed IDX file ({error})") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file: bad magic number {raw[:4].hex() or '(empty file)'} "
            "(expected 0000, a type code in 08 09 0b 0c 0d 0e, then the number of dimensions)"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: {len(raw)} bytes, but the header {list(shape)} of {dtype} implies {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def load_cifar10(folder: str | Path, split: str = "t10k") -> Dataset:
    """CIFAR-10 from its standard python folder (``cifar-10-batches-py``, as the official archive unpacks).

    Each batch file is a pickled dict with ``b"data"``, uint8 [N, 3072] (the red, green and blue
    32x32 planes of an image, rows first), and ``b"labels"``, N ints in [0, 10). Pickle can run code
    while loading: read only files you trust (the official archive).

    Args:
        folder: the folder holding the batch files.
        split: ``"t10k"`` (``test_batch``: 10,000 images) or ``"train"`` (``data_batch_1`` to ``_5``:
            50,000 images).

    Returns:
        A `Dataset` named ``"cifar10"`` with images float32 [N, 3, 32, 32] scaled from bytes to [0, 1].

    Raises:
        FileNotFoundError: a batch file is missing (the message names it).
        ValueError: an unknown split, a batch that is no complete pickle, without those keys or of another
            shape, or image and label counts that differ (the message names the file).
    """
    _check_split(split)
    images, labels = [], []
    for name in CIFAR10_BATCHES[split]:
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(
                f"CIFAR-10 batch file not found: {path} (expected the cifar-10-batches-py folder)"
            )
        try:
            with open(path, "rb") as file:
                batch = pickle.load(file, encoding="bytes")
        except (EOFError, pickle.UnpicklingError) as error:  # a cut download, or another file's bytes
            raise ValueError(f"{path}: cannot be read as a pickled CIFAR-10 batch ({error})") from error
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{path}: not a CIFAR-10 batch: expected a dict with keys b'data' and b'labels'")
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * CIFAR10_SIDE**2:
            raise ValueError(
                f"{path}: b'data' must be uint8 [N, {3 * CIFAR10_SIDE**2}], "
                f"got {data.dtype} {list(data.shape)}"
            )
        if len(batch[b"labels"]) != len(data):
            raise ValueError(f"{path}: {len(data)} images but {len(batch[b'labels'])} labels")
        images.append(data.reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0)
    return Dataset(x, torch.from_numpy(np.concatenate(labels)), "cifar10", 10)


def load_dataset(name: str, data_dir: str | Path | None = None, *, split: str = "t10k") -> Dataset:
    """A data set by name: ``"digits"`` (embedded), or one read from the files in ``data_dir``.

    Args:
        name: one of ``"digits"``, ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"`` (IDX files),
            ``"cifar10"`` (the ``cifar-10-batches-py`` folder).
        data_dir: the folder with the files; required for every data set but ``"digits"``.
        split: ``"t10k"`` (the test split: IDX ``t10k-*`` files, CIFAR-10's ``test_batch``) or
            ``"train"``; ignored for ``"digits"``.

    Raises:
        ValueError: an unknown name or split, or a file-based data set without ``data_dir``.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(map(repr, DATASET_NAMES))}")
    _check_split(split)
    if name == "digits":
        return load_digits()
    if data_dir is None:
        files = (
            "the cifar-10-batches-py folder"
            if name == "cifar10"
            else f"{split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz]"
        )
        raise ValueError(
            f"dataset {name!r} is read from local files: "
            f"set data_dir (--data-dir) to the folder holding {files}"
        )
    if name == "cifar10":
        return load_cifar10(data_dir, split)
    return load_idx(data_dir, split, name=name)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(map(repr, SPLITS))}")


def _find_idx_file(folder: Path, stem: str) -> Path:
    candidates = (folder / f"{stem}.gz", folder / stem)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"IDX file not found: tried {' and '.join(str(p) for p in candidates)}")
