"""Savings ratio and break-even of autoencoder compression (seed 001 section 5.3, eq. 4-6, Figs. 10-11).

    SR = O * R * C / (S * R * C + Cost)                          (eq. 4)
    Cost = DecoderSize * decoders = AutoencoderSize / 2 * decoders  (eq. 5, 6)

O: the original (uncompressed) update size, S: the compressed size per message, R: rounds,
C: collaborators; decoders = 1 in the shared mode (case a), C with one decoder per collaborator
(case b). SR > 1 means the AE saves traffic once its decoders are paid for.

Break-even (SR = 1): R * C * (O - S) = Cost, so
- case (b), per collaborator: R* = D / (O - S) rounds, whatever the number of collaborators;
- case (a), shared: R * C = D / (O - S): C* = D / (R (O - S)) collaborators for R rounds.

Eq. 5 counts each decoder once, as the paper does. In fedsqueeze's shared mode the aggregator
also sends the shared decoder to the C - 1 other collaborators (downlink, `prepass_bytes`);
`with_downloads=True` adds that cost as well.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sizes:
    original: float  # O: bytes of one uncompressed update (fp32)
    compressed: float  # S: wire bytes of one compressed update
    decoder: float  # D: bytes of one decoder (half the autoencoder, eq. 6)


def decoders(mode: str, collaborators: int) -> int:
    if mode not in ("shared", "per_collaborator"):
        raise ValueError(f"unknown decoder mode {mode!r}")
    return 1 if mode == "shared" else collaborators


def cost(s: Sizes, mode: str, collaborators: int, with_downloads: bool = False) -> float:
    """Eq. 5: decoder bytes times the number of decoders (plus shared-decoder downloads if asked)."""
    c = s.decoder * decoders(mode, collaborators)
    if with_downloads and mode == "shared":
        c += s.decoder * max(collaborators - 1, 0)
    return c


def savings_ratio(
    s: Sizes, rounds: int, collaborators: int, mode: str, with_downloads: bool = False
) -> float:
    """Eq. 4."""
    num = s.original * rounds * collaborators
    den = s.compressed * rounds * collaborators + cost(s, mode, collaborators, with_downloads)
    return num / den if den > 0 else math.inf


def break_even_rounds(s: Sizes, collaborators: int, mode: str, with_downloads: bool = False) -> int | None:
    """The fewest rounds with SR >= 1 for this many collaborators (None if compression never pays)."""
    gain = s.original - s.compressed
    if gain <= 0:
        return None
    return max(1, math.ceil(cost(s, mode, collaborators, with_downloads) / (collaborators * gain) - 1e-12))


def break_even_collaborators(s: Sizes, rounds: int, mode: str, with_downloads: bool = False) -> int | None:
    """The fewest collaborators with SR >= 1 for this many rounds (None if more never helps: case b)."""
    gain = s.original - s.compressed
    if gain <= 0:
        return None
    if mode == "per_collaborator" or with_downloads:
        # Cost grows with C as fast as the savings do: SR does not depend on C (beyond C = 1).
        return 1 if savings_ratio(s, rounds, 1, mode, with_downloads) >= 1 else None
    return max(1, math.ceil(s.decoder / (rounds * gain) - 1e-12))


# -- sizes from a run report ----------------------------------------------------------------------
def sizes_from_report(report: dict[str, Any]) -> tuple[Sizes, dict[str, Any]]:
    """O from the model, S = mean wire bytes of an uplink message, D = bytes of one uploaded decoder."""
    original = float(report["model"]["raw_bytes"])
    messages = sum(int(r.get("participants", 0)) for r in report.get("rounds", []))
    up_wire = sum(int(r["bytes"]["up_wire"]) for r in report.get("rounds", []))
    if messages == 0:
        raise ValueError("the report has no accepted uplink message")
    pre = report.get("prepass") or {}
    uploads = sum((pre.get("decoders") or {}).values())
    decoder_total = float(report.get("prepass_bytes", {}).get("decoder", 0)) + sum(
        int(r["bytes"].get("decoder", 0)) for r in report.get("rounds", [])
    )
    decoder = decoder_total / uploads if uploads else float(pre.get("decoder_bytes_each", 0))
    plan = report.get("plan", {})
    context = {
        "collaborators": int(plan.get("collaborators", {}).get("min", 1)),
        "rounds": len(report.get("rounds", [])),
        "mode": plan.get("prepass", {}).get("decoder", "per_collaborator"),
        "messages": messages,
        "decoder_uploads": uploads,
    }
    return Sizes(original, up_wire / messages, decoder), context


def as_run(report: dict[str, Any]) -> dict[str, Any]:
    """Eq. 4 for the run as it happened: every accepted uplink message at fp32 over its wire bytes
    plus every decoder byte that travelled (first uploads and re-uploads, in the prepass or during rounds)."""
    rounds = report.get("rounds", [])
    up_raw = sum(int(r["bytes"]["up_raw"]) for r in rounds)
    up_wire = sum(int(r["bytes"]["up_wire"]) for r in rounds)
    pre_decoder = int(report.get("prepass_bytes", {}).get("decoder", 0))
    round_decoder = sum(int(r["bytes"].get("decoder", 0)) for r in rounds)
    decoder = pre_decoder + round_decoder
    uploads = sum(((report.get("prepass") or {}).get("decoders") or {}).values())
    return {
        "messages": sum(int(r.get("participants", 0)) for r in rounds),
        "rounds": len(rounds),
        "up_raw": up_raw,
        "up_wire": up_wire,
        "decoder_bytes": decoder,
        "decoder_bytes_in_rounds": round_decoder,  # re-uploads after the prepass
        "decoder_uploads": uploads,
        "savings_ratio": up_raw / (up_wire + decoder) if up_wire + decoder else math.inf,
    }


def as_run_lines(run: dict[str, Any]) -> list[str]:
    return [
        f"as run (eq. 4 with the run's own counts): {run['messages']} uplink messages, {run['up_raw']:,} B at fp32 -> "
        f"{run['up_wire']:,} B on the wire + {run['decoder_bytes']:,} B of {run['decoder_uploads']} decoder upload(s) "
        f"({run['decoder_bytes_in_rounds']:,} B of them re-uploads during rounds): SR {run['savings_ratio']:.2f}",
    ]


# -- the report for the CLI -------------------------------------------------------------------------
def table(s: Sizes, rounds: int, collaborators: int) -> list[str]:
    lines = [
        f"original update O : {s.original:,.0f} bytes",
        f"compressed S      : {s.compressed:,.1f} bytes per message ({s.original / s.compressed:,.1f}x)",
        f"decoder D         : {s.decoder:,.0f} bytes (eq. 6: half the autoencoder)",
        "",
        f"{'mode':<17} {'decoders':>8} {'cost (eq.5)':>14} {'SR (eq.4)':>10} {'break-even rounds':>18} {'break-even collaborators':>25}",
    ]
    for mode, label in (("shared", "shared (a)"), ("per_collaborator", "per-collab. (b)")):
        br = break_even_rounds(s, collaborators, mode)
        bc = break_even_collaborators(s, rounds, mode)
        lines.append(
            f"{label:<17} {decoders(mode, collaborators):>8} {cost(s, mode, collaborators):>14,.0f} "
            f"{savings_ratio(s, rounds, collaborators, mode):>10.2f} "
            f"{(str(br) + ' (C=' + str(collaborators) + ')') if br else 'never':>18} "
            f"{_collab_text(mode, bc, rounds):>25}"
        )
    sr_dl = savings_ratio(s, rounds, collaborators, "shared", with_downloads=True)
    br_dl = break_even_rounds(s, collaborators, "shared", with_downloads=True)
    lines += [
        "",
        f"shared mode counting the decoder's downloads to the other C-1 collaborators too: SR {sr_dl:.2f}, "
        f"break-even {br_dl} rounds (C={collaborators})",
        f"asymptote O/S = {s.original / s.compressed:,.1f}x (many rounds and collaborators)",
    ]
    return lines


def _collab_text(mode: str, bc: int | None, rounds: int) -> str:
    if mode == "per_collaborator":
        return f"none at R={rounds} (SR indep. of C)" if bc is None else "any C (SR indep. of C)"
    return f"{bc} (R={rounds})" if bc else "never"


def grid(s: Sizes, rounds_list: list[int], collab_list: list[int]) -> list[str]:
    head = f"{'SR (a) shared':>16} " + " ".join(f"{'C=' + str(c):>9}" for c in collab_list)
    lines = [head]
    for r in rounds_list:
        lines.append(
            f"{'R=' + str(r):>16} "
            + " ".join(f"{savings_ratio(s, r, c, 'shared'):>9.2f}" for c in collab_list)
        )
    lines.append(f"{'SR (b) per-collab':>16} " + " ".join(f"{'C=' + str(c):>9}" for c in collab_list))
    for r in rounds_list:
        lines.append(
            f"{'R=' + str(r):>16} "
            + " ".join(f"{savings_ratio(s, r, c, 'per_collaborator'):>9.2f}" for c in collab_list)
        )
    return lines


def plot(s: Sizes, rounds: int, collaborators: int, path: Path) -> Path:
    """Figs. 10-11: SR against collaborators (case a, R fixed) and against rounds (case b)."""
    try:
        import matplotlib
    except ImportError as exc:  # matplotlib is in the `plot` and `dev` extras
        raise RuntimeError("drawing needs matplotlib: pip install 'fedsqueeze[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    cs = sorted({*(int(round(10 ** (i / 20))) for i in range(0, 81)), collaborators})
    a.plot(cs, [savings_ratio(s, rounds, c, "shared") for c in cs], label=f"SR, R={rounds}")
    a.axhline(1.0, color="grey", ls="--", lw=1, label="break-even (SR = 1)")
    bc = break_even_collaborators(s, rounds, "shared")
    if bc:
        a.axvline(bc, color="tab:red", ls=":", lw=1, label=f"break-even at {bc} collaborators")
    a.set_xscale("log")
    a.set_xlabel("collaborators")
    a.set_ylabel("savings ratio (eq. 4)")
    a.set_title("case (a): one shared decoder")
    a.legend()
    rs = sorted({*(int(round(10 ** (i / 20))) for i in range(0, 81)), rounds})
    b.plot(
        rs,
        [savings_ratio(s, r, collaborators, "per_collaborator") for r in rs],
        label=f"SR, any C (C={collaborators})",
    )
    b.axhline(1.0, color="grey", ls="--", lw=1, label="break-even (SR = 1)")
    br = break_even_rounds(s, collaborators, "per_collaborator")
    if br:
        b.axvline(br, color="tab:red", ls=":", lw=1, label=f"break-even at {br} rounds")
    b.set_xscale("log")
    b.set_xlabel("communication rounds")
    b.set_title("case (b): one decoder per collaborator")
    b.legend()
    fig.suptitle(f"O = {s.original:,.0f} B, S = {s.compressed:,.1f} B, decoder = {s.decoder:,.0f} B")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_report(path: str | Path) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))
