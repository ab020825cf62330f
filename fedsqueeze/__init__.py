"""fedsqueeze: federated learning with compressed client-server traffic."""

__version__ = "0.1.0"
