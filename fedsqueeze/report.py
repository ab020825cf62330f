"""The run report: one JSON file, rewritten atomically after every round.

Schema (see README "Run report"):
{
  "plan": {...}, "plan_sha256": "...", "model": {"name", "parameters", "raw_bytes"},
  "uplink_chain": "...", "downlink_chain": "...",
  "rounds": [{"round", "accuracy", "loss", "participants", "dropped", "seconds",
              "bytes": {"up_raw", "up_wire", "down_raw", "down_wire", "decoder"}}],
  "summary": {"rounds", "final_accuracy", "best_accuracy", "up_raw", "up_wire", "down_raw",
              "down_wire", "decoder", "up_ratio", "down_ratio", "seconds"},
  "baseline_accuracy": null
}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BYTE_KEYS = ("up_raw", "up_wire", "down_raw", "down_wire", "decoder")


@dataclass
class RoundRecord:
    round: int
    # The global model after this round: from the aggregator's own evaluation when it has one, else the
    # collaborators' (`evaluation`, known one round later); None until known, or when nobody evaluates.
    accuracy: float | None
    loss: float | None
    participants: int
    dropped: int = 0
    seconds: float = 0.0
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    # ok | retried (quorum met after a retry) | failed: ... (quorum missed, model unchanged)
    status: str = "ok"
    attempts: int = 1  # 1 + retries of this round
    # Downloads handed out again to a member that already had this round's (a lost response, a
    # client that asks twice): not part of `bytes`, which counts each member's download once.
    resent: dict[str, int] = field(default_factory=lambda: {"messages": 0, "wire": 0})
    # what the strategy did beyond averaging (clipped, bounded, trimmed)
    aggregation: dict[str, Any] = field(default_factory=dict)
    # the collaborators' evaluation of the model after this round (weighted means; known a round later)
    evaluation: dict[str, float] = field(default_factory=dict)
    train: dict[str, float] = field(
        default_factory=dict
    )  # the participants' training metrics, weighted by samples

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "retried")

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "participants": self.participants,
            "dropped": self.dropped,
            "seconds": round(self.seconds, 4),
            "status": self.status,
            "attempts": self.attempts,
            "bytes": dict(self.bytes),
            "resent": dict(self.resent),
            "aggregation": dict(self.aggregation),
            "evaluation": dict(self.evaluation),
            "train": dict(self.train),
        }


def ratio(raw: int, wire: int) -> float:
    return raw / wire if wire else 0.0


@dataclass
class RunReport:
    path: Path | None
    header: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    prepass_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    # the final model's downloads to the collaborators that evaluate it, after the last round
    evaluation_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    baseline_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        totals = {k: self.prepass_bytes[k] + self.evaluation_bytes[k] for k in BYTE_KEYS}
        for r in self.rounds:
            for k in BYTE_KEYS:
                totals[k] += r.bytes[k]
        ok = [r for r in self.rounds if r.ok]
        scored = [r.accuracy for r in ok if r.accuracy is not None]
        return {
            "rounds": len(ok),
            "final_accuracy": ok[-1].accuracy if ok else None,
            "best_accuracy": max(scored, default=None),
            **totals,
            "up_ratio": ratio(totals["up_raw"], totals["up_wire"]),
            "down_ratio": ratio(totals["down_raw"], totals["down_wire"]),
            "total_ratio": ratio(
                totals["up_raw"] + totals["down_raw"],
                totals["up_wire"] + totals["down_wire"] + totals["decoder"],
            ),
            # eq. 4 as the run went: all uplink fp32 bytes over their wire bytes plus every decoder that travelled
            "savings_ratio": ratio(totals["up_raw"], totals["up_wire"] + totals["decoder"]),
            "seconds": round(sum(r.seconds for r in self.rounds), 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.header,
            "prepass_bytes": self.prepass_bytes,
            "evaluation_bytes": self.evaluation_bytes,
            "rounds": [r.to_json() for r in self.rounds],
            "summary": self.summary(),
            "baseline_accuracy": self.baseline_accuracy,
            **self.extra,
        }

    def write(self) -> None:
        if self.path is None:
            return
        write_json_atomic(self.path, self.to_json())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
