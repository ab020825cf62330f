"""Scale: up to 1,000 collaborators per round against one aggregator, over real gRPC.

    python -m bench.scale [--sizes 10,100,1000] [--rounds 3] [--max-uploads 8] [--out docs/benchmarks.md]

The aggregator is the production `AggregatorServer` (thread-pool gRPC server, `Federation`,
streaming FedAvg) in its own process (`python -m bench.scale serve`), which reports its peak RSS
(VmHWM) and its RSS once it is listening. The collaborators are asyncio clients (`grpc.aio`)
in a second process, one coroutine each: Join, then GetTask (long poll) and SubmitUpdate with a
recorded update, until DONE. The recorded update is one real local-training delta of the model,
encoded once with the uplink chain (a fresh CodecState); every client sends those bytes, so the
aggregator does the full work per update: protobuf parsing, fingerprint check, decoding with the
collaborator's CodecState, FedAvg accumulation. All clients are selected every round.

The downlink chain is a tiny stateless one (`topk:0.001 | quantize:2 | entropy`, encoded once per
round) so that the measurement is about uplink ingest; clients do not decode it.

Ingest: updates (and wire MB) accepted per second of round time. Round time: the aggregator's
round durations (from opening the round to the new global model, evaluation included).

The aggregator reads and decodes at most `--max-uploads` updates at once (`aggregator serve
--max-concurrent-uploads`); as many more wait for a slot, and the rest are refused with
RESOURCE_EXHAUSTED, which the clients retry with the collaborators' backoff (0.2 s doubling to 5 s,
jittered). Every update is eventually accepted ("dropped" counts those that were not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import md_code, replace_section

MODELS = {
    "66k": {"name": "mlp", "args": {"hidden": [384, 128]}},
    "572k": {"name": "mlp", "args": {"hidden": [1024, 512]}},
}
DOWN = "topk:0.001 | quantize:2 | entropy"


def make_plan(n: int, model: dict[str, Any], up: str, rounds: int) -> dict[str, Any]:
    return {
        "task": {"dataset": "mnist1d", "partition": "iid", "num_shards": 100},
        "model": model,
        "rounds": rounds,
        "seed": 0,
        "collaborators": {"min": n, "fraction": 1.0, "join_timeout_s": 600},
        "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "uplink": {"chain": up},
        "downlink": {"chain": DOWN},
        "round_timeout_s": 600,
    }


def status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process. (Not ru_maxrss: Linux keeps it across exec, so a child started by a big
    parent would report the parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- the aggregator process ------------------------------------------------------------------------------
def serve(plan_path: str, port: int, report: str, stats: str, workers: int, max_uploads: int) -> int:
    import logging

    from fedsqueeze.aggregator.server import AggregatorServer, limit_malloc_arenas
    from fedsqueeze.metrics import Metrics
    from fedsqueeze.plan import Plan

    logging.basicConfig(level=logging.WARNING)
    limit_malloc_arenas()  # as aggregator serve does
    plan = Plan.load(plan_path)
    server = AggregatorServer(plan, host="127.0.0.1", port=port, report_path=Path(report), max_workers=workers, linger_s=5.0,
                              metrics=Metrics("aggregator", per_collaborator=False), max_concurrent_uploads=max_uploads)  # fmt: skip
    server.start()
    base = status_kb("VmRSS")
    Path(stats + ".ready").write_text(str(server.port))
    server.wait()
    server.stop(1.0)
    sample = server.federation.metrics.registry.get_sample_value
    deferred = {
        o: sample("fedsqueeze_uploads_deferred_total", {"outcome": o}) or 0 for o in ("waited", "refused")
    }
    Path(stats).write_text(json.dumps({"rss_start_kb": base, "peak_rss_kb": status_kb("VmHWM"), "uploads_peak": server.servicer.uploads.peak,
                                       "deferred_waited": int(deferred["waited"]), "deferred_refused": int(deferred["refused"])}))  # fmt: skip
    return 0


# -- the clients -----------------------------------------------------------------------------------------
async def client_main(address: str, n: int, blob: bytes, samples: int) -> dict[str, Any]:
    import grpc

    from fedsqueeze.collaborator.transport import backoff_delays
    from fedsqueeze.v1 import fedsqueeze_pb2 as pb
    from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc

    opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    # A few channels (HTTP/2 connections) shared by the coroutines, as many clients behind a few NATs would be.
    channels = [grpc.aio.insecure_channel(address, options=opts) for _ in range(min(n, 8))]
    latencies: list[float] = []
    retries = [0]

    async def one(i: int) -> int:
        stub = pb_grpc.FederationStub(channels[i % len(channels)])
        r = await stub.Join(pb.JoinRequest(name=f"load-{i}", num_samples=samples), timeout=600)
        cred = pb.Credentials(collaborator_id=r.collaborator_id, token=r.token)
        sent = 0
        while True:
            t = await stub.GetTask(pb.GetTaskRequest(credentials=cred, wait_ms=1000), timeout=700)
            kind = pb.GetTaskResponse.Kind.Name(t.kind)
            if kind == "DONE":
                break
            if kind != "TRAIN":
                continue
            header = pb.UpdateHeader(
                credentials=cred, round=t.round, num_samples=samples, payload_size=len(blob)
            )

            def reqs(header: Any = header) -> Any:
                yield pb.SubmitUpdateRequest(header=header)
                for s in range(0, len(blob), 1 << 20):
                    yield pb.SubmitUpdateRequest(chunk=blob[s : s + (1 << 20)])

            t0 = time.perf_counter()
            delays = backoff_delays()
            while True:  # an aggregator with every upload slot taken answers RESOURCE_EXHAUSTED: retry, as collaborators do
                try:
                    await stub.SubmitUpdate(reqs(), timeout=700)
                    break
                except grpc.aio.AioRpcError as exc:
                    # grpc.aio reports a status that ends the stream before the client has sent it all as INTERNAL
                    # "Internal error from Core" when a write loses the race (grpc/grpc#36066); the sync client does not.
                    refused = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED or (
                        exc.code() == grpc.StatusCode.INTERNAL and exc.details() == "Internal error from Core"
                    )
                    if not refused:
                        raise
                    retries[0] += 1
                    await asyncio.sleep(next(delays))
            latencies.append(time.perf_counter() - t0)
            sent += 1
        return sent

    counts = await asyncio.gather(*(one(i) for i in range(n)))
    for ch in channels:
        await ch.close()
    return {"updates": sum(counts), "submit_latency": latencies, "retries": retries[0]}


def recorded_update(plan_json: dict[str, Any]) -> tuple[bytes, int]:
    """One real local-training delta, encoded with the plan's uplink chain, as a serialized Payload."""
    import torch

    from fedsqueeze.chains import LinkChains
    from fedsqueeze.codecs import CodecState
    from fedsqueeze.models import build_model, get_flat, model_layout
    from fedsqueeze.payload import Payload
    from fedsqueeze.plan import Plan
    from fedsqueeze.tasks import load_dataset, partition
    from fedsqueeze.training import train_local
    from fedsqueeze.wire import payload_to_bytes

    torch.set_num_threads(1)
    plan = Plan.from_json(plan_json)
    data = load_dataset("mnist1d", None, 0)
    idx = partition(data.partition_labels, 100, "iid", 0.5, 0)[0]
    model = build_model(plan.model.name, data.input_shape, data.num_classes, plan.model.args, 0)
    layout = model_layout(model)
    w0 = get_flat(model)
    train_local(
        model, data.x_train[idx], data.y_train[idx], epochs=1, batch_size=32, lr=0.05, momentum=0.9, seed=1
    )
    chain = LinkChains.from_plan(plan).uplink
    enc = chain.encode(get_flat(model) - w0, layout, CodecState())
    return payload_to_bytes(Payload(data=enc.data, fingerprint=chain.fingerprint(layout))), len(idx)


def run_case(n: int, model_key: str, up: str, rounds: int, workers: int, max_uploads: int) -> dict[str, Any]:
    plan = make_plan(n, MODELS[model_key], up, rounds)
    blob, samples = recorded_update(plan)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "plan.json").write_text(json.dumps(plan))
        stats, report = str(tmp / "stats.json"), tmp / "report.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        srv = subprocess.Popen([sys.executable, "-m", "bench.scale", "serve", str(tmp / "plan.json"), "0", str(report), stats, str(workers), str(max_uploads)],
                               stdout=open(tmp / "srv.log", "w"), stderr=subprocess.STDOUT, env=env)  # fmt: skip
        try:
            deadline = time.time() + 120
            while not Path(stats + ".ready").exists():
                if srv.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start: {(tmp / 'srv.log').read_text()[-2000:]}")
                time.sleep(0.1)
            port = int(Path(stats + ".ready").read_text())
            t0 = time.perf_counter()
            res = asyncio.run(client_main(f"127.0.0.1:{port}", n, blob, samples))
            wall = time.perf_counter() - t0
            srv.wait(timeout=120)
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
        st = json.loads(Path(stats).read_text())
        rep = json.loads(report.read_text())
    secs = [r["seconds"] for r in rep["rounds"]]
    updates = sum(r["participants"] for r in rep["rounds"])
    wire = sum(r["bytes"]["up_wire"] for r in rep["rounds"])
    lat = sorted(res["submit_latency"])
    return {
        "n": n, "model": model_key, "parameters": rep["model"]["parameters"], "up": up, "rounds": len(secs), "updates": updates,
        "update_bytes": len(blob), "ingest_ups": updates / sum(secs), "ingest_mbs": wire / 1e6 / sum(secs),
        "p50": statistics.median(secs), "p99": float(sorted(secs)[min(len(secs) - 1, int(round(0.99 * (len(secs) - 1))))]),
        "rss_start_mb": st["rss_start_kb"] / 1024, "peak_rss_mb": st["peak_rss_kb"] / 1024, "wall": wall,
        "submit_p50_ms": 1000 * lat[len(lat) // 2] if lat else 0.0, "submit_p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else 0.0,
        "dropped": sum(r["dropped"] for r in rep["rounds"]), "uploads_peak": st["uploads_peak"], "waited": st["deferred_waited"],
        "refused": st["deferred_refused"], "retries": res["retries"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1], int(argv[2]), argv[3], argv[4], int(argv[5]), int(argv[6]))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--models", default="66k,572k")
    parser.add_argument(
        "--uplinks", default="identity,ef | topk:0.01 | quantize:4 | entropy", help="comma-separated chains"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers",
        type=int,
        default=32,
        help="aggregator gRPC worker threads (aggregator serve's default: 32)",
    )
    parser.add_argument(
        "--max-uploads",
        type=int,
        default=8,
        help="uploads the aggregator reads and decodes at once (aggregator serve's default: 8)",
    )
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for up in [u.strip() for u in args.uplinks.split(",")]:
            for n in [int(x) for x in args.sizes.split(",")]:
                row = run_case(n, model, up, args.rounds, args.workers, args.max_uploads)
                rows.append(row)
                print(f"{model:>5} {up:<40} n={n:<5} {row['ingest_ups']:8.1f} upd/s {row['ingest_mbs']:8.2f} MB/s  round p50 {row['p50']:.2f} s "
                      f"p99 {row['p99']:.2f} s  peak RSS {row['peak_rss_mb']:.0f} MB (start {row['rss_start_mb']:.0f})  dropped {row['dropped']}  "
                      f"uploads at once {row['uploads_peak']}, waited {row['waited']}, refused {row['refused']}", flush=True)  # fmt: skip
    lines = [
        f"Command: `python -m bench.scale {' '.join(argv)}`. One aggregator process (`AggregatorServer`, {args.workers} gRPC worker "
        f"threads, streaming FedAvg) and one client process of `grpc.aio` coroutines (one per collaborator, over 8 HTTP/2 connections) "
        f"sending a recorded real update, all collaborators selected every round, {args.rounds} rounds, loopback, this 2-core machine "
        f"(shared with the client process). Downlink `{DOWN}` (tiny, stateless). Peak RSS: the aggregator's VmHWM; "
        '"at start": its RSS once listening (Python, torch, the data set, the model). Round time p50/p99 over the rounds '
        f"(with {args.rounds} rounds, p99 is the slowest round). Submit RPC: from the first attempt to acceptance, waiting for a "
        "slot and retries included.",
        "",
        f"**Memory bound.** The aggregator reads and decodes at most {args.max_uploads} uploads at once (`aggregator serve "
        '--max-concurrent-uploads`, default 8); the other uploads wait for a slot with their streams unread ("waited"), and one '
        'that waits 30 s is refused with RESOURCE_EXHAUSTED and retried ("refused"). "Uploads at once": the most in flight '
        "together. Three measures keep the peak roughly flat from 10 to 1,000 collaborators; each was measured on its own with "
        "1,000 uncompressed 572k updates (2 rounds): (1) HTTP/2 BDP probing off and a 16 KiB initial stream window, so gRPC "
        "buffers 16 KiB of a waiting upload instead of growing every stream's window towards the whole 2.3 MB (peak 843 MB with "
        "this alone); (2) the slots (a 4-slot semaphore alone, BDP probing on, still peaked at 2,481 MB: gRPC had already "
        "buffered the waiting streams; with (1), 667 MB); (3) glibc's malloc arenas capped at 2 (about 100 MB less: freed update "
        "buffers no longer stay resident in one arena per worker thread). `grpc.server(maximum_concurrent_rpcs=...)` was not used: "
        "it counts every RPC, GetTask long polls and health checks included. Refusing at once instead of waiting cut ingest at "
        "1,000 collaborators to 12 updates/s (the retries queued behind the long polls for worker threads). Before the bound "
        "(commit f3fc22d, this benchmark and machine), 572k `identity` peaked at 531 / 865 / 2,670 MB for 10 / 100 / 1,000 "
        "collaborators, ingest 56 / 89 / 81 updates/s. Ingest at 1,000 collaborators varies up to 4x between runs on this "
        "shared machine: seven runs of the 66k compressed row gave 107 to 436 updates/s, with 8 slots and with 32 alike.",
        "",
        "| model | uplink | collaborators / round | update bytes | ingest updates/s | ingest MB/s | round p50 | round p99 | submit RPC p50 / p99 | peak RSS | at start | peak − start | uploads at once | waited / refused | dropped |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| mlp {r['parameters']:,} | {md_code(r['up'])} | {r['n']:,} | {r['update_bytes']:,} | {r['ingest_ups']:.0f} | {r['ingest_mbs']:.1f} | "
            f"{r['p50']:.2f} s | {r['p99']:.2f} s | {r['submit_p50_ms']:.0f} / {r['submit_p99_ms']:.0f} ms | {r['peak_rss_mb']:.0f} MB | "
            f"{r['rss_start_mb']:.0f} MB | {r['peak_rss_mb'] - r['rss_start_mb']:.0f} MB | {r['uploads_peak']} | "
            f"{r['waited']:,} / {r['refused']:,} | {r['dropped']} |"
        )
    replace_section(
        Path(args.out), "scale", "Scale: 10 / 100 / 1,000 collaborators per round over gRPC", lines
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
