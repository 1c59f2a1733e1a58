"""What the training loop costs beyond the optimizer step, at n_layer 4, n_head 4, n_embd 128,
block_size 64, batch 32, float32 on the CPU, measured alternately in one process:

- bare step: forward, backward, clip and AdamW (train_step) on batches built beforehand;
- the loop: train.py's own loop (batches, seeds, NaN check, progress bar, metrics log) for the
  same iterations, timed up to its last step (the final evaluation and save are not counted);
- the AdamW step alone (random gradients, 200 steps) with the fused CPU kernel and with the
  unfused (foreach) one, to show what the fused kernel buys; whole steps are too noisy for that.

    python bench/loop_overhead.py [--iters 60] [--rounds 3]
"""

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, write_results

sys.path.insert(0, str(ROOT))
from model.config import TrainConfig, load_config  # noqa: E402
from model.schedule import get_lr  # noqa: E402
from model.start import prepare_run  # noqa: E402
from model.trainer import micro_batches, train_loop, train_step  # noqa: E402

ARGS = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=32", "--val_fraction=0.1",
        "--eval_iters=1", "--log_interval=1", "--device=cpu", "--dtype=float32"]


def new_run(tmp, name, iters):
    args = [str(ROOT / "configs" / "chinese.py"), f"--data={tmp / 'text.txt'}", f"--out_dir={tmp / name}",
            f"--max_iters={iters}", f"--eval_interval={iters}", *ARGS]
    with contextlib.redirect_stdout(io.StringIO()):
        return prepare_run(load_config(TrainConfig, args))


def bare(tmp, iters):
    run = new_run(tmp, "bare", iters)
    batches = [micro_batches(run, it) for it in range(iters)]
    start = time.perf_counter()
    for it in range(iters):
        train_step(run.model, run.optimizer, batches[it], get_lr(it, run.cfg), run.cfg.grad_clip).item()
    return (time.perf_counter() - start) / iters


def adamw(tmp, fused, steps=200):
    """ms per AdamW step alone on the model's parameters."""
    run = new_run(tmp, "adamw", 1)
    for p in run.model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = run.optimizer
    if not fused:
        groups = [{k: v for k, v in g.items() if k != "fused"} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, fused=False, foreach=True)
    for _ in range(5):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return 1000 * (time.perf_counter() - start) / steps


def loop(tmp, iters):
    run = new_run(tmp, "loop", iters)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_loop(run)
    rows = [json.loads(line) for line in (tmp / "loop" / "metrics.jsonl").read_text().splitlines()]
    return next(r["time_s"] for r in rows if r.get("iter") == iters and "loss" in r) / iters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "text.txt").write_text((ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8") * 40,
                                      encoding="utf-8")
        for r in range(1, args.rounds + 1):
            rows.append({"round": r, "bare_ms": 1000 * bare(tmp, args.iters), "loop_ms": 1000 * loop(tmp, args.iters),
                         "adamw_fused_ms": adamw(tmp, True), "adamw_foreach_ms": adamw(tmp, False)})
    keys = ("bare_ms", "loop_ms", "adamw_fused_ms", "adamw_foreach_ms")
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    low = {k: min(r[k] for r in rows) for k in keys}
    write_results("loop_overhead", rows, ["round", *keys],
                  f"loop / bare step: {med['loop_ms'] / med['bare_ms']:.3f} (medians), {low['loop_ms'] / low['bare_ms']:.3f} "
                  f"(fastest rounds); goal <= 1.03. AdamW step alone, foreach / fused: "
                  f"{med['adamw_foreach_ms'] / med['adamw_fused_ms']:.3f} (medians); the fused kernel saves "
                  f"{(med['adamw_foreach_ms'] - med['adamw_fused_ms']) / med['bare_ms']:.1%} of an iteration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
