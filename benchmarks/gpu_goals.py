"""Issue 9's goals against what benchmarks/gpu_device.sh measured: each ratio, and met / not met.

    python benchmarks/gpu_goals.py OUTDIR [BIG_DATA]

Reads OUTDIR/rows.tsv (step, process wall s, key figures) and OUTDIR/step_<name>.out (each step's output).
A goal whose steps did not run (ONLY=..., a failure) is reported as 'not measured'.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

GOALS = {  # name: (threshold, what)
    "extract_summary": (5000.0, "extract at scale, default flags: images/s in the summary line"),
    "extract_wall": (4000.0, "extract at scale, default flags: images/s by process wall"),
    "frozen_wall": (3.0, "cli.py run vs the tutorial's frozen recipe, process wall"),
    "frozen_work": (50.0, "cli.py run vs the tutorial's frozen recipe, work only (extract + head vs its loop)"),
    "finetune_loop": (3.0, "cli.py finetune vs the tutorial, in the epoch loop (best precision)"),
    "finetune_wall": (2.0, "cli.py finetune vs the tutorial, process wall (best precision)"),
}


def _rows(outdir: Path) -> dict[str, float]:
    walls = {}
    for line in (outdir / "rows.tsv").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[2].startswith("FAILED"):
            try:
                walls[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return walls


def _out(outdir: Path, step: str) -> str:
    p = outdir / f"step_{step}.out"
    return p.read_text() if p.exists() else ""


def _num(pattern: str, text: str) -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1].replace(",", "")) if found else None


def measure(outdir: Path) -> dict[str, float | None]:
    walls = _rows(outdir)
    got: dict[str, float | None] = dict.fromkeys(GOALS)
    ext = _out(outdir, "extract_default_flags")
    rows = re.findall(r"extracted ([^|]*)\|", ext)
    images = sum(int(n) for n in re.findall(r"\b(\d+)\b", rows[-1])) if rows else 0
    got["extract_summary"] = _num(r"([\d.]+) images/s", ext)
    if images and "extract_default_flags" in walls:
        got["extract_wall"] = images / walls["extract_default_flags"]
    tut_frozen = _num(r"([\d.]+) s in its loop", _out(outdir, "tutorial_frozen"))
    run = _out(outdir, "tlearn_run_frozen")
    if "tutorial_frozen" in walls and "tlearn_run_frozen" in walls:
        got["frozen_wall"] = walls["tutorial_frozen"] / walls["tlearn_run_frozen"]
    ext_s, head_s = _num(r"\| ([\d.]+) s \|", run), _num(r"trained in ([\d.]+) s", run)
    if tut_frozen and ext_s is not None and head_s is not None:
        got["frozen_work"] = tut_frozen / max(ext_s + head_s, 1e-9)
    tut_ft = _num(r"([\d.]+) s in its loop", _out(outdir, "tutorial_finetune"))
    loops, fwalls = [], []
    for p in ("bf16", "fp32"):
        secs = _num(r"trained \d+ epochs in ([\d.]+) s", _out(outdir, f"tlearn_finetune_{p}"))
        if tut_ft and secs:
            loops.append(tut_ft / secs)
        if "tutorial_finetune" in walls and f"tlearn_finetune_{p}" in walls:
            fwalls.append(walls["tutorial_finetune"] / walls[f"tlearn_finetune_{p}"])
    got["finetune_loop"] = max(loops) if loops else None
    got["finetune_wall"] = max(fwalls) if fwalls else None
    return got


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    outdir = Path(argv[0])
    got = measure(outdir)
    print("\n| goal | measured | target | |\n|---|---:|---:|---|")
    met_all = True
    for name, (target, what) in GOALS.items():
        v = got[name]
        unit = "x" if target < 100 else " images/s"
        if v is None:
            verdict, shown = "not measured", "-"
            met_all = False
        else:
            verdict = "met" if v >= target else f"NOT met ({v / target:.0%} of it)"
            met_all &= v >= target
            shown = f"{v:.1f}{unit}" if unit == "x" else f"{v:.0f}{unit}"
        print(f"| {what} | {shown} | >= {target:g}{unit} | {verdict} |")
    print(f"\ngoals: {'all met' if met_all else 'not all met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
