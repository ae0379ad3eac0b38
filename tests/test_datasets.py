"""Local data loaders: the IDX format (MNIST, Fashion-MNIST, KMNIST) and the embedded digits."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from simulations.datasets import Dataset, load_cifar10, load_dataset, load_digits, load_idx, read_idx

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared/data/mnist"


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    """An IDX file: magic (0, 0, type, ndim), big-endian uint32 dims, then the data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_tiny_mnist(folder: Path, suffix: str, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_loader_reads_gzip_and_plain_files_into_scaled_images(tmp_path: Path, suffix: str) -> None:
    images, labels = write_tiny_mnist(tmp_path, suffix)
    data = load_idx(tmp_path)
    assert data.x.dtype == torch.float32 and data.x.shape == (5, 1, 28, 28)
    assert data.y.dtype == torch.int64 and data.y.tolist() == labels.tolist()
    np.testing.assert_allclose(data.x[:, 0].numpy() * 255.0, images, atol=1e-4)
    assert data.name == tmp_path.name and data.num_classes == 10


def test_idx_reader_parses_wider_types_big_endian(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.int32).reshape(2, 3) * 1000
    write_idx(tmp_path / "ints-idx2", values, type_code=0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints-idx2"), values)


def test_idx_loader_rejects_a_bad_magic_number(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, "")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x1f\x8b\x08\x03" + bytes(100))
    with pytest.raises(ValueError, match="bad magic number 1f8b0803"):
        load_idx(tmp_path)


def test_idx_loader_rejects_a_truncated_file(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, "")
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="implies"):
        load_idx(tmp_path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[: len(raw) // 2], "Compressed file ended"),  # a cut download
        (gzip.decompress, "Not a gzipped file"),  # a plain file named .gz
    ],
    ids=["cut-short", "not-gzip"],
)
def test_idx_loader_names_a_gz_file_it_cannot_decompress(tmp_path: Path, damage, reason: str) -> None:
    write_tiny_mnist(tmp_path, ".gz", n=50)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"t10k-images-idx3-ubyte\.gz: cannot be read as a gzip.*{reason}"):
        load_idx(tmp_path)


def test_idx_loader_names_the_missing_file(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, ".gz")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_idx(tmp_path)


def test_idx_loader_rejects_image_and_label_counts_that_differ(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, "")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="5 t10k images but 4 labels"):
        load_idx(tmp_path)


def test_digits_are_1797_single_channel_8x8_images_in_unit_range() -> None:
    data = load_digits()
    assert data.x.shape == (1797, 1, 8, 8) and data.x.dtype == torch.float32
    assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0
    assert data.y.dtype == torch.int64 and sorted(data.y.unique().tolist()) == list(range(10))
    assert (data.in_channels, data.image_size, len(data), data.num_classes) == (1, 8, 1797, 10)


def test_subset_keeps_the_chosen_examples_in_order() -> None:
    data = load_digits()
    part = data.subset(np.array([5, 0, 5]))
    assert len(part) == 3 and part.name == "digits" and part.num_classes == 10
    assert torch.equal(part.x[1], data.x[0]) and part.y.tolist() == [data.y[5], data.y[0], data.y[5]]


def test_dataset_rejects_labels_outside_its_classes() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        Dataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 3]), "toy", 3)


def test_dataset_rejects_images_that_are_not_nchw_float32() -> None:
    with pytest.raises(ValueError, match="x must be float32"):
        Dataset(torch.zeros(2, 4, 4), torch.tensor([0, 1]), "toy", 3)


def test_load_dataset_requires_a_data_dir_for_idx_data_sets() -> None:
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist")


def test_load_dataset_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def test_load_dataset_reads_idx_data_under_the_requested_name(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, ".gz")
    assert load_dataset("fashion-mnist", tmp_path).name == "fashion-mnist"


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"no MNIST test split at {REAL_MNIST}")
def test_real_mnist_test_split_has_10000_images_of_every_class() -> None:
    data = load_dataset("mnist", REAL_MNIST)
    assert data.x.shape == (10_000, 1, 28, 28) and data.name == "mnist"
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) == 1.0
    counts = torch.bincount(data.y, minlength=10)
    assert len(counts) == 10 and int(counts.min()) > 800


def write_tiny_cifar10(
    folder: Path, split_files: tuple[str, ...], n: int = 4
) -> tuple[np.ndarray, list[int]]:
    """Batch files in CIFAR-10's python format: pickled dicts of b"data" uint8 [n, 3072] and b"labels"."""
    rng = np.random.default_rng(1)
    images, labels = [], []
    for name in split_files:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, 10, size=n).tolist()
        (folder / name).write_bytes(
            pickle.dumps({b"data": data, b"labels": batch_labels, b"batch_label": b"x"})
        )
        images.append(data)
        labels += batch_labels
    return np.concatenate(images), labels


def test_cifar10_loader_reads_the_test_batch_as_rgb_planes_scaled_to_unit_range(tmp_path: Path) -> None:
    images, labels = write_tiny_cifar10(tmp_path, ("test_batch",))
    data = load_dataset("cifar10", tmp_path)
    assert data.x.shape == (4, 3, 32, 32) and data.x.dtype == torch.float32
    assert data.y.tolist() == labels and (data.name, data.num_classes, data.in_channels) == ("cifar10", 10, 3)
    # Row i holds 1024 red, then 1024 green, then 1024 blue values, each plane row by row.
    assert data.x[2, 1, 0, 5] * 255 == pytest.approx(images[2, 1024 + 5], abs=1e-3)
    assert data.x[3, 2, 31, 31] * 255 == pytest.approx(images[3, 3071], abs=1e-3)


def test_cifar10_train_split_concatenates_the_five_data_batches_in_order(tmp_path: Path) -> None:
    names = tuple(f"data_batch_{i}" for i in range(1, 6))
    _, labels = write_tiny_cifar10(tmp_path, names, n=2)
    data = load_cifar10(tmp_path, "train")
    assert len(data) == 10 and data.y.tolist() == labels


def test_cifar10_loader_names_a_missing_batch_file(tmp_path: Path) -> None:
    write_tiny_cifar10(tmp_path, ("data_batch_1", "data_batch_2"))
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")


def test_cifar10_loader_rejects_a_batch_of_the_wrong_shape(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 784), dtype=np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match=r"b'data' must be uint8 \[N, 3072\], got uint8 \[2, 784\]"):
        load_cifar10(tmp_path)


def test_cifar10_loader_names_a_batch_file_cut_short(tmp_path: Path) -> None:
    write_tiny_cifar10(tmp_path, ("test_batch",))
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="test_batch: cannot be read as a pickled CIFAR-10 batch"):
        load_cifar10(tmp_path)


def test_cifar10_loader_rejects_a_file_that_is_not_a_batch(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        load_cifar10(tmp_path)


def test_load_dataset_requires_a_data_dir_for_cifar10_and_a_known_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar-10-batches-py"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_dataset("cifar10", tmp_path, split="test")
