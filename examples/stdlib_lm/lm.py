"""A byte-level decoder-only transformer, and the text it learns: the Python standard library's own .py files.

Every Python installation ships that text (`sysconfig.get_paths()["stdlib"]`), so nothing is downloaded.
The files are grouped by top-level package or module (`asyncio`, `email`, `json.py`, ...); the groups,
sorted by name, are cut into `parts` contiguous runs of about equal size, one per collaborator, so each
collaborator learns a different corner of the library (non-IID). In each part every `HELD_OUT_EVERY`-th
file is held out for evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fedsqueeze import stdlib_text
from fedsqueeze.stdlib_text import HELD_OUT_EVERY, VOCAB, held_out, split_groups, stdlib_groups, stdlib_root

__all__ = ["HELD_OUT_EVERY", "VOCAB", "TinyLM", "split_groups", "stdlib_groups", "stdlib_root"]


class TinyLM(nn.Module):
    """GPT-style: token + learned position embeddings, pre-norm causal self-attention blocks, tied output head."""

    def __init__(self, d_model: int = 128, layers: int = 6, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(VOCAB, d_model)
        self.position = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: travels once
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, time) byte ids -> (batch, time, VOCAB) logits of the next byte."""
        t = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(t, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.head(self.norm(self.blocks(x, mask=causal, is_causal=True)))  # type: ignore[no-any-return]


@dataclass
class TextData:
    packages: list[str]
    train: torch.Tensor  # uint8 bytes of the training files, concatenated with FILE_SEPARATOR
    test: torch.Tensor  # the held-out files
    train_files: int
    test_files: int


def concatenate(files: list[Path]) -> torch.Tensor:
    return torch.from_numpy(stdlib_text.concatenate(files))


def load_part(part: int, parts: int, root: Path | None = None) -> TextData:
    """Collaborator `part`'s packages: its training files and its held-out files (every HELD_OUT_EVERY-th)."""
    groups = stdlib_groups(root)
    packages = split_groups(groups, parts)[part]
    files = [f for name in packages for f in groups[name]]
    train, test = held_out(files)
    return TextData(packages, concatenate(train), concatenate(test), len(train), len(test))


def windows(data: torch.Tensor, starts: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-byte targets) of shape (len(starts), length), from byte offsets `starts`."""
    index = starts[:, None] + torch.arange(length + 1)
    chunk = data[index].long()
    return chunk[:, :-1], chunk[:, 1:]


def random_starts(
    data: torch.Tensor, count: int, length: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    return torch.randint(0, len(data) - length - 1, (count,), generator=generator)


def train_steps(model: TinyLM, data: torch.Tensor, optimizer: torch.optim.Optimizer, steps: int,
                batch_size: int = 16, length: int = 64) -> float:  # fmt: skip
    """`steps` batches of random windows; the mean training loss (nats per byte)."""
    model.train()
    total = 0.0
    for _ in range(steps):
        x, y = windows(data, random_starts(data, batch_size, length), length)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        total += loss.item()
    return total / steps


def evaluation_windows(data: torch.Tensor, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same `count` windows every time (evenly spread over the held-out bytes)."""
    starts = torch.linspace(0, len(data) - length - 2, count).long()
    return windows(data, starts, length)


@torch.no_grad()
def evaluate(model: TinyLM, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Mean next-byte loss (nats) on (x, y), its perplexity and bits per byte."""
    model.eval()
    losses = [F.cross_entropy(model(xb).flatten(0, 1), yb.flatten(), reduction="sum")
              for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)]  # fmt: skip
    loss = float(torch.stack(losses).sum()) / y.numel()
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2)}
