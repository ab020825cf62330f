"""A byte-level transformer LM federated over the standard library's sources, each collaborator on its
own packages (see lm.py). Each round: evaluate the global model on this part's held-out files, then
`--steps` Adam steps on random windows of its training files.

    python -c "import fedsqueeze, torch, lm; torch.manual_seed(0); fedsqueeze.save_initial_model(lm.TinyLM(), 'model.safetensors')"
    aggregator serve --port 50051 --plan plan.json --initial-model model.safetensors &
    python train_federated.py --server localhost:50051 --part 0 --parts 2 &
    python train_federated.py --server localhost:50051 --part 1 --parts 2
"""

import argparse

import lm
import torch

import fedsqueeze


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="localhost:50051")
    parser.add_argument("--part", type=int, default=0, help="which run of packages is this machine's")
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="local Adam steps per round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="bytes per training window")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--eval-windows", type=int, default=32, help="held-out windows of the model's context"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)  # the initial model's seed: downlink.prior "initial" needs both sides to agree
    model = lm.TinyLM()
    torch.manual_seed(1 + args.part)  # this part's own batches
    data = lm.load_part(args.part, args.parts)
    x_test, y_test = lm.evaluation_windows(data.test, args.eval_windows, model.context)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"part {args.part}/{args.parts}: {len(data.packages)} packages ({data.packages[0]} .. {data.packages[-1]}), "
          f"{data.train_files} files ({len(data.train):,} bytes) to train on, {data.test_files} held out")  # fmt: skip

    held_out = lambda model: (lm.evaluate(model, x_test, y_test), y_test.numel())  # noqa: E731
    with fedsqueeze.join(args.server, model, evaluate=held_out, progress=False) as federation:
        for rnd in federation:  # each round: the global model is loaded into `model`
            loss = lm.train_steps(model, data.train, optimizer, args.steps, args.batch_size, args.length)
            rnd.submit(num_samples=args.steps * args.batch_size * args.length, metrics={"loss": loss})
            held = rnd.evaluation.metrics if rnd.evaluation else {}
            print(f"round {rnd.number}: train loss {loss:.3f}, global model's held-out {held}", flush=True)


if __name__ == "__main__":
    main()
