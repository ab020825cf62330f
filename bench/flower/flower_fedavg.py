"""The peer: Flower's FedAvg (or FedAdam) on the same protocol, counting the bytes of Flower's own serialisation.

Runs in Flower's own venv (`make flower-venv`: flwr 1.41, protobuf < 7, torch 2.13 CPU), never in
fedsqueeze's. `bench.fl_bench` exports the task (data, shards, per-round selection, the initial model,
training hyper-parameters) to an .npz and a torch file; this script replays it:

- every round the server's global parameters are `flwr.common.ndarrays_to_parameters(ndarrays)`
  (NumPy .npy bytes per tensor) and sent to each selected client: downlink bytes are the sizes of
  those `Parameters`' tensors, and, separately, of the legacy protobuf `Parameters` message
  (`flwr.common.serde.parameters_to_proto(...).ByteSize()`);
- each client decodes them with `parameters_to_ndarrays`, trains with fedsqueeze's own
  `train_local` (loaded from fedsqueeze/training.py by path: numpy and torch only) with the same
  seed formula, and returns `ndarrays_to_parameters(local weights)` in a `FitRes`;
- the server aggregates with `flwr.server.strategy.FedAvg.aggregate_fit` (weighted by num_examples), or,
  when the task's meta names a server optimizer `adam`, with `flwr.server.strategy.FedAdam.aggregate_fit`
  (eta, beta_1, beta_2 and tau from that entry; Flower's FedAdam adds Adam's bias correction).

    bench/flower/.venv/bin/python bench/flower/flower_fedavg.py TASK.npz MODEL.pt OUT.json
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _training_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fs_training", ROOT / "fedsqueeze" / "training.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> int:
    import flwr
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays, serde
    from flwr.server.strategy import FedAdam, FedAvg

    task_path, model_path, out_path = argv
    training = _training_module()
    torch.set_num_threads(1)
    t = np.load(task_path, allow_pickle=False)
    meta = json.loads(str(t["meta"]))
    model = torch.jit.load(model_path)  # TorchScript archive written by bench.fl_bench: no unpickling
    x, y, x_te, y_te = t["x_train"], t["y_train"], t["x_test"], t["y_test"]
    offsets = t["shard_offsets"]
    shard_idx = t["shard_indices"]
    shards = [shard_idx[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    selection = t["selection"]  # rounds x k, shard indices

    def get() -> list[np.ndarray]:
        return [p.detach().numpy().astype(np.float32, copy=True) for p in model.parameters()]

    def put(arrays: list[np.ndarray]) -> None:
        with torch.no_grad():
            for p, a in zip(model.parameters(), arrays, strict=True):
                p.copy_(torch.from_numpy(np.ascontiguousarray(a)))

    params = ndarrays_to_parameters(get())
    opt = meta.get("server_optimizer")
    common = {"fraction_fit": 1.0, "min_fit_clients": 1, "min_available_clients": 1, "accept_failures": False}
    if opt is None:
        strategy: FedAvg = FedAvg(**common)
    elif opt["name"] == "adam":
        # bench.fl_bench sends every field, the plan's defaults filled in, so no default is repeated here.
        strategy = FedAdam(
            **common,
            initial_parameters=params,
            eta=opt["lr"],
            beta_1=opt["beta1"],
            beta_2=opt["beta2"],
            tau=opt["tau"],
        )
    else:
        raise SystemExit(f"server optimizer {opt['name']!r}: only adam has a Flower peer here")
    rounds = []
    t0 = time.perf_counter()
    for rnd, chosen in enumerate(selection, start=1):
        down_tensor = sum(len(b) for b in params.tensors)
        down_proto = serde.parameters_to_proto(params).ByteSize()
        global_arrays = parameters_to_ndarrays(params)
        results = []
        up_tensor = up_proto = 0
        for shard in chosen:
            put(global_arrays)
            idx = shards[int(shard)]
            training.train_local(model, x[idx], y[idx], epochs=meta["local_epochs"], batch_size=meta["batch_size"], lr=meta["lr"],
                                 momentum=meta["momentum"], weight_decay=meta["weight_decay"], steps=meta.get("local_steps", 0), optimizer=meta.get("optimizer", "sgd"),
                                 seed=meta["seed"] * 100_003 + rnd * 1009 + int(shard))  # fmt: skip
            fit_params = ndarrays_to_parameters(get())
            up_tensor += sum(len(b) for b in fit_params.tensors)
            up_proto += serde.parameters_to_proto(fit_params).ByteSize()
            results.append(
                (
                    None,
                    FitRes(
                        status=Status(code=Code.OK, message=""),
                        parameters=fit_params,
                        num_examples=len(idx),
                        metrics={},
                    ),
                )
            )
        new_params, _ = strategy.aggregate_fit(rnd, results, [])  # type: ignore[arg-type]
        assert new_params is not None
        params = new_params
        put(parameters_to_ndarrays(params))
        loss, acc = training.evaluate(model, x_te, y_te)
        k = len(chosen)
        rounds.append({"round": rnd, "accuracy": acc, "loss": loss, "up_bytes": up_tensor, "down_bytes": down_tensor * k,
                       "up_proto": up_proto, "down_proto": down_proto * k})  # fmt: skip
    out = {"flwr": flwr.__version__, "strategy": type(strategy).__name__, "seconds": time.perf_counter() - t0, "rounds": rounds,
           "message_bytes": down_tensor, "message_proto_bytes": down_proto}  # fmt: skip
    Path(out_path).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
