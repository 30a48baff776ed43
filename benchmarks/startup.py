"""Every command at the speed of its work (issue 11): each command's process wall next to the floor and
to the work inside it, all measured in this one run on this machine.

    python benchmarks/startup.py [--data DIR] [--repeat 3] [--epochs 1] [--workers N] [--skip run,tutorial,finetune]

The floor is `python -c "import torch"`: what any command that touches torch pays before doing anything.
Each command runs as a user runs it (a fresh `python cli.py ...` process, warm file cache, random-init
weights, offline); light commands take the median of --repeat runs. "work" is what the command itself
reports: the head's training seconds, extract's loop seconds, the sum of finetune's epochs. Goals:
--help < 0.3 s; train-head <= floor + 0.8 s; run <= its extract's work + floor + 1.5 s; finetune - epochs <=
floor + 3 s; predict of one image <= floor + 1 s; the tutorial's frozen recipe as a process (1 epoch
measured, 24 more added at its epoch time) >= 20x the wall of `run` (fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = str(REPO / "cli.py")
DEFAULT_DATA = REPO.parent / "shared/datasets/hymenoptera_data"
COMMANDS = ("extract", "train-head", "run", "finetune", "predict", "export", "report", "info", "download", "preview")


CPU: list[float] = []  # CPU seconds (user + sys, the process and its children) of each wall() call


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wall(args: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    """(seconds, stdout) of one process; a failing command stops the benchmark with its output."""
    c0, t0 = _cpu(), time.perf_counter()
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    CPU.append(_cpu() - c0)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return took, r.stdout


def median_wall(args, cwd, env, repeat: int) -> tuple[float, str]:
    runs = [wall(args, cwd, env) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the light commands (median)")
    ap.add_argument("--epochs", type=int, default=1, help="finetune epochs")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the CLI's)")
    ap.add_argument("--skip", default="", help="comma-separated: run, tutorial, finetune")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    tmp = Path(tempfile.mkdtemp(prefix="tlearn-startup-"))
    env = {**os.environ, "TLEARN_OFFLINE": "1", "TORCH_HOME": str(tmp / "torch_home")}
    py = [sys.executable]
    workers = ["--workers", str(a.workers)] if a.workers is not None else []
    rows: list[dict] = []
    load0 = f"{os.getloadavg()[0]:.2f}"

    def row(what: str, seconds: float, work: float | None = None, goal: str = "", ok: bool | None = None,
            floor_s: float | None = None):
        rows.append({"command": what, "wall_s": round(seconds, 3), "work_s": None if work is None else round(work, 3),
                     "cpu_s": round(CPU[-1], 3), "goal": goal, "met": ok, "floor_s": floor_s})

    def near_floor() -> float:
        """The floor measured right before a command: this machine's speed drifts by tens of percent
        within minutes, so each goal compares with the floor of its own moment."""
        return median_wall(py + ["-c", "import torch"], tmp, env, a.repeat)[0]

    try:
        floor, _ = median_wall(py + ["-c", "import torch"], tmp, env, a.repeat)
        row('python -c "import torch" (floor)', floor)
        t, _ = median_wall(py + [CLI, "--help"], tmp, env, a.repeat)
        row("cli.py --help", t, goal="< 0.3 s", ok=t < 0.3)
        for c in COMMANDS:
            t, _ = median_wall(py + [CLI, c, "--help"], tmp, env, a.repeat)
            row(f"cli.py {c} --help", t, goal="< 0.3 s", ok=t < 0.3)

        cache = tmp / "feats.h5"
        t, out = wall(py + [CLI, "extract", str(a.data), "--cache", str(cache), "--weights", "none"] + workers, tmp, env)
        work = float(re.search(r"\| ([\d.]+) s \|", out).group(1))
        row(f"cli.py extract ({a.data.name})", t, work, goal="(reference for run)")

        f = near_floor()
        times, work = [], None
        for k in range(a.repeat):
            t, out = wall(py + [CLI, "train-head", str(cache), "--out", str(tmp / f"head{k}")], tmp, env)
            times.append(t)
            work = float(re.search(r"trained in ([\d.]+) s", out).group(1))
        t = statistics.median(times)
        row("cli.py train-head (pictures included)", t, work, f"<= floor {f:.2f} + 0.8 = {f + 0.8:.2f} s", t <= f + 0.8, f)
        t, _ = median_wall(py + [CLI, "train-head", str(cache), "--out", str(tmp / "head_np"), "--no-plots"], tmp, env,
                           a.repeat)
        row("cli.py train-head --no-plots", t)

        if "run" not in skip:
            f = near_floor()
            t, out = wall(py + [CLI, "run", str(a.data), "--out", str(tmp / "run"), "--weights", "none"] + workers,
                          tmp, env)
            work = float(re.search(r"\| ([\d.]+) s \|", out).group(1))
            head = float(re.search(r"trained in ([\d.]+) s", out).group(1))
            limit = work + f + 1.5  # its own extract's work
            row(f"cli.py run ({a.data.name}: extract + train-head)", t, work + head,
                f"<= its extract work {work:.2f} + floor {f:.2f} + 1.5 = {limit:.2f} s", t <= limit, f)

            if "tutorial" not in skip:  # the whole-process frozen speed-up: both processes' walls
                tut, out = wall(py + [str(REPO / "benchmarks/tutorial_process.py"), str(a.data), "--frozen",
                                      "--epochs", "1"], tmp, env)
                epoch = float(re.search(r"\(([\d.]+) s per epoch\)", out).group(1))
                tut25 = tut + 24 * epoch
                row(f"tutorial frozen recipe as a process, 1 epoch (25: {tut:.1f} + 24 x {epoch:.2f} = {tut25:.1f} s)",
                    tut, epoch, goal=f"run is {tut25 / t:.1f}x faster than its 25 epochs", ok=tut25 / t >= 20)

        img = next(p for p in sorted((a.data / "val").rglob("*.jpg")))
        f = near_floor()
        t, _ = median_wall(py + [CLI, "predict", str(tmp / "head0"), str(img)], tmp, env, a.repeat)
        row("cli.py predict RUN one.jpg (head run)", t, goal=f"<= floor {f:.2f} + 1 = {f + 1:.2f} s", ok=t <= f + 1,
            floor_s=f)

        if "finetune" not in skip:
            base = [CLI, "finetune", str(a.data), "--weights", "none", "--epochs", str(a.epochs)] + workers
            f = near_floor()
            t, _ = wall(py + base + ["--out", str(tmp / "ft1")], tmp, env)
            epochs = sum(h["seconds"] for h in json.loads((tmp / "ft1" / "metrics.json").read_text())["history"])
            row("cli.py finetune, first run (decodes every file once)", t, epochs,
                f"wall - epochs {t - epochs:.2f} <= floor {f:.2f} + 3 = {f + 3:.2f} s", t - epochs <= f + 3, f)
            (tmp / "ft2").mkdir()
            shutil.copy(tmp / "ft1" / "verdicts.json", tmp / "ft2" / "verdicts.json")  # an earlier run's verdicts
            f = near_floor()
            t, _ = wall(py + base + ["--out", str(tmp / "ft2")], tmp, env)
            epochs = sum(h["seconds"] for h in json.loads((tmp / "ft2" / "metrics.json").read_text())["history"])
            row("cli.py finetune, verdicts known", t, epochs,
                f"wall - epochs {t - epochs:.2f} <= floor {f:.2f} + 3 = {f + 3:.2f} s", t - epochs <= f + 3, f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"load average before/after: {load0} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          "(walls are only comparable on a quiet machine; CPU s is the process's and its children's user+sys)")
    print("(wall - floor: against the floor measured right before that command, as in its goal)")
    print("| command | process wall (s) | work inside (s) | wall - floor (s) | CPU s | goal | met |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        work = "" if r["work_s"] is None else f"{r['work_s']:.3f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        here = r["floor_s"] if r["floor_s"] is not None else floor
        print(f"| {r['command']} | {r['wall_s']:.3f} | {work} | {r['wall_s'] - here:+.3f} | {r['cpu_s']:.2f} | "
              f"{r['goal']} | {met} |")
    return rows


if __name__ == "__main__":
    main()
