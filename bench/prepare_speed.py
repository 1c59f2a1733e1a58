"""Preparing a large text: the whole train.py process's peak memory, the preparation speed, and
how soon a second run (which reuses the prepared files) is done, on generated texts of 110 and
220 MB (mixed English words and Chinese characters, a fixed seed):

    python bench/prepare_speed.py [--mb 110]

Each case is its own train.py process (a tiny model, one step), so its peak RSS is its own.
Goals: char preparation at least 25 MB/s with peak RSS at most 1.0 GB, not growing with the
text (220 MB within +10% of 110 MB); BPE encoding at least 5 MB/s; a reuse run done within 3 s.
"""

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, run_case, write_results

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=1",
        "--eval_interval=1", "--eval_iters=1", "--val_fraction=0.01", "--device=cpu"]


def make_text(path, mb, seed=0):
    """About `mb` MB of lines of words: Latin words, and runs of Chinese characters."""
    rng = np.random.default_rng(seed)
    latin = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    chinese = ["".join(chr(c) for c in rng.integers(0x4E00, 0x4E00 + 3000, rng.integers(2, 6))) for _ in range(3000)]
    words = np.array(latin + chinese)
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < mb * 1_000_000:
            picks = words[rng.integers(0, len(words), 200_000)]
            f.write("\n".join(" ".join(picks[i:i + 12]) for i in range(0, len(picks), 12)) + "\n")


def measure(case, text, out_dir):
    """One train.py run: wall seconds, peak RSS, and what it said about preparing."""
    kind = ["--tokenizer=bpe", "--vocab_size=4096"] if case.startswith("bpe") else []
    start, launched = time.perf_counter(), time.time()
    proc = subprocess.run([sys.executable, "train.py", "configs/chinese.py", f"--data={text}", f"--out_dir={out_dir}",
                           *TINY, *kind], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    prepared = re.search(r"prepared ([\d.]+) MB of text into ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) MB/s\)", proc.stderr)
    trained = re.search(r"trained a \d+-token byte-level BPE in ([\d.]+)s", proc.stderr)
    started = json.loads((Path(out_dir) / "run.json").read_text())["loop_started_at"] - launched
    return {"case": case, "wall_s": wall, "training_starts_s": started, "peak_rss_mb": rss,
            "prepare_s": float(prepared.group(3)) if prepared else None,
            "mb_per_s": float(prepared.group(4)) if prepared else None,
            "bpe_training_s": float(trained.group(1)) if trained else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case")
    parser.add_argument("--text")
    parser.add_argument("--out")
    parser.add_argument("--mb", type=int, default=110)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.text, args.out)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_text(tmp / "small.txt", args.mb)
        make_text(tmp / "large.txt", 2 * args.mb, seed=1)
        plan = [("char, first run", "small.txt", "char"), ("char, reuse", "small.txt", "char"),
                (f"char, first run, {2 * args.mb} MB", "large.txt", "char2"), ("bpe, first run", "small.txt", "bpe"),
                ("bpe, reuse", "small.txt", "bpe")]
        rows = []
        for name, text, out in plan:
            row = run_case(Path(__file__), name, f"--text={tmp / text}", f"--out={tmp / out}")
            rows.append({**row, "text_mb": round((tmp / text).stat().st_size / 1e6, 1)})
    growth = rows[2]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    write_results("prepare_speed", rows, ["case", "text_mb", "wall_s", "training_starts_s", "peak_rss_mb", "prepare_s",
                                          "mb_per_s", "bpe_training_s"],
                  f"peak RSS, {2 * args.mb} MB vs {args.mb} MB text (char): {growth:.2f}x. prepare_s and mb_per_s: "
                  f"reading, encoding and writing the tokens (BPE training is bpe_training_s, before it). "
                  f"training_starts_s: from the command's launch to its training loop's start.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
