import numpy as np
import pytest

from fedsqueeze.models import build_model, get_flat, model_layout, set_flat
from fedsqueeze.tasks import DataError, load_dataset, load_digits, parse_data_arg, partition


def test_digits_shapes() -> None:
    ds = load_digits()
    assert ds.input_shape == (1, 8, 8)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_a_deterministic_partition(scheme: str) -> None:
    y = np.repeat(np.arange(10), 50)
    shards = partition(y, 7, scheme, alpha=0.3, seed=1)
    joined = np.sort(np.concatenate(shards))
    assert np.array_equal(joined, np.arange(len(y)))
    assert all(len(s) > 0 for s in shards)
    again = partition(y, 7, scheme, alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))


def test_dirichlet_small_alpha_skews_labels() -> None:
    y = np.repeat(np.arange(10), 100)
    shards = partition(y, 5, "dirichlet", alpha=0.05, seed=0)
    dominant = [np.bincount(y[s], minlength=10).max() / len(s) for s in shards]
    assert np.mean(dominant) > 0.4


def test_npz_and_errors(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(50, 12).astype(np.float32), y=np.arange(50) % 3)
    ds = load_dataset("npz", str(path))
    assert ds.input_shape == (1, 12) and ds.num_classes == 3
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npz", str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(DataError, match="must hold arrays 'x' and 'y'"):
        load_dataset("npz", str(bad))
    with pytest.raises(DataError, match="unknown data set"):
        parse_data_arg("imagenet:/data")


def test_mnist_folder_in_torchvision_layout(tmp_path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(path, arr):
        header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
        path.write_bytes(header + arr.astype(np.uint8).tobytes())

    for split, n in (("train", 20), ("t10k", 10)):
        idx(raw / f"{split}-images-idx3-ubyte", np.random.randint(0, 255, (n, 28, 28)))
        idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)


def test_model_sizes_match_seed_001() -> None:
    assert model_layout(build_model("mlp", (1, 8, 8), 10)).numel == 15_010
    assert model_layout(build_model("mlp", (1, 28, 28), 10, {"hidden": [20]})).numel == 15_910
    cnn = build_model("cnn", (1, 40), 10)
    flat = get_flat(cnn)
    set_flat(cnn, flat + 1)
    assert np.allclose(get_flat(cnn), flat + 1)


def test_mnist1d_num_samples_is_generated_once_then_read_from_the_cache(tmp_path, monkeypatch) -> None:
    from fedsqueeze.tasks import load_mnist1d

    monkeypatch.setenv("FEDSQUEEZE_CACHE", str(tmp_path))
    first = load_mnist1d(3, 600)
    assert len(first.y_train) == 480 and len(first.y_test) == 120 and first.input_shape == (1, 40)
    cached = tmp_path / "mnist1d-v1-n600-s3.npz"
    assert cached.exists()
    again = load_mnist1d(3, 600)
    assert np.array_equal(first.x_train, again.x_train) and np.array_equal(first.y_test, again.y_test)
    cached.write_bytes(b"not an npz")  # a torn or foreign file is regenerated, not trusted
    third = load_mnist1d(3, 600)
    assert np.array_equal(first.x_train, third.x_train)


def test_plan_num_samples_only_for_mnist1d() -> None:
    from fedsqueeze.plan import Plan, PlanError

    assert Plan.from_json({"task": {"dataset": "mnist1d", "num_samples": 20000}}).task.num_samples == 20000
    with pytest.raises(PlanError, match="mnist1d data set only"):
        Plan.from_json({"task": {"dataset": "digits", "num_samples": 20000}})
    with pytest.raises(PlanError, match="num_samples must be"):
        Plan.from_json({"task": {"dataset": "mnist1d", "num_samples": 5}})
