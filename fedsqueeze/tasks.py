"""Data sets that need no download, users' own files, and federated partitioning.

Built-in: `digits` (scikit-learn's 8x8 handwritten digits, shipped inside the package),
`mnist1d` (generated procedurally by the `mnist1d` package) and `stdlib` (next-byte prediction on
the Python standard library's own sources, fedsqueeze/stdlib_text.py). Users' own data: an `.npz` with
`x` and `y` (and optionally `x_test`, `y_test`), an MNIST folder in torchvision's layout
(`MNIST/raw/*-ubyte[.gz]`), or a CIFAR-10 folder (`cifar-10-batches-bin` or `-py`). Nothing is
ever downloaded.
"""

from __future__ import annotations

import gzip
import os
import pickle  # only for local CIFAR-10 python batches, through an allow-listing unpickler
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedsqueeze.plan import Plan


class DataError(ValueError):
    """A data set cannot be loaded; the message says which file and why."""


@dataclass
class Dataset:
    x_train: np.ndarray  # float32, (N, C, ...) channels first; or token ids (N, T) for a language model
    y_train: np.ndarray  # int64 labels (N,); or uint8 next tokens (N, T)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int  # classes, or a language model's vocabulary
    # what a Dirichlet partition skews (None: the labels): a text sample's topic, since its targets are tokens
    topics: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def partition_labels(self) -> np.ndarray:
        return self.y_train if self.topics is None else self.topics


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, y_tr, x_te, y_te = _split(x, y, 0.2, seed)
    return Dataset(x_tr, y_tr, x_te, y_te, 10)


MNIST1D_SAMPLES = 5000  # the published data set's size: 4,000 train + 1,000 test


def cache_dir() -> Path:
    """Where generated data sets are kept: $FEDSQUEEZE_CACHE, else $XDG_CACHE_HOME/fedsqueeze or ~/.cache/fedsqueeze."""
    if os.environ.get("FEDSQUEEZE_CACHE"):
        return Path(os.environ["FEDSQUEEZE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedsqueeze"


def load_mnist1d(seed: int = 0, num_samples: int = MNIST1D_SAMPLES) -> Dataset:
    """MNIST-1D generated procedurally (80 % train, 20 % test), cached on disk: 50,000 samples take ~10 s to make."""
    cached = cache_dir() / f"mnist1d-v1-n{num_samples}-s{seed}.npz"
    try:
        with np.load(cached, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        if len(arrays["y"]) + len(arrays["y_test"]) == num_samples:
            return _mnist1d_dataset(arrays)
    except (OSError, KeyError, ValueError):
        pass  # not there yet, or unreadable: generate it
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = 42 + seed
    state = np.random.get_state()  # mnist1d seeds numpy's global generator
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    try:  # best effort: another process may write the same file; the rename is atomic
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cached)
    except OSError:
        pass
    return _mnist1d_dataset(arrays)


def _mnist1d_dataset(a: dict[str, np.ndarray]) -> Dataset:
    return Dataset(
        a["x"].astype(np.float32)[:, None, :],
        a["y"].astype(np.int64),
        a["x_test"].astype(np.float32)[:, None, :],
        a["y_test"].astype(np.int64),
        10,
    )


def load_npz(path: str | Path, seed: int = 0) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from exc
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path} must hold arrays 'x' and 'y' (found {sorted(arrays)})")
    x, y = arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples, y has {len(y)}")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim == 2:
        x = x[:, None, :]
    if "x_test" in arrays and "y_test" in arrays:
        x_te, y_te = arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64)
        x_te = x_te.reshape((len(x_te),) + x.shape[1:])
        x_tr, y_tr = x, y
    else:
        x_tr, y_tr, x_te, y_te = _split(x, y, 0.2, seed)
    num_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX files are supported")
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4").astype(np.int64)
    data = np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(tuple(dims))


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / "MNIST" / "raw", root / "raw", root):
        for suffix in ("", ".gz"):
            p = candidate / f"{stem}{suffix}"
            if p.is_file():
                return p
    raise DataError(
        f"MNIST file {stem}[.gz] not found under {root} (expected torchvision's MNIST/raw layout)"
    )


def load_mnist(root: str | Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist")
    xs = {s: _read_idx(_find(root, f"{s}-images-idx3-ubyte")) for s in ("train", "t10k")}
    ys = {s: _read_idx(_find(root, f"{s}-labels-idx1-ubyte")) for s in ("train", "t10k")}
    return Dataset(
        (xs["train"].astype(np.float32) / 255.0)[:, None],
        ys["train"].astype(np.int64),
        (xs["t10k"].astype(np.float32) / 255.0)[:, None],
        ys["t10k"].astype(np.int64),
        10,
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of dicts of numpy arrays: allow exactly that."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


CIFAR10_RECORD = 1 + 3 * 32 * 32  # binary layout: a label byte, then 32x32 pixels of R, then G, then B
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch.bin"


def read_cifar10_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch file: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch {path} does not exist")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {CIFAR10_RECORD}-byte records "
            "(1 label byte + 3072 pixel bytes): truncated, or not CIFAR-10's binary layout"
        )
    records = raw.reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(
            f"{path}: record {bad} has label {labels[bad]}, not 0-9: not CIFAR-10's binary layout"
        )
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _folder_with(root: Path, subfolder: str, name: str) -> Path | None:
    return next((d for d in (root / subfolder, root) if (d / name).is_file()), None)


def cifar10_bin_dir(root: str | Path) -> Path:
    """The folder holding the binary batches: `root/cifar-10-batches-bin` or `root` itself."""
    folder = _folder_with(Path(root), "cifar-10-batches-bin", CIFAR10_TEST_BATCH)
    if folder is None:
        raise DataError(f"no {CIFAR10_TEST_BATCH} in {root} or {Path(root) / 'cifar-10-batches-bin'}")
    return folder


def read_cifar10_bins(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Several binary batches of `folder`, concatenated (uint8 images, int64 labels)."""
    batches = [read_cifar10_bin(folder / name) for name in names]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _read_cifar10_py(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    batches = []
    for name in names:
        with open(folder / name, "rb") as f:
            batches.append(_NumpyOnlyUnpickler(f, encoding="bytes").load())
    images = np.concatenate([np.asarray(b[b"data"]).reshape(-1, 3, 32, 32) for b in batches])
    return images, np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])


def load_cifar10(root: str | Path) -> Dataset:
    """A CIFAR-10 folder: the binary batches (`cifar-10-batches-bin`), else the python ones (`-py`)."""
    root = Path(root)
    bin_dir = _folder_with(root, "cifar-10-batches-bin", CIFAR10_TEST_BATCH)
    py_dir = _folder_with(root, "cifar-10-batches-py", "test_batch")
    if bin_dir is not None:
        x_tr, y_tr = read_cifar10_bins(bin_dir, CIFAR10_TRAIN_BATCHES)
        x_te, y_te = read_cifar10_bin(bin_dir / CIFAR10_TEST_BATCH)
    elif py_dir is not None:
        x_tr, y_tr = _read_cifar10_py(py_dir, [f"data_batch_{i}" for i in range(1, 6)])
        x_te, y_te = _read_cifar10_py(py_dir, ["test_batch"])
    else:
        raise DataError(
            f"no CIFAR-10 batches under {root} (expected cifar-10-batches-bin or cifar-10-batches-py)"
        )
    return Dataset(x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te, 10)


STDLIB_WINDOW = 64  # bytes per sample: the language model's context
STDLIB_TEST_WINDOWS = 256  # held-out windows the aggregator evaluates on (16,384 bytes)


def load_stdlib() -> Dataset:
    """Next-byte prediction on the standard library's sources: windows of STDLIB_WINDOW bytes.

    A window's topic (what a Dirichlet partition skews) is its top-level package. Every 10th file, in sorted
    order, is held out; the test set is STDLIB_TEST_WINDOWS windows, about as many from each held-out file."""
    from fedsqueeze import stdlib_text

    groups = stdlib_text.stdlib_groups()
    _, held = stdlib_text.held_out([f for name in sorted(groups) for f in groups[name]])
    held_set = set(held)
    xs, ys, topics = [], [], []
    for topic, name in enumerate(sorted(groups)):
        train = [f for f in groups[name] if f not in held_set]
        x, y = stdlib_text.cut_windows(stdlib_text.concatenate(train), STDLIB_WINDOW)
        xs.append(x)
        ys.append(y)
        topics.append(np.full(len(x), topic, dtype=np.int64))
    per_file = -(-STDLIB_TEST_WINDOWS // len(held))
    test = [stdlib_text.cut_windows(stdlib_text.concatenate([f]), STDLIB_WINDOW) for f in held]
    test_x = np.concatenate([x[stdlib_text.evenly_spaced(per_file, len(x))] for x, _ in test])
    test_y = np.concatenate([y[stdlib_text.evenly_spaced(per_file, len(y))] for _, y in test])
    keep = stdlib_text.evenly_spaced(STDLIB_TEST_WINDOWS, len(test_x))
    return Dataset(np.concatenate(xs), np.concatenate(ys), test_x[keep], test_y[keep], stdlib_text.VOCAB,
                   topics=np.concatenate(topics))  # fmt: skip


DATASETS = {"digits", "mnist1d", "stdlib", "npz", "mnist", "cifar10"}
GENERATED = {"digits", "mnist1d", "stdlib"}  # made the same on every machine, and cut into the plan's shards


def load_dataset(name: str, path: str | None = None, seed: int = 0, num_samples: int = 0) -> Dataset:
    """A data set by name; `num_samples` (mnist1d only) generates that many instead of the standard 5,000."""
    if name == "digits":
        return load_digits(seed)
    if name == "mnist1d":
        return load_mnist1d(seed, num_samples or MNIST1D_SAMPLES)
    if name == "stdlib":
        return load_stdlib()
    if path is None:
        raise DataError(f"data set {name!r} needs a path (--data {name}:PATH)")
    if name == "npz":
        return load_npz(path, seed)
    if name == "mnist":
        return load_mnist(path)
    if name == "cifar10":
        return load_cifar10(path)
    raise DataError(
        f"data set {name!r} is not a built-in one ({', '.join(sorted(DATASETS))}): collaborators with data of their own "
        "run an app (`collaborator join --app`)"
    )


def load_plan_dataset(plan: Plan) -> Dataset:
    """The plan's data set, as every process of the federation loads it."""
    return load_dataset(plan.task.dataset, plan.task.data_path, plan.seed, plan.task.num_samples)


def partition(
    labels: np.ndarray, num_shards: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Indices of each shard: IID, or a Dirichlet(alpha) label split (smaller alpha, more skew)."""
    if num_shards < 1:
        raise DataError("num_shards must be >= 1")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), num_shards)]
    if scheme != "dirichlet":
        raise DataError(f"unknown partition scheme {scheme!r}")
    shards: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_shards, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
        for shard, part in zip(shards, np.split(idx, cuts), strict=True):
            shard.append(part)
    out = [np.sort(np.concatenate(s)) for s in shards]
    # Every shard gets at least one sample, taken from the largest shard.
    for i, s in enumerate(out):
        if s.size == 0:
            donor = int(np.argmax([len(t) for t in out]))
            out[i], out[donor] = out[donor][:1], out[donor][1:]
    return out


def parse_data_arg(spec: str) -> tuple[str, str | None]:
    """`digits`, `mnist1d`, `file.npz`, `npz:PATH`, `mnist:DIR`, `cifar10:DIR` -> (name, path)."""
    if spec.endswith(".npz") and ":" not in spec:
        return "npz", spec
    name, sep, path = spec.partition(":")
    if name not in DATASETS:
        raise DataError(
            f"unknown data set {name!r} in --data {spec!r}; known: {sorted(DATASETS)} or a .npz file"
        )
    return name, (path if sep else None)
