"""fedsqueeze's codec chains inside Flower apps (`pip install "fedsqueeze[flower]"`).

Client (`client_app.py`)::

    from fedsqueeze.flower import compression_mod
    app = ClientApp(mods=[compression_mod])

Server (`server_app.py`)::

    from fedsqueeze.flower import CompressedStrategy
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=0.0))   # fedsqueeze's default chains
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=20)

The strategy wrapper codes each message's ArrayRecord with the downlink chain and decodes each
train reply with the uplink chain; the mod does the opposite on the node, keeping its codec states
in the node's context. The compressed bytes travel as one uint8 array in an ArrayRecord, so
Flower's transport and size meters see the compressed size.
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without Flower
    raise ImportError('fedsqueeze.flower needs Flower: pip install "fedsqueeze[flower]"') from exc

from .mod import ClientLink, compression_mod, make_compression_mod
from .records import FlowerCodecError, RecordLayout
from .strategy import CompressedStrategy, LinkBytes, RoundBytes, ServerLink

__all__ = [
    "ClientLink",
    "CompressedStrategy",
    "FlowerCodecError",
    "LinkBytes",
    "RecordLayout",
    "RoundBytes",
    "ServerLink",
    "compression_mod",
    "make_compression_mod",
]
