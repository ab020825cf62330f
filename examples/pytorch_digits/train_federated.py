"""A small CNN on scikit-learn's 8x8 digits. `train.py` is an ordinary PyTorch script; `train_federated.py`
is the same script federated with fedsqueeze (the README shows the diff), each machine on its own slice.

    python train.py --epochs 10
    python train_federated.py --server localhost:50051 --part 0 --parts 2
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import fedsqueeze


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def load_data(part: int, parts: int) -> tuple[torch.Tensor, ...]:
    """Slice `part` of `parts` of the digits, 80% to train on and 20% held out."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    mine = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[part::parts]
    cut = int(0.8 * len(mine))
    return x[mine[:cut]], y[mine[:cut]], x[mine[cut:]], y[mine[cut:]]


def train_one_epoch(model, x, y, optimizer, loss_fn, batch_size=32) -> float:
    model.train()
    order = torch.randperm(len(y))
    total = 0.0
    for start in range(0, len(y), batch_size):
        batch = order[start : start + batch_size]
        optimizer.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        total += float(loss) * len(batch)
    return total / len(y)


def evaluate(model, x, y, loss_fn) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return {"loss": float(loss_fn(out, y)), "accuracy": float((out.argmax(1) == y).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="localhost:50051")
    parser.add_argument("--part", type=int, default=0, help="which slice of the data is this machine's")
    parser.add_argument("--parts", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y, x_test, y_test = load_data(args.part, args.parts)
    model = Net()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    held_out = lambda model: (evaluate(model, x_test, y_test, loss_fn), len(y_test))  # noqa: E731
    with fedsqueeze.join(args.server, model, evaluate=held_out) as federation:
        for rnd in federation:  # each round: the global model is loaded into `model`
            loss = train_one_epoch(model, x, y, optimizer, loss_fn)
            rnd.submit(num_samples=len(y), metrics={"loss": loss})


if __name__ == "__main__":
    main()
