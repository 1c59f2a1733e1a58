"""GPT-2 124M on one GPU, against nanoGPT and transformers in the same run:

- training at GPT-2 124M's shape (12 x 12 x 768, block 1024, vocabulary 50,304, batch 12, no bias,
  bf16 autocast, flash attention through sdpa, fused AdamW, torch.compile): our train_step (what
  train.py runs each iteration) on random tokens, and nanoGPT's own train.py on random tokens of
  the same shape, alternating; ms/iter after warm-up, tokens/s, and MFU by nanoGPT's FLOP
  estimate (6N + 12 L H Q T a token) against the chip's dense bf16 peak;
- greedy decoding, batch 1 and 8, 200 new tokens, GPT-2's own layout (biases, tanh GELU, vocabulary
  50,257) in bfloat16: our generate() (compiled one-token step over a static KV cache, and
  eager) against GPT2LMHeadModel.generate with the same weights (its default cache, and its
  static cache), the tokens checked equal; tokens/s, and against the memory limit (every step
  reads every weight once: batch x HBM bandwidth / weight bytes).

    python bench/gpu.py --nanogpt=path/to/nanoGPT     # on an H100/H200 (sized for 10 minutes; not yet run)
    python bench/gpu.py --dry_run                     # on the CPU at a tiny size: every path runs once

nanoGPT is not shipped here: give a checkout (its train.py, model.py and configurator.py are
copied beside random-token data); without --nanogpt that comparison is left out, and said so.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, write_results

sys.path.insert(0, str(ROOT))
from model import GPT, GPTConfig  # noqa: E402
from model.runtime import autocast_context  # noqa: E402
from model.engine import generate  # noqa: E402
from model.trainer import train_step  # noqa: E402

SIZES = {  # the training shape; decoding uses it with GPT-2's own vocabulary, biases and GELU
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512, bias=False),
}
CHIPS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # SXM: dense bf16 FLOP/s, HBM bytes/s


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model):
    """nanoGPT's estimate (PaLM's appendix B): 6N + 12 L H Q T, N without the position embedding."""
    c = model.config
    return 6 * model.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size


def train_ours(shape, device, batch, iters, warmup, compile_):
    """Our training step at `shape` -> (ms/iter after warm-up, FLOPs a token)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
    step = torch.compile(model) if compile_ else model
    autocast = autocast_context(device, torch.bfloat16 if device == "cuda" else torch.float32)
    g = torch.Generator(device).manual_seed(0)
    data = torch.randint(shape["vocab_size"], (iters, batch, shape["block_size"] + 1), device=device, generator=g)
    for i in range(warmup):
        train_step(step, optimizer, [(data[i, :, :-1], data[i, :, 1:])], 6e-4, 1.0, autocast)
    sync(device)
    start = time.perf_counter()
    for i in range(warmup, iters):
        train_step(step, optimizer, [(data[i, :, :-1], data[i, :, 1:])], 6e-4, 1.0, autocast)
    sync(device)
    return (time.perf_counter() - start) / (iters - warmup) * 1000, flops_per_token(model)


def train_nanogpt(nanogpt, shape, device, batch, iters, warmup, compile_, tmp):
    """nanoGPT's train.py on random tokens of the same shape -> median ms/iter after warm-up (it
    prints each iteration's time; log_interval=1 reads the loss, a sync, every iteration)."""
    folder = tmp / "nanogpt"
    (folder / "data" / "bench").mkdir(parents=True, exist_ok=True)
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(Path(nanogpt) / name, folder / name)
    tokens = np.random.default_rng(0).integers(0, shape["vocab_size"], 2_000_000, dtype=np.uint16)
    for split in ("train", "val"):
        tokens.tofile(folder / "data" / "bench" / f"{split}.bin")
    flags = [f"--{k}={v}" for k, v in shape.items() if k != "vocab_size"]
    cmd = [sys.executable, "train.py", "--dataset=bench", f"--device={device}", f"--compile={compile_}",
           f"--dtype={'bfloat16' if device == 'cuda' else 'float32'}", f"--batch_size={batch}", "--dropout=0.0",
           "--gradient_accumulation_steps=1", f"--max_iters={iters}", "--eval_interval=100000", "--eval_iters=1",
           "--log_interval=1", "--always_save_checkpoint=False", "--out_dir=out", *flags]
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed:\n{out.stderr[-2000:]}")
    times = [float(line.split("time ")[1].split("ms")[0]) for line in out.stdout.splitlines() if line.startswith("iter ")]
    return statistics.median(times[warmup:])


def decoders(shape, device):
    """Our GPT and transformers' GPT2LMHeadModel with the same weights, GPT-2's layout, bfloat16 on a GPU."""
    import transformers
    from model.hf import hf_weights
    torch.manual_seed(0)
    config = dict(shape, vocab_size=50257 if shape["vocab_size"] == 50304 else shape["vocab_size"], bias=True,
                  activation="gelu_tanh")
    ours = GPT(GPTConfig(**config)).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config["vocab_size"], n_positions=config["block_size"], n_embd=config["n_embd"],
        n_layer=config["n_layer"], n_head=config["n_head"], activation_function="gelu_new", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)).eval()
    hf.load_state_dict(hf_weights(ours), strict=False)  # the tied head is the token embedding
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return ours.to(device, dtype), hf.to(device, dtype)


def timed(fn, device):
    fn()  # warm-up: compiles, allocates
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def decode(ours, hf, batch, new_tokens, device, compile_):
    """tokens/s of each decoder for `batch` greedy sequences of new_tokens, and whether all agree."""
    prompt = torch.randint(ours.config.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(0)).to(device)
    hf_args = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0)
    runs = {"ours, eager KV cache": lambda: generate(ours, prompt, new_tokens, temperature=0.0)}
    if compile_:
        runs["ours, compiled static cache"] = lambda: generate(ours, prompt, new_tokens, temperature=0.0, compiled=True)
    runs["transformers, default cache"] = lambda: hf.generate(prompt, **hf_args)
    runs["transformers, static cache"] = lambda: hf.generate(prompt, cache_implementation="static", **hf_args)
    results, outputs = {}, []
    with torch.inference_mode():
        for name, fn in runs.items():
            seconds, out = timed(fn, device)
            results[name] = batch * new_tokens / seconds
            outputs.append(out[:, prompt.size(1):].cpu())
    return results, all(torch.equal(outputs[0], o) for o in outputs)


def chip(device, args):
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    known = next((v for k, v in CHIPS.items() if k in name), None)
    peak, bandwidth = (args.peak_tflops * 1e12, args.hbm_tbps * 1e12) if args.peak_tflops else known or (None, None)
    return name, peak, bandwidth


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--nanogpt", default="", help="a nanoGPT checkout (train.py, model.py, configurator.py)")
    parser.add_argument("--dry_run", action="store_true", help="the tiny size on the CPU: checks that every path runs")
    parser.add_argument("--no_compile", action="store_true", help="leave torch.compile out (a quick dry run)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating training rounds, ours then nanoGPT")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="a chip not in CHIPS: its dense bf16 peak")
    parser.add_argument("--hbm_tbps", type=float, default=0.0, help="... and its memory bandwidth, TB/s")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --dry_run to check the script on the CPU", file=sys.stderr)
        return 2
    shape, compile_ = SIZES["tiny" if args.dry_run else "gpt2"], not args.no_compile
    batch, iters, warmup, new_tokens = (2, 6, 3, 8) if args.dry_run else (12, 60, 20, 200)
    name, peak, bandwidth = chip(device, args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.rounds + 1):
            ms, per_token = train_ours(shape, device, batch, iters, warmup, compile_)
            rows.append(train_row(f"training, ours, round {r}", ms, batch * shape["block_size"], per_token, peak))
            if args.nanogpt:
                ms = train_nanogpt(args.nanogpt, shape, device, batch, iters, warmup, compile_, Path(tmp))
                rows.append(train_row(f"training, nanoGPT, round {r}", ms, batch * shape["block_size"], per_token, peak))
    ours, hf = decoders(shape, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    agree = True
    for b in (1, 8):
        results, same = decode(ours, hf, b, new_tokens, device, compile_)
        agree &= same
        for case, tokens_per_s in results.items():
            limit = b * bandwidth / weight_bytes if bandwidth else None
            rows.append({"case": f"decoding batch {b}, {case}", "tokens_per_s": tokens_per_s,
                         "memory_limit_share": tokens_per_s / limit if limit else ""})
    notes = (f"{name}; torch {torch.__version__}. MFU against {peak / 1e12:.0f} TFLOP/s dense bf16." if peak else
             f"{name}: no peak known, no MFU.") + (" nanoGPT not run (no --nanogpt)." if not args.nanogpt else "") + (
        f" Greedy tokens the same from every decoder: {agree}.")
    write_results("gpu_dry_run" if args.dry_run else "gpu", rows,
                  ["case", "ms_per_iter", "tokens_per_s", "mfu", "memory_limit_share"], notes)
    return 0


def train_row(case, ms, tokens_per_iter, per_token, peak):
    tokens_per_s = tokens_per_iter / (ms / 1000)
    return {"case": case, "ms_per_iter": ms, "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * per_token / peak if peak else ""}


if __name__ == "__main__":
    sys.exit(main())
