"""Text that every Python installation ships: the standard library's own .py files, for language models.

`sysconfig.get_paths()["stdlib"]` holds them (test suites and site-packages left out: ~12 MB, 734 files on
CPython 3.11), so nothing is downloaded; the same Python version gives the same text on every machine.
The files are grouped by top-level package or module (`asyncio`, `email`, `json.py`, ...): a group is a
topic, and a split by groups is non-IID. Every `HELD_OUT_EVERY`-th file of a run of groups is held out.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

VOCAB = 256  # byte-level: a token is a byte
HELD_OUT_EVERY = 10
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
FILE_SEPARATOR = b"\x00"  # between concatenated files (a byte no .py file of the stdlib holds)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_groups(root: Path | None = None) -> dict[str, list[Path]]:
    """Top-level package or module name -> its .py files (sorted), without test suites and site-packages."""
    root = root or stdlib_root()
    groups: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIPPED_DIRS.intersection(parts[:-1]) or not path.is_file():
            continue
        groups.setdefault(parts[0].removesuffix(".py"), []).append(path)
    return groups


def split_groups(groups: dict[str, list[Path]], parts: int) -> list[list[str]]:
    """The group names, sorted, cut into `parts` contiguous runs of about equal bytes, none empty."""
    names = sorted(groups)
    if not 1 <= parts <= len(names):
        raise ValueError(f"{parts} parts of {len(names)} packages")
    sizes = np.array([sum(p.stat().st_size for p in groups[n]) for n in names], dtype=np.float64)
    before = (np.cumsum(sizes) - sizes) / sizes.sum()  # the fraction of all bytes before each group
    cuts = np.searchsorted(before, np.arange(1, parts) / parts).tolist()
    bounds = [0]
    for k, cut in enumerate(cuts, start=1):  # strictly increasing, leaving a group for each later part
        bounds.append(min(max(cut, bounds[-1] + 1), len(names) - (parts - k)))
    bounds.append(len(names))
    return [names[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def held_out(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every HELD_OUT_EVERY-th file is held out, at least one."""
    test = files[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if not test:  # fewer files than HELD_OUT_EVERY still hold one out
        test, train = train[-1:], train[:-1] or train
    return train, test


def concatenate(files: list[Path]) -> np.ndarray:
    """The files' bytes as one uint8 array, FILE_SEPARATOR between them."""
    return np.frombuffer(bytearray(FILE_SEPARATOR.join(f.read_bytes() for f in files)), dtype=np.uint8)


def cut_windows(data: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows of `data`: (inputs, next-byte targets), each (N, length) uint8."""
    n = (len(data) - 1) // length
    x = data[: n * length].reshape(n, length)
    y = data[1 : n * length + 1].reshape(n, length)
    return x, y


def evenly_spaced(count: int, total: int) -> np.ndarray:
    """`count` indices spread evenly over range(total) (all of them when total <= count)."""
    if total <= count:
        return np.arange(total)
    return np.linspace(0, total - 1, count).round().astype(np.int64)
