"""Speed against Hugging Face transformers at GPT-2 124M size (12 layers, 12 heads, 768 channels,
vocabulary 50257, 1024 positions), random weights (nothing downloaded), on the CPU, the two
measured alternately in one process:

- generation: 200 new tokens, batch 1, greedy, KV cache: our generate() on the model as sample.py
  opens it (model/quantize.py's float32 decoding weights) against GPT2LMHeadModel.generate(use_cache=True, do_sample=False);
- one training step: forward, backward and AdamW on a batch of 4 x 256 tokens: our train_step
  (fused CPU AdamW) against GPT2LMHeadModel(input_ids, labels=...) and torch's AdamW as
  transformers' Trainer uses it.

    python bench/vs_transformers.py [--rounds 2]      # needs pip install -e ".[hf]"
"""

import argparse
import copy
import statistics
import sys
import time

import torch

from common import ROOT, write_results

sys.path.insert(0, str(ROOT))
from model import GPT, GPTConfig  # noqa: E402
from model.quantize import for_decoding  # noqa: E402
from model.engine import generate  # noqa: E402
from model.trainer import train_step  # noqa: E402

NEW_TOKENS, BATCH, T = 200, 4, 256


def models():
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # GPT-2 124M's shape
    ours = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, activation="gelu_tanh")).eval()
    return ours, hf


def time_generation(ours, hf):
    prompt = torch.tensor([[464]])
    start = time.perf_counter()
    mine = generate(ours, prompt, NEW_TOKENS, temperature=0.0)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0)
    hf_s = time.perf_counter() - start
    assert mine.size(1) == theirs.size(1) == NEW_TOKENS + 1
    return NEW_TOKENS / ours_s, NEW_TOKENS / hf_s


def time_training(ours, hf, optimizers, steps=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(50257, (BATCH, T + 1), generator=g)  # both models read T tokens
    ours.train()
    hf.train()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(ours, optimizers[0], [(x[:, :-1], x[:, 1:])], 1e-4, 1.0)
    ours_s = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for _ in range(steps):
        loss = hf(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizers[1].step()
        optimizers[1].zero_grad(set_to_none=True)
    hf_s = (time.perf_counter() - start) / steps
    ours.eval()
    hf.eval()
    return ours_s, hf_s


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours, hf = models()
    optimizers = (ours.configure_optimizers(0.1, 1e-4, (0.9, 0.95), "cpu"),
                  torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95)))
    time_training(ours, hf, optimizers, steps=1)  # warm-up: allocations, optimizer state
    decoder = for_decoding(copy.deepcopy(ours), "float32")  # as sample.py opens a model on the CPU
    with torch.no_grad():
        generate(decoder, torch.tensor([[464]]), 4, temperature=0.0)
    rows = []
    for r in range(1, args.rounds + 1):
        with torch.no_grad():
            gen_ours, gen_hf = time_generation(decoder, hf)
        step_ours, step_hf = time_training(ours, hf, optimizers)
        rows.append({"round": r, "gen_ours_tok_s": gen_ours, "gen_hf_tok_s": gen_hf,
                     "step_ours_s": step_ours, "step_hf_s": step_hf})
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0] if k != "round"}
    write_results("vs_transformers", rows, ["round", "gen_ours_tok_s", "gen_hf_tok_s", "step_ours_s", "step_hf_s"],
                  f"GPT-2 124M, CPU, {torch.get_num_threads()} threads. Generation, ours / transformers tokens/s: "
                  f"{med['gen_ours_tok_s'] / med['gen_hf_tok_s']:.2f} (goal >= 1). Training step time, transformers / "
                  f"ours: {med['step_hf_s'] / med['step_ours_s']:.2f} (goal >= 1). Medians over the rounds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
