"""Training throughput (tokens/s, ms/iter), MFU and peak memory for the sort config, the
Chinese config and nanoGPT's CPU recipe size (n_layer 4, n_head 4, n_embd 128, block_size 64,
batch 12). MFU is against this machine's dense float32 matmul rate, measured in the same run.

    python bench/train_speed.py
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import ROOT, matmul_peak_gflops, run_case, write_results

sys.path.insert(0, str(ROOT))
from model.config import TrainConfig, load_config  # noqa: E402
from model.schedule import get_lr  # noqa: E402
from model.runtime import autocast_context, peak_memory_mb  # noqa: E402
from model.start import prepare_run  # noqa: E402
from model.trainer import derived_seed, train_step  # noqa: E402

CASES = {
    "sort": ["configs/sort.py"],
    "chinese": ["configs/chinese.py"],
    "nanogpt-cpu": ["configs/chinese.py", "--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64",
                    "--batch_size=12", "--val_fraction=0.1"],
}
WARMUP, TIMED = 5, 40


def flops_per_iter(run):
    """nanoGPT's estimate: 6N per token for the matmuls (forward + backward) plus 12 L T C for attention."""
    m = run.model.config
    per_token = 6 * run.model.num_params(non_embedding=True) + 12 * m.n_layer * m.block_size * m.n_embd
    return per_token * m.block_size * run.cfg.batch_size * run.cfg.gradient_accumulation_steps


def measure(case):
    with tempfile.TemporaryDirectory() as tmp:
        args = CASES[case] + [f"--out_dir={tmp}"]
        if case == "nanogpt-cpu":  # the shipped corpus is shorter than block_size 64: repeat it
            text = (ROOT / "data" / "chinese" / "input.txt").read_text(encoding="utf-8") * 40
            (Path(tmp) / "text.txt").write_text(text, encoding="utf-8")
            args.append(f"--data={tmp}/text.txt")
        run = prepare_run(load_config(TrainConfig, args))
        cfg, rt = run.cfg, run.rt
        autocast = autocast_context(rt.device_type, rt.dtype)

        def step(it):
            batches = [tuple(t.to(rt.device) for t in run.task.get_batch(
                "train", cfg.batch_size, torch.Generator().manual_seed(derived_seed(cfg.seed, it, 0))))]
            return train_step(run.model, run.optimizer, batches, get_lr(it, cfg), cfg.grad_clip, autocast).item()

        for it in range(WARMUP):
            step(it)
        start = time.perf_counter()
        for it in range(WARMUP, WARMUP + TIMED):
            step(it)
        seconds = (time.perf_counter() - start) / TIMED
        tokens = cfg.batch_size * cfg.gradient_accumulation_steps * run.model.config.block_size
        peak = matmul_peak_gflops(rt.device_type)
        achieved = flops_per_iter(run) / seconds / 1e9
        return {"config": case, "params": run.model.num_params(), "ms_per_iter": seconds * 1000,
                "tokens_per_s": tokens / seconds, "gflops": achieved, "peak_gflops": peak,
                "mfu_pct": 100 * achieved / peak, "peak_mb": peak_memory_mb("cpu")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=list(CASES))
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case)))
        return 0
    rows = [run_case(Path(__file__), case) for case in CASES]
    write_results("train_speed", rows, ["config", "params", "ms_per_iter", "tokens_per_s", "gflops",
                                        "peak_gflops", "mfu_pct", "peak_mb"],
                  "MFU: achieved model FLOP/s over this machine's dense float32 matmul FLOP/s (1024x1024, "
                  "measured in the same process right after the timed steps). peak_mb: the process's peak RSS.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
