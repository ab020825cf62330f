"""examples/cifar10_resnet on a synthetic CIFAR-10 folder in the published binary layout.

The reader (fedsqueeze.tasks.read_cifar10_bin) round trips records and names what is wrong with a
folder; the example federates a ResNet-8 over real gRPC processes and learns the synthetic classes.
"""

from __future__ import annotations

import importlib.util
import json
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedsqueeze.tasks import (
    CIFAR10_RECORD,
    CIFAR10_TEST_BATCH,
    CIFAR10_TRAIN_BATCHES,
    DataError,
    cifar10_bin_dir,
    load_cifar10,
    read_cifar10_bin,
)

from .test_examples import accuracy_by_round, federate, save_initial_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cifar10_resnet"


def synthetic_images(labels: np.ndarray, rng: np.random.Generator, noise: float = 60.0) -> np.ndarray:
    """Images (N, 3, 32, 32) uint8 whose class sets a colour and a stripe pattern, under Gaussian noise."""
    classes = np.random.default_rng(1234)  # the same classes in every file
    colours = classes.uniform(70, 185, (10, 3))
    angles, freqs = classes.uniform(0, np.pi, 10), classes.uniform(0.2, 0.8, 10)
    yy, xx = np.mgrid[0:32, 0:32]
    along = np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy  # (10, 32, 32)
    stripes = 40 * np.sin(freqs[:, None, None] * along)
    mean = colours[:, :, None, None] + stripes[:, None]  # (10, 3, 32, 32)
    images = mean[labels] + rng.normal(0, noise, (len(labels), 3, 32, 32))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """One binary batch: per record a label byte, then the 3072 pixel bytes (R, G, B planes)."""
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    records.tofile(path)


def write_synthetic_cifar10(root: Path, per_file: int = 200, seed: int = 0) -> Path:
    """`root/cifar-10-batches-bin` with the five training batches and the test batch, `per_file` records each."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH):
        labels = rng.integers(0, 10, per_file)
        write_batch(folder / name, synthetic_images(labels, rng), labels)
    return folder


def test_binary_batches_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 37)
    images = rng.integers(0, 256, (37, 3, 32, 32), dtype=np.uint8)
    write_batch(tmp_path / "b.bin", images, labels)
    assert (tmp_path / "b.bin").stat().st_size == 37 * CIFAR10_RECORD
    got_images, got_labels = read_cifar10_bin(tmp_path / "b.bin")
    assert got_images.dtype == np.uint8 and got_images.shape == (37, 3, 32, 32)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    # channel-major: record 0's first pixel bytes are the red plane's first row
    raw = np.fromfile(tmp_path / "b.bin", dtype=np.uint8)
    assert raw[0] == labels[0] and list(raw[1:33]) == list(images[0, 0, 0])
    assert list(raw[1 + 1024 : 1 + 1024 + 32]) == list(images[0, 1, 0])


def test_a_folder_loads_and_its_faults_are_named(tmp_path: Path) -> None:
    folder = write_synthetic_cifar10(tmp_path, per_file=20)
    assert cifar10_bin_dir(tmp_path) == folder and cifar10_bin_dir(folder) == folder
    data = load_cifar10(tmp_path)
    assert data.x_train.shape == (100, 3, 32, 32) and data.x_test.shape == (20, 3, 32, 32)
    assert data.x_train.dtype == np.float32 and 0 <= data.x_train.min() and data.x_train.max() <= 1
    np.testing.assert_array_equal(data.y_test, read_cifar10_bin(folder / CIFAR10_TEST_BATCH)[1])

    raw = (folder / "data_batch_3.bin").read_bytes()
    (folder / "data_batch_3.bin").write_bytes(raw[:-100])  # truncated
    with pytest.raises(DataError, match=r"data_batch_3\.bin: 61360 bytes is not a whole number of 3073-byte"):
        load_cifar10(tmp_path)
    (folder / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"data_batch_3\.bin does not exist"):
        load_cifar10(tmp_path)
    (folder / "data_batch_3.bin").write_bytes(b"")
    with pytest.raises(DataError, match="0 bytes"):
        read_cifar10_bin(folder / "data_batch_3.bin")
    bad_label = bytearray(raw)
    bad_label[CIFAR10_RECORD] = 10  # record 1
    (folder / "data_batch_3.bin").write_bytes(bytes(bad_label))
    with pytest.raises(DataError, match="record 1 has label 10"):
        read_cifar10_bin(folder / "data_batch_3.bin")
    with pytest.raises(DataError, match="no test_batch.bin"):
        cifar10_bin_dir(tmp_path / "elsewhere")


def example_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("cifar10_resnet_example", EXAMPLE / "train_federated.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny batches on a shared machine: one thread is many times faster than several contending."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_examples_slices_model_and_local_training(tmp_path: Path, one_torch_thread: None) -> None:
    import torch

    example = example_module()
    write_synthetic_cifar10(tmp_path, per_file=30)
    parts = [example.load_data(str(tmp_path), part, 3, 0, 0) for part in range(3)]
    assert [len(p[1]) for p in parts] == [50, 50, 50] and [len(p[3]) for p in parts] == [10, 10, 10]
    # the slices are disjoint and together the whole training set, in file order
    everything = torch.from_numpy(load_cifar10(tmp_path).y_train)
    torch.testing.assert_close(torch.stack([p[1] for p in parts], 1).flatten(), everything)
    x, y, x_test, y_test = example.load_data(str(tmp_path), 1, 3, 8, 4)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and len(y_test) == 4

    images = example.normalise(x)
    crops = example.augment(images)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for crop, pad in zip(crops, padded, strict=True):  # each a window of the padded image, maybe mirrored
        windows = [pad[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(2)) for w in windows)

    model = example.ResNet()
    assert sum(p.numel() for p in model.parameters()) == 78_042  # ResNet-8, 16-32-64 channels
    assert sum(p.numel() for p in example.ResNet(3).parameters()) == 272_474  # ResNet-20
    args = types.SimpleNamespace(batch_size=3, epochs=1, steps=2, device="cpu", no_augment=False)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss, seen = example.train_round(model, x, y, optimizer, torch.nn.CrossEntropyLoss(), args)
    assert (
        seen == 6
        and loss > 0
        and any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    )
    args.steps = 0
    assert example.train_round(model, x, y, optimizer, torch.nn.CrossEntropyLoss(), args)[1] == 8
    metrics = example.evaluate(model, x_test, y_test, torch.nn.CrossEntropyLoss(), batch_size=3)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0


@pytest.mark.slow
def test_the_federated_cifar10_resnet(tmp_path: Path, procs: list) -> None:
    write_synthetic_cifar10(tmp_path / "data", per_file=200)
    save_initial_model(EXAMPLE, "train_federated", "ResNet()", tmp_path / "model.safetensors")
    plan = {**json.loads((EXAMPLE / "plan.json").read_text()), "rounds": 10}
    script = str(EXAMPLE / "train_federated.py")
    report = federate(tmp_path, procs, plan, tmp_path / "model.safetensors",
                      [[script, "--server", "{server}", "--data", str(tmp_path / "data"), "--part", str(i),
                        "--parts", "2", "--device", "cpu"] for i in range(2)])  # fmt: skip
    accuracy, s = accuracy_by_round(report, plan, "cifar10_resnet (synthetic)")
    assert accuracy[-1] > 0.6 and s["up_ratio"] > 50 and s["down_ratio"] > 15
