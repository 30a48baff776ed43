"""The tutorial's recipe as its own process (for process-wall comparisons): N epochs of its train_model
loop, frozen ("fixed feature extractor") or finetune, DataLoader num_workers=4 as in the tutorial.

    python benchmarks/tutorial_process.py DATA [--frozen] [--epochs 25] [--device auto]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tutorial_recipe import tutorial_epochs  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--frozen", action="store_true")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args(argv)
    import torch

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    times = tutorial_epochs(args.data, args.epochs, device, args.workers, frozen=args.frozen)
    mode = "frozen" if args.frozen else "finetune"
    print(f"tutorial {mode}: {args.epochs} epochs, {sum(times):.1f} s in its loop "
          f"({sum(times) / len(times):.2f} s per epoch) on {device}")


if __name__ == "__main__":
    main()
