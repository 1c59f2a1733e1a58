"""Fine-tuning big models on a CPU: a full fine-tune against LoRA (rank 8 on every attention and
feed-forward layer), LoRA with gradient checkpointing, and that with the frozen base in bfloat16
under autocast (train.py --dtype=bfloat16), at GPT-2 355M's shape (24 layers, 1024
channels, 16 heads, vocabulary 50,257) and Qwen2.5-0.5B's (24 layers, 896 channels, 14 heads
sharing 2 key/value heads, intermediate 4864, vocabulary 151,936, tied), random weights, float32,
2 x 256 tokens a step. Each case runs in a process of its own, so its peak RSS is its own:
seconds a step (the median of steps 2 and 3) and peak RSS.

    python bench/lora.py       # about 6 minutes on a 2-core CPU, up to 11 GB of memory
"""

import argparse
import json
import statistics
import sys
import time

import torch

from common import ROOT, run_case, write_results

sys.path.insert(0, str(ROOT))
from model import GPT, GPTConfig  # noqa: E402
from model.lora import LoRAConfig, add_adapters, store_frozen_in  # noqa: E402
from model.runtime import autocast_context, peak_memory_mb  # noqa: E402
from model.trainer import train_step  # noqa: E402

SHAPES = {
    "gpt2-355M": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, block_size=1024, activation="gelu_tanh"),
    "qwen2.5-0.5B": dict(n_layer=24, n_embd=896, n_head=14, n_kv_head=2, intermediate_size=4864, vocab_size=151936,
                         block_size=32768, rope_theta=1e6, positions="rope", normalization="rmsnorm", mlp="gated",
                         activation="silu", bias=False, qkv_bias=True, head="tied", layer_norm_eps=1e-6),
}
MODES = ("full", "lora", "lora+checkpointing", "lora+checkpointing+bf16")
BATCH, T = 2, 256


def case(shape, mode, steps=3):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape], gradient_checkpointing="checkpointing" in mode)).train()
    if mode != "full":
        add_adapters(model, LoRAConfig(rank=8, alpha=16.0, targets="all"))
    bf16 = mode.endswith("bf16")  # as train.py --dtype=bfloat16: the frozen base in bf16, autocast
    if bf16:
        store_frozen_in(model, torch.bfloat16)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu")
    x = torch.randint(SHAPES[shape]["vocab_size"], (BATCH, T + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, [(x[:, :-1], x[:, 1:])], 1e-4, 1.0, autocast_context("cpu", torch.bfloat16 if bf16
                                                                                         else torch.float32))
        times.append(time.perf_counter() - start)
    return {"shape": shape, "mode": mode, "step_s": statistics.median(times[1:]), "peak_rss_mb": peak_memory_mb("cpu"),
            "parameters": model.num_params(), "trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(*args.case.split(":"))))
        return 0
    rows = [run_case(ROOT / "bench" / "lora.py", f"{shape}:{mode}") for shape in SHAPES for mode in MODES]
    by = {(r["shape"], r["mode"]): r for r in rows}
    q = "qwen2.5-0.5B"
    write_results("lora", rows, ["shape", "mode", "parameters", "trained", "step_s", "peak_rss_mb"],
                  f"CPU, {torch.get_num_threads()} threads, {BATCH} x {T} tokens a step. At {q}: LoRA + checkpointing "
                  f"peaks at {by[(q, 'lora+checkpointing')]['peak_rss_mb']:,.0f} MB in float32, "
                  f"{by[(q, 'lora+checkpointing+bf16')]['peak_rss_mb']:,.0f} MB with the base in bfloat16 (goal <= "
                  f"4,096), and takes {by[(q, 'lora+checkpointing')]['step_s']:.1f} s / "
                  f"{by[(q, 'lora+checkpointing+bf16')]['step_s']:.1f} s a step against the full fine-tune's "
                  f"{by[(q, 'full')]['step_s']:.1f} s (goal: faster).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
