"""A small ResNet (ResNet-8: 16-32-64 channels, BatchNorm) on CIFAR-10, federated with fedsqueeze.

Each collaborator reads its slice of the training batches of a CIFAR-10 folder in the published binary
layout (`cifar-10-batches-bin/data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`), trains with
its own optimizer and evaluates each global model on its slice of `test_batch.bin`, so the federated
accuracy is that over the whole test set. Nothing is downloaded: bring the folder.

    python -c "import fedsqueeze, train_federated as t; fedsqueeze.save_initial_model(t.ResNet(), 'model.safetensors')"
    aggregator serve --port 50051 --plan plan.json --initial-model model.safetensors &
    python train_federated.py --data DIR --server localhost:50051 --part 0 --parts 2 &
    python train_federated.py --data DIR --server localhost:50051 --part 1 --parts 2
"""

import argparse
import itertools
import os
from collections.abc import Iterator

import torch
from torch import nn

import fedsqueeze
from fedsqueeze.tasks import CIFAR10_TEST_BATCH, CIFAR10_TRAIN_BATCHES, cifar10_bin_dir, read_cifar10_bins

# Per-channel mean and standard deviation of CIFAR-10's training images.
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm; a 1x1 convolution on the shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """He et al.'s CIFAR ResNet with `blocks` blocks per stage: 1 is ResNet-8, 3 is ResNet-20."""

    def __init__(
        self, blocks: int = 1, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def load_data(root: str, part: int, parts: int, max_samples: int, max_test: int) -> tuple[torch.Tensor, ...]:
    """Slice `part` of `parts` (every parts-th record) of the training batches and of test_batch.bin, as uint8."""
    folder = cifar10_bin_dir(root)
    x, y = read_cifar10_bins(folder, CIFAR10_TRAIN_BATCHES)
    x_test, y_test = read_cifar10_bins(folder, (CIFAR10_TEST_BATCH,))
    train = slice(part, (max_samples * parts if max_samples else None), parts)
    test = slice(part, (max_test * parts if max_test else None), parts)
    return tuple(torch.from_numpy(a.copy()) for a in (x[train], y[train], x_test[test], y_test[test]))


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = MEAN.to(images.device), STD.to(images.device)
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crops of the images padded by `pad` (zeros), and random horizontal flips, for a whole batch."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n, 1), device=images.device) for _ in range(2))
    rows = (dy + torch.arange(h, device=images.device))[:, :, None]  # (n, h, 1)
    cols = (dx + torch.arange(w, device=images.device))[:, None, :]  # (n, 1, w)
    crops = padded[torch.arange(n, device=images.device)[:, None, None], :, rows, cols]  # (n, h, w, c)
    crops = crops.permute(0, 3, 1, 2)
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def batches(n: int, batch_size: int, epochs: int, steps: int, device: str) -> Iterator[torch.Tensor]:
    """Indices of each batch: `epochs` shuffled passes over n samples, or `steps` batches if steps > 0."""
    step = 0
    for epoch in itertools.count():
        if not steps and epoch == epochs:
            return
        for batch in torch.randperm(n, device=device).split(batch_size):
            if step == steps > 0:
                return
            step += 1
            yield batch


def train_round(model, x, y, optimizer, loss_fn, args) -> tuple[float, int]:
    """One round's local training; (mean loss, samples seen)."""
    model.train()
    total, seen = 0.0, 0
    for batch in batches(len(y), args.batch_size, args.epochs, args.steps, args.device):
        images = normalise(x[batch])
        if not args.no_augment:
            images = augment(images)
        optimizer.zero_grad()
        loss = loss_fn(model(images), y[batch])
        loss.backward()
        optimizer.step()
        total, seen = total + loss.item() * len(batch), seen + len(batch)
    return total / seen, seen


def evaluate(model, x, y, loss_fn, batch_size: int = 1000) -> dict[str, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            out = model(normalise(x[start : start + batch_size]))
            loss += float(loss_fn(out, y[start : start + batch_size])) * len(out)
            correct += int((out.argmax(1) == y[start : start + batch_size]).sum())
    return {"loss": loss / len(y), "accuracy": correct / len(y)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="localhost:50051")
    parser.add_argument("--data", required=True, help="CIFAR-10 folder (cifar-10-batches-bin or its parent)")
    parser.add_argument("--part", type=int, default=0, help="which slice of the data is this machine's")
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument(
        "--blocks", type=int, default=1, help="blocks per stage (save the initial model alike)"
    )
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument(
        "--lr", type=float, default=None, help="default: 0.05 (SGD, momentum 0.9) or 1e-3 (Adam)"
    )
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--steps", type=int, default=0, help="local batches per round instead of epochs")
    parser.add_argument("--max-samples", type=int, default=0, help="train on at most this many of the slice")
    parser.add_argument("--max-test", type=int, default=0, help="evaluate on at most this many of the slice")
    parser.add_argument("--no-augment", action="store_true", help="no random crops and flips")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("FEDSQUEEZE_THREADS", 0)))
    args = parser.parse_args()
    if not 0 <= args.part < args.parts:
        parser.error(f"--part must be in 0..{args.parts - 1}")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.part)
    x, y, x_test, y_test = (t.to(args.device) for t in load_data(args.data, args.part, args.parts,
                                                                 args.max_samples, args.max_test))  # fmt: skip
    model = ResNet(args.blocks).to(args.device)
    loss_fn = nn.CrossEntropyLoss()
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr or 0.05, momentum=0.9, weight_decay=args.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr or 1e-3, weight_decay=args.weight_decay)

    held_out = lambda model: (evaluate(model, x_test, y_test, loss_fn), len(y_test))  # noqa: E731
    with fedsqueeze.join(args.server, model, evaluate=held_out) as federation:
        for rnd in federation:  # each round: the global model is loaded into `model`
            loss, seen = train_round(model, x, y, optimizer, loss_fn, args)
            rnd.submit(num_samples=len(y), metrics={"loss": loss})
            before = rnd.evaluation.metrics if rnd.evaluation else {}
            print(
                f"round {rnd.number}: global model {dict(before)}, then {seen} samples, train loss {loss:.3f}"
            )


if __name__ == "__main__":
    main()
