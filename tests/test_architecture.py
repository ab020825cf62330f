"""The layering the README describes, checked on the source: who may import whom.

    codecs  <-  core (fedsqueeze/)  <-  aggregator, collaborator  <-  simulation  <-  the `fedsqueeze` CLI

The codec library needs nothing of fedsqueeze; the shared core needs neither side; the two sides
never import each other; and only the transport modules touch gRPC or protobuf, so domain code
(the Federation, the round step, the plan) works with domain objects only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"codecs": "fedsqueeze.codecs", "fedsqueeze": "fedsqueeze", "aggregator": "fedsqueeze.aggregator",
           "collaborator": "fedsqueeze.collaborator", "simulation": "fedsqueeze.simulation"}  # fmt: skip
# The modules at the gRPC edge: protobuf conversions and status codes, the servicer, the server, the client.
TRANSPORT = {"fedsqueeze/wire.py", "fedsqueeze/tls.py", "fedsqueeze/cli.py", "aggregator/servicer.py", "aggregator/server.py",
             "collaborator/transport.py"}  # fmt: skip


def imports(path: Path, package: str) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved against its package)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                found.add(node.module)
    return found


def sources(folder: str) -> list[tuple[str, set[str]]]:
    return [(f"{folder}/{p.name}", imports(p, FOLDERS[folder])) for p in sorted((ROOT / folder).glob("*.py"))]


def offenders(folder: str, forbidden: tuple[str, ...], exempt: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
    return [f"{name} imports {m}" for name, mods in sources(folder) if name not in exempt for m in sorted(mods)
            if any(m == f or m.startswith(f + ".") for f in forbidden)]  # fmt: skip


@pytest.mark.parametrize(
    "folder, forbidden, exempt",
    [
        ("codecs", ("fedsqueeze.aggregator", "fedsqueeze.collaborator", "fedsqueeze.simulation", "fedsqueeze.plan",
                    "fedsqueeze.wire", "fedsqueeze.payload", "fedsqueeze.models", "fedsqueeze.tasks", "torch", "grpc"), set()),
        # cli.py is the top of the stack; __init__.py the public facade (fedsqueeze.join, loaded on first use)
        ("fedsqueeze", ("fedsqueeze.aggregator", "fedsqueeze.collaborator", "fedsqueeze.simulation"), {"fedsqueeze/cli.py", "fedsqueeze/__init__.py"}),
        ("aggregator", ("fedsqueeze.collaborator", "fedsqueeze.simulation"), set()),
        ("collaborator", ("fedsqueeze.aggregator", "fedsqueeze.simulation"), set()),
    ],
)  # fmt: skip
def test_layers_import_only_downwards(folder: str, forbidden: tuple[str, ...], exempt: set[str]) -> None:
    assert offenders(folder, forbidden, exempt) == []


def test_only_the_transport_touches_grpc_and_protobuf() -> None:
    edge = ("grpc", "grpc_health", "google.protobuf", "fedsqueeze.v1")
    found = [f"{name} imports {m}" for folder in FOLDERS for name, mods in sources(folder) if name not in TRANSPORT
             for m in sorted(mods) if any(m == e or m.startswith(e + ".") for e in edge)]  # fmt: skip
    assert found == []


def test_the_aggregators_domain_never_imports_torch() -> None:
    """The Federation works on flat vectors and a layout; only the built-in evaluation loads torch (lazily)."""
    assert (
        offenders(
            "aggregator", ("torch", "fedsqueeze.models", "fedsqueeze.training"), {"aggregator/evaluation.py"}
        )
        == []
    )
    evaluation = ROOT / "aggregator" / "evaluation.py"
    top_level = [
        n for n in ast.parse(evaluation.read_text()).body if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    assert not [
        n for n in top_level if "torch" in ast.dump(n) or "models" in ast.dump(n) or "training" in ast.dump(n)
    ]


def test_the_training_module_loads_by_path_without_fedsqueeze() -> None:
    """bench/flower's peer runs in Flower's own venv and loads fedsqueeze/training.py by path: at run time
    it may need numpy and torch only (type-only imports stay under TYPE_CHECKING)."""
    import site
    import subprocess
    import sys

    script = (
        "import sys, importlib.util\n"
        f"sys.path[:0] = {site.getsitepackages()!r}\n"  # numpy and torch, but -S skips the editable install's .pth
        f"spec = importlib.util.spec_from_file_location('fs_training', {str(ROOT / 'fedsqueeze' / 'training.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "import numpy as np, torch\n"
        "model = torch.nn.Linear(4, 2)\n"
        "x = np.random.default_rng(0).normal(size=(16, 4)).astype('float32'); y = (x[:, 0] > 0).astype('int64')\n"
        "mod.train_local(model, x, y, epochs=1, batch_size=8, lr=0.1, momentum=0.0, seed=0)\n"
        "assert 'fedsqueeze' not in sys.modules, sorted(m for m in sys.modules if m.startswith('fedsqueeze'))\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
