"""Sampling speed with and without the KV cache: 500 new tokens at nanoGPT's Shakespeare-char
size (block_size 256, n_layer 6, n_head 6, n_embd 384, 65 characters), random weights, decoded as
sample.py decodes them (the engine, model/engine.py); and 8 samples drawn as one batch (as
sample.py --num_samples=8 does) against 1.

    python bench/sample_speed.py                 # on the CPU, where the goals (5x, under 2x) are set
    python bench/sample_speed.py --device=cuda
"""

import argparse
import json
import statistics
import sys
import time

from pathlib import Path

import torch

from common import run_case, write_results

sys.path.insert(0, str(__import__("common").ROOT))
from model import GPT, GPTConfig  # noqa: E402
from model.engine import Engine, Request, Rules, draws  # noqa: E402
from model.quantize import for_decoding  # noqa: E402
from model.runtime import peak_memory_mb  # noqa: E402

NEW_TOKENS = 500
CASES = {"nocache": (False, 1), "cache": (True, 1), "batch8": (True, 8)}  # (kv_cache, samples)
ROUNDS = 3


def measure(kv_cache, device, samples=1):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)).to(device).eval()
    if device == "cpu":
        for_decoding(model, "float32")  # as sample.py opens a model on the CPU
    def decode(tokens):
        requests = [Request([0], rules) for rules in draws(Rules(max_tokens=tokens, temperature=1.0, seed=0), samples)]
        Engine(model, max_batch=samples, use_cache=kv_cache).complete(requests)
        return requests

    decode(8)  # warm-up
    start = time.perf_counter()
    out = decode(NEW_TOKENS)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert all(len(r.tokens) == NEW_TOKENS for r in out)
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
    # the cases take turns, ROUNDS times, and each row is a case's median: this machine's speed drifts
    runs = [[run_case(Path(__file__), c, f"--device={args.device}") for c in CASES] for _ in range(ROUNDS)]
    rows = [min(rounds, key=lambda r: abs(r["seconds"] - statistics.median(x["seconds"] for x in rounds)))
            for rounds in zip(*runs)]
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    batch = rows[2]["seconds"] / rows[1]["seconds"]
    write_results("sample_speed", rows, ["device", "kv_cache", "samples", "seconds", "tokens_per_s", "peak_mb"],
                  f"KV cache speed-up: {speedup:.1f}x (goal: at least 5x). 8 samples as one batch take {batch:.2f}x "
                  f"the time of 1 (goal: under 2x). Medians of {ROUNDS} rounds, the cases taking turns.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
