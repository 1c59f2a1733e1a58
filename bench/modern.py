"""At Qwen2.5-0.5B's shape (24 layers, 896 channels, 14 heads sharing 2 key/value heads,
intermediate 4864, vocabulary 151,936, tied head, RoPE theta 1e6), random weights (nothing is
downloaded), on the CPU, float32:

- greedy generation, batch 1, a 16-token prompt and 64 new tokens: our generate() on the model as
  sample.py opens the folder (model.hf, model/quantize.py's float32 decoding weights) against transformers'
  Qwen2ForCausalLM.generate on the same folder, alternately in one process, the same tokens;
- one fine-tuning step (forward, backward, clipping, fused AdamW) at 2 x 256 tokens: seconds a
  step and the process's peak RSS, in a process of its own.

    python bench/modern.py [--rounds 2]      # needs pip install -e ".[hf]"; about 4 GB of memory
"""

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from common import ROOT, run_case, write_results

sys.path.insert(0, str(ROOT))
from model import GPT, GPTConfig  # noqa: E402
from model.checkpoint import open_model  # noqa: E402
from model.runtime import peak_memory_mb  # noqa: E402
from model.engine import generate  # noqa: E402
from model.trainer import train_step  # noqa: E402

QWEN = dict(n_layer=24, n_embd=896, n_head=14, n_kv_head=2, intermediate_size=4864, vocab_size=151936,
            block_size=32768, rope_theta=1e6, positions="rope", normalization="rmsnorm", mlp="gated",
            activation="silu", bias=False, qkv_bias=True, head="tied", layer_norm_eps=1e-6)
PROMPT, NEW_TOKENS, BATCH, T = 16, 64, 2, 256


def hf_folder(folder):
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    from model.tokenizer import train_bpe  # a folder needs a tokenizer; the timings use token ids only
    train_bpe(iter(["a small text for a small tokenizer, 天行健 "] * 50), 270).tok.save(f"{folder}/tokenizer.json")
    return model


def generation(rounds):
    with tempfile.TemporaryDirectory() as folder:
        hf = hf_folder(folder)
        ours = open_model(folder, quiet=True, dtype="float32").model
    prompt = torch.randint(151936, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            mine = generate(ours, prompt, NEW_TOKENS, temperature=0.0)
            ours_s = time.perf_counter() - start
            start = time.perf_counter()
            theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            hf_s = time.perf_counter() - start
            rows.append({"round": r, "ours_tok_s": NEW_TOKENS / ours_s, "hf_tok_s": NEW_TOKENS / hf_s,
                         "same_tokens": bool(torch.equal(mine, theirs))})
    return rows


def finetune_step(steps=3):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**QWEN, dropout=0.0)).train()
    optimizer = model.configure_optimizers(0.1, 1e-5, (0.9, 0.95), "cpu")
    x = torch.randint(151936, (BATCH, T + 1), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, [(x[:, :-1], x[:, 1:])], 1e-5, 1.0)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "peak_rss_mb": peak_memory_mb("cpu"),
            "parameters": model.num_params()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", choices=["generation", "finetune"])
    args = parser.parse_args()
    if args.case == "generation":
        print(json.dumps(generation(args.rounds)))
        return 0
    if args.case == "finetune":
        print(json.dumps(finetune_step()))
        return 0
    rows = run_case(ROOT / "bench" / "modern.py", "generation", f"--rounds={args.rounds}")
    step = run_case(ROOT / "bench" / "modern.py", "finetune")
    ratio = statistics.median(r["ours_tok_s"] for r in rows) / statistics.median(r["hf_tok_s"] for r in rows)
    write_results("modern", rows, ["round", "ours_tok_s", "hf_tok_s", "same_tokens"],
                  f"Qwen2.5-0.5B's shape ({step['parameters']:,} parameters), CPU, {torch.get_num_threads()} threads. "
                  f"Greedy generation, ours / transformers tokens/s: {ratio:.2f} (medians; goal >= 1.0). One fine-tuning "
                  f"step at {BATCH} x {T} tokens: {step['step_s']:.1f} s (first {step['first_step_s']:.1f} s), peak RSS "
                  f"{step['peak_rss_mb']:,.0f} MB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
