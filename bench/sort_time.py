"""Wall time from `python train.py configs/sort.py` starting to its exit at 100% held-out
exact match (process start, imports and data included), over several runs.

    python bench/sort_time.py [--runs 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, write_results


def one_run(out_dir):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "configs/sort.py", f"--out_dir={out_dir}"],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "heldout_acc" in r][-1]
    return {"wall_s": wall, "iters": last["iter"], "heldout_acc": last["heldout_acc"], "train_acc": last["train_acc"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            rows.append({"run": i + 1, **one_run(Path(tmp) / f"run{i}")})
    walls = [r["wall_s"] for r in rows]
    reached = all(r["heldout_acc"] == 1.0 for r in rows)
    notes = (f"median {statistics.median(walls):.1f}s, max {max(walls):.1f}s to 100% held-out exact match "
             f"(goal: 30s); every run reached 100%: {reached}")
    write_results("sort_time", rows, ["run", "wall_s", "iters", "heldout_acc", "train_acc"], notes)
    return 0 if reached else 1


if __name__ == "__main__":
    sys.exit(main())
