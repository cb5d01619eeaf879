"""`make bench`: every benchmark side by side, tables printed, JSON under bench/results/.

python -m bench.run            # all
python -m bench.run encodings  # one
python -m bench.run --quick    # smaller sizes, for a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path

import numpy as np

SUITES = ("encodings", "topk", "build", "train")
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suites", nargs="*", default=list(SUITES), choices=SUITES)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for name in args.suites:
        start = time.perf_counter()
        print(f"\n## {name}\n", flush=True)
        module = importlib.import_module(f"bench.{name}")
        summary[name] = module.run(quick=args.quick)
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {RESULTS / 'summary.json'}")


if __name__ == "__main__":
    main()
