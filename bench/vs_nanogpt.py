"""Whole-process training time against nanoGPT's own train.py, on the same machine, the same text
and the same model (n_layer 4, n_head 4, n_embd 128, block_size 64, batch 32, bias, float32,
no compile), each command run alternately so both see the same machine load:

    python bench/vs_nanogpt.py --nanogpt=path/to/nanoGPT [--iters 150] [--runs 5]

nanoGPT is not shipped here: give a checkout of github.com/karpathy/nanoGPT (its train.py,
model.py and configurator.py are copied to a temporary folder with the prepared data). Its loop
runs max_iters + 1 steps and evaluates at iteration 0 and at max_iters; ours runs max_iters
steps, evaluates once at the end and writes its report (with 3 samples) too.
"""

import argparse
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, write_results

sys.path.insert(0, str(ROOT))
from model.tokenizer import CharTokenizer  # noqa: E402

MODEL = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=32",
         "--learning_rate=0.001", "--warmup_iters=10", "--eval_iters=20", "--log_interval=10"]


def prepare(tmp, nanogpt):
    """The text for both, and nanoGPT's folder with data/bench/{train,val}.bin and meta.pkl."""
    text = (ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8") * 400
    (tmp / "text.txt").write_text(text, encoding="utf-8")
    nano = tmp / "nanogpt"
    (nano / "data" / "bench").mkdir(parents=True)
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(Path(nanogpt) / name, nano / name)
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text), dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(nano / "data" / "bench" / "train.bin")
    ids[n:].tofile(nano / "data" / "bench" / "val.bin")
    with open(nano / "data" / "bench" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": tok.vocab_size, "itos": dict(enumerate(tok.itos)), "stoi": tok.stoi}, f)
    return nano


def timed(cmd, cwd):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (train.py, model.py, configurator.py)")
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    n = args.iters
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nano = prepare(tmp, args.nanogpt)
        theirs = [sys.executable, "train.py", "--dataset=bench", "--device=cpu", "--compile=False", "--dtype=float32",
                  "--bias=True", "--gradient_accumulation_steps=1", "--beta2=0.99", "--always_save_checkpoint=False",
                  f"--max_iters={n}", f"--lr_decay_iters={n}", f"--eval_interval={n}", "--out_dir=out", *MODEL]
        ours = [sys.executable, "train.py", "configs/chinese.py", f"--data={tmp / 'text.txt'}", "--val_fraction=0.1",
                "--device=cpu", "--dtype=float32", f"--max_iters={n}", f"--lr_decay_iters={n}",
                f"--eval_interval={n}", f"--out_dir={tmp / 'ours'}", *MODEL]
        rows = []
        for run in range(1, args.runs + 1):
            rows.append({"run": run, "nanogpt_s": timed(theirs, nano), "ours_s": timed(ours, ROOT)})
            rows[-1]["ratio"] = rows[-1]["ours_s"] / rows[-1]["nanogpt_s"]
    ratio = statistics.median(r["ours_s"] for r in rows) / statistics.median(r["nanogpt_s"] for r in rows)
    write_results("vs_nanogpt", rows, ["run", "nanogpt_s", "ours_s", "ratio"],
                  f"whole process, {n} iterations: ours / nanoGPT = {ratio:.3f} (medians; goal <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
