"""Human-readable output shared by the CLIs: byte sizes, the per-round table, one-line errors."""

from __future__ import annotations

import logging
import sys
from typing import Any, NoReturn

from fedsqueeze.report import RoundRecord, ratio


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


ROUND_HEADER = (
    f"{'round':>5}  {'acc':>6}  {'loss':>6}  {'n':>3}  {'up raw':>10}  {'up wire':>10}  {'up x':>8}  "
    f"{'down raw':>10}  {'down wire':>10}  {'down x':>7}  {'secs':>5}"
)


def round_row(r: RoundRecord) -> str:
    b = r.bytes
    acc = f"{r.accuracy:>6.2%}" if r.accuracy is not None else f"{'-':>6}"
    loss = f"{r.loss:>6.3f}" if r.loss is not None else f"{'-':>6}"
    row = (
        f"{r.round:>5}  {acc}  {loss}  {r.participants:>3}  {human_bytes(b['up_raw']):>10}  "
        f"{human_bytes(b['up_wire']):>10}  {ratio(b['up_raw'], b['up_wire']):>7.1f}x  {human_bytes(b['down_raw']):>10}  "
        f"{human_bytes(b['down_wire']):>10}  {ratio(b['down_raw'], b['down_wire']):>6.1f}x  {r.seconds:>5.1f}"
    )
    return row if r.status == "ok" else f"{row}  {r.status}"


def summary_lines(summary: dict[str, Any]) -> list[str]:
    s = summary
    acc = s.get("final_accuracy")
    lines = [
        f"rounds completed : {s['rounds']}",
        f"final accuracy   : {acc:.2%}" if acc is not None else "final accuracy   : n/a",
        f"uplink           : {human_bytes(s['up_raw'])} raw -> {human_bytes(s['up_wire'])} on the wire ({s['up_ratio']:.1f}x)",
        f"downlink         : {human_bytes(s['down_raw'])} raw -> {human_bytes(s['down_wire'])} on the wire ({s['down_ratio']:.1f}x)",
    ]
    if s.get("decoder"):
        lines.append(f"decoder uploads  : {human_bytes(s['decoder'])}")
        lines.append(
            f"savings ratio    : {s['savings_ratio']:.1f} (eq. 4 as run: uplink fp32 / (uplink wire + decoder uploads))"
        )
    lines.append(
        f"total            : {s['total_ratio']:.1f}x less traffic than fp32 (decoder uploads included)"
    )
    return lines


def die(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and a non-zero exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def setup_logging(verbose: bool) -> None:
    """The command-line tools' logging: warnings (debug with -v) on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
