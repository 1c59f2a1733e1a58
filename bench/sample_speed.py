"""Sampling speed with and without the KV cache: 500 new tokens at nanoGPT's Shakespeare-char
size (block_size 256, n_layer 6, n_head 6, n_embd 384, 65 characters), random weights; and
8 samples drawn as one batch (as sample.py --num_samples=8 does) against 1.

    python bench/sample_speed.py                 # on the CPU, where the goals (5x, under 2x) are set
    python bench/sample_speed.py --device=cuda
"""

import argparse
import json
import sys
import time

from pathlib import Path

import torch

from common import run_case, write_results

sys.path.insert(0, str(__import__("common").ROOT))
from model import GPT, GPTConfig  # noqa: E402
from model.runtime import decode_layout, peak_memory_mb  # noqa: E402
from model.sampling import generate  # noqa: E402

NEW_TOKENS = 500
CASES = {"nocache": (False, 1), "cache": (True, 1), "batch8": (True, 8)}  # (kv_cache, samples)


def measure(kv_cache, device, samples=1):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)).to(device).eval()
    if device == "cpu":
        decode_layout(model)  # as sample.py opens a model on the CPU
    prompt = torch.zeros(samples, 1, dtype=torch.long, device=device)
    generate(model, prompt, 8, temperature=1.0, use_cache=kv_cache)  # warm-up
    start = time.perf_counter()
    out = generate(model, prompt, NEW_TOKENS, temperature=1.0, use_cache=kv_cache,
                   generator=torch.Generator(device).manual_seed(0))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.size(1) == NEW_TOKENS + 1
    return {"device": device, "kv_cache": kv_cache, "samples": samples, "seconds": seconds,
            "tokens_per_s": samples * NEW_TOKENS / seconds, "peak_mb": peak_memory_mb(device)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=list(CASES))
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    if args.case:
        kv_cache, samples = CASES[args.case]
        print(json.dumps(measure(kv_cache, args.device, samples)))
        return 0
    rows = [run_case(Path(__file__), c, f"--device={args.device}") for c in CASES]
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    batch = rows[2]["seconds"] / rows[1]["seconds"]
    write_results("sample_speed", rows, ["device", "kv_cache", "samples", "seconds", "tokens_per_s", "peak_mb"],
                  f"KV cache speed-up: {speedup:.1f}x (goal: at least 5x). 8 samples as one batch take {batch:.2f}x "
                  f"the time of 1 (goal: under 2x).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
