"""fedsqueeze: federated learning with compressed client-server traffic.

The collaborator API, for your own model and training loop (collaborator/api.py):

    import fedsqueeze

    with fedsqueeze.join("aggregator:50051", model, evaluate=evaluate) as federation:
        for rnd in federation:
            loss = train_one_epoch(model, loader, optimizer)
            rnd.submit(num_samples=len(dataset), metrics={"loss": loss})

and `fedsqueeze.save_initial_model(model, "model.safetensors")` for `aggregator serve --initial-model`.
These load on first use, so `import fedsqueeze` alone imports neither torch nor gRPC.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["join", "save_initial_model"]


def __getattr__(name: str) -> Any:
    if name == "join":
        from fedsqueeze.collaborator.api import join

        return join
    if name == "save_initial_model":
        from fedsqueeze.model_file import save_initial_model

        return save_initial_model
    raise AttributeError(f"module 'fedsqueeze' has no attribute {name!r}")
