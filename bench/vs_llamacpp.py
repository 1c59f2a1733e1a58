"""Decoding on the CPU against llama.cpp: the same model in both, at GPT-2 124M's shape and at
Qwen2.5-0.5B's, random weights (nothing is downloaded).

Each shape is written once (bench/out/vs_llamacpp/): our checkpoint, its Hugging Face folder, and
its GGUF files in f32, bf16 and q8_0 made by our writer (python -m model.convert --to=gguf). Two
worker processes, ours (open_model, decoding through the engine as sample.py does) and llama.cpp's
(llama-cpp-python, its C API: eval a token, take the argmax of its logits), take turns in each
round, each opening its file once per precision: float32 / f32, bfloat16 / bf16, int8 / q8_0.
Measured for each: batch-1 greedy decoding of 200 tokens after a 16-token prompt, tokens/s; the
prefill of a 512-token prompt, tokens/s; how many of the 200 tokens are the same in both, and how
many of ours are those of our float32 weights; and the read roofline: the weights a token reads,
over the memory read speed measured by torch in the same run. Peak RSS when opening (our
checkpoint and the folder, each in a fresh process) against the weights' size and torch's own
baseline.

    python bench/vs_llamacpp.py [--shapes gpt2,qwen] [--rounds 2]   # needs the dev and gguf extras
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, write_results

sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out" / "vs_llamacpp"
SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024, activation="gelu_tanh"),
    "qwen": dict(n_layer=24, n_embd=896, n_head=14, n_kv_head=2, intermediate_size=4864, vocab_size=151936,
                 block_size=32768, rope_theta=1e6, positions="rope", normalization="rmsnorm", mlp="gated",
                 activation="silu", bias=False, qkv_bias=True, head="tied", layer_norm_eps=1e-6),
}
PRECISIONS = (("float32", "f32", 4), ("bfloat16", "bf16", 2), ("int8", "q8_0", 1))  # ours, llama.cpp's, bytes a weight
NEW_TOKENS, PROMPT, PREFILL, THREADS = 200, 16, 512, 2


# ---- the files ----------------------------------------------------------------------------

def prepare(shape):
    """bench/out/vs_llamacpp/SHAPE/: ckpt.pt, hf/ and SHAPE-{f32,bf16,q8_0}.gguf, written once."""
    from model.checkpoint import Checkpoint, save_checkpoint
    from model.convert import main as convert
    from model.gpt import GPT, GPTConfig
    from model.tokenizer import CharTokenizer
    folder = OUT / shape
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape]))
    with torch.no_grad():  # norms not all ones: a layout mistake in either program would show in the tokens
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln" in name or "norm" in name else 0.0))
    tok = CharTokenizer([chr(c) for c in range(0x4E00, 0x4E00 + 256)])  # the timings use token ids only
    save_checkpoint(Checkpoint(model.state_dict(), model.config, tok.to_dict(), {"type": "text"}), folder / "ckpt.pt")
    del model
    for _, outtype, _ in PRECISIONS:
        assert convert([str(folder / "ckpt.pt"), str(folder / f"{shape}-{outtype}.gguf"), "--to=gguf",
                        f"--outtype={outtype}"]) == 0
    assert convert([str(folder / "ckpt.pt"), str(folder / "hf"), "--to=hf"]) == 0
    (folder / "done").write_text("")
    return folder


# ---- the workers: one process each, taking commands as JSON lines -------------------------

class Ours:
    def load(self, path, precision):
        from model.checkpoint import open_model
        self.model = None
        self.model = open_model(path, "cpu", quiet=True, dtype=precision).model

    def decode(self, prompt, n):
        from model.engine import Engine, Request, Rules
        request = Request(prompt, Rules(max_tokens=n, temperature=0.0))
        Engine(self.model, max_batch=1).complete([request])
        return request.tokens

    def prefill(self, prompt):
        self.decode(prompt, 1)

    def bandwidth(self):
        """GB/s torch reads a 1 GiB tensor at (a sum: one pass, nothing written), the best of 5."""
        t = torch.ones(2 ** 28)
        best = 0.0
        for _ in range(5):
            start = time.perf_counter()
            t.sum()
            best = max(best, t.numel() * 4 / (time.perf_counter() - start) / 1e9)
        return best


class LlamaCpp:
    def load(self, path, precision):
        import llama_cpp
        import numpy as np
        self.np = np
        self.llm = None
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=PREFILL, n_threads=THREADS,
                                   n_threads_batch=THREADS, verbose=False)

    def decode(self, prompt, n):
        llm, np = self.llm, self.np
        llm.reset()
        llm.eval(prompt)
        out = []
        while True:
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            out.append(int(logits.argmax()))
            if len(out) == n:  # as the engine: the last token is chosen, not read
                return out
            llm.eval(out[-1:])

    def prefill(self, prompt):
        self.llm.reset()
        self.llm.eval(prompt)


def amx_cpu():
    """Whether the CPU has AMX, where llama-cpp-python 0.3.36 crashed on q8_0 files with llama.cpp's extra
    buffer types (tests/test_gguf.py): there they are off, as llama.cpp's --no-repack; elsewhere its default."""
    return Path("/proc/cpuinfo").is_file() and "amx_int8" in Path("/proc/cpuinfo").read_text()


def worker(kind):
    torch.set_num_threads(THREADS)
    if kind == "llama" and amx_cpu():  # Llama() has no argument for it: it reads these defaults
        import llama_cpp
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def params():
            p = defaults()
            p.use_extra_bufts = False
            return p
        llama_cpp.llama_cpp.llama_model_default_params = params
    runner = Ours() if kind == "ours" else LlamaCpp()
    for line in sys.stdin:
        cmd = json.loads(line)
        start = time.perf_counter()
        result = getattr(runner, cmd["do"])(*cmd.get("args", []))
        print(json.dumps({"seconds": time.perf_counter() - start, "result": result}), flush=True)


class Worker:
    def __init__(self, kind):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", kind], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def __call__(self, do, *args):
        self.proc.stdin.write(json.dumps({"do": do, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker ended while running {do}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


# ---- memory at open -----------------------------------------------------------------------

def status_mb(field):
    """VmRSS (now) or VmHWM (the peak) of this process, from Linux's /proc (getrusage's peak would be
    the parent's: Linux keeps it across exec)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def open_memory(path, precision):
    """In a fresh process: RSS before opening (torch, its compiler and our modules started), the peak
    through opening and writing one token (a mapped file's pages count once they are read), and the
    bytes of the tensors the opened model holds."""
    from model.checkpoint import open_model
    from model.engine import Rules, complete
    from model.quantize import COMPILED_FROM, few_rows
    few_rows(torch.ones(1, 1024), torch.ones(COMPILED_FROM // 1024, 1024), None)  # torch and its compiler started
    before = status_mb("VmRSS")
    model = open_model(path, "cpu", quiet=True, dtype=precision).model
    complete(model, [[0]], Rules(max_tokens=1, temperature=0.0))
    peak = status_mb("VmHWM")
    seen, size = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            size += t.numel() * t.element_size()
    return {"baseline_mb": before, "peak_mb": peak, "weights_mb": size / 2 ** 20}


def memory_rows(folder, shape):
    rows = []
    for source, path in (("ckpt.pt", folder / "ckpt.pt"), ("hf folder", folder / "hf")):
        for precision in ("float32", "bfloat16", "int8"):
            out = subprocess.run([sys.executable, __file__, "--memory", str(path), precision], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"shape": shape, "source": source, "dtype": precision, **m,
                         "peak_over_baseline": (m["peak_mb"] - m["baseline_mb"]) / m["weights_mb"]})
    return rows


# ---- the comparison -----------------------------------------------------------------------

def weights_read(shape, bytes_per_weight):
    """Bytes one decoding step reads: every matrix (the tied head's once), in the stored type."""
    from model.gpt import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(**SHAPES[shape]))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    scales = sum(m.out_features for m in linears) * 4 if bytes_per_weight == 1 else 0  # int8: a float32 a row
    return sum(m.weight.numel() for m in linears) * bytes_per_weight + scales


def compare(shape, folder, rounds):
    ours, theirs = Worker("ours"), Worker("llama")
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[shape]["vocab_size"]
    prompt = torch.randint(vocab, (PROMPT,), generator=g).tolist()
    long = torch.randint(vocab, (PREFILL,), generator=g).tolist()
    rows, exact = [], None  # exact: our float32 tokens, which the other precisions are held to
    try:
        for precision, outtype, nbytes in PRECISIONS:
            ours("load", str(folder / "ckpt.pt"), precision)
            theirs("load", str(folder / f"{shape}-{outtype}.gguf"), outtype)
            for w in (ours, theirs):  # warm-up: compiled kernels, first allocations
                w("decode", prompt, 4)
                w("prefill", long[:64])
            runs = []
            for _ in range(rounds):
                mine, other = ours("decode", prompt, NEW_TOKENS), theirs("decode", prompt, NEW_TOKENS)
                fill_mine, fill_other = ours("prefill", long), theirs("prefill", long)
                bandwidth = ours("bandwidth")["result"]
                runs.append((mine, other, fill_mine, fill_other, bandwidth))
            med = lambda i: statistics.median(r[i]["seconds"] for r in runs)  # noqa: E731
            bandwidth = statistics.median(r[4] for r in runs)
            mine, other = runs[0][0]["result"], runs[0][1]["result"]
            differ = [i for i, (a, b) in enumerate(zip(mine, other)) if a != b]
            exact = exact or mine
            ours_same = sum(a == b for a, b in zip(mine, exact))
            roofline = bandwidth * 1e9 / weights_read(shape, nbytes)
            row = {"shape": shape, "precision": f"{precision} / {outtype}",
                   "ours_tok_s": NEW_TOKENS / med(0), "llama_tok_s": NEW_TOKENS / med(1),
                   "ours_prefill_tok_s": PREFILL / med(2), "llama_prefill_tok_s": PREFILL / med(3),
                   "roofline_tok_s": roofline, "same_tokens": f"{NEW_TOKENS - len(differ)}/{NEW_TOKENS}" + (
                       f" (first differs at {differ[0]})" if differ else ""),
                   "ours_same_as_float32": f"{ours_same}/{NEW_TOKENS}"}
            row["decode_ratio"] = row["ours_tok_s"] / row["llama_tok_s"]
            row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["llama_prefill_tok_s"]
            row["ours_of_roofline"] = row["ours_tok_s"] / roofline
            row["llama_of_roofline"] = row["llama_tok_s"] / roofline
            row["bandwidth_gb_s"] = bandwidth
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        ours.close()
        theirs.close()
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="gpt2,qwen")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "llama"])
    parser.add_argument("--memory", nargs=2, metavar=("PATH", "DTYPE"))
    parser.add_argument("--no-memory", action="store_true", help="leave out the memory-at-open rows")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.memory:
        print(json.dumps(open_memory(*args.memory)))
        return 0
    rows, memory = [], []
    for shape in args.shapes.split(","):
        folder = prepare(shape)
        rows += compare(shape, folder, args.rounds)
        if not args.no_memory:
            memory += memory_rows(folder, shape)
    write_results("vs_llamacpp", rows, ["shape", "precision", "ours_tok_s", "llama_tok_s", "decode_ratio",
                                        "roofline_tok_s", "ours_of_roofline", "llama_of_roofline",
                                        "ours_prefill_tok_s", "llama_prefill_tok_s", "prefill_ratio", "same_tokens",
                                        "ours_same_as_float32"],
                  f"Batch 1, greedy, {NEW_TOKENS} tokens after a {PROMPT}-token prompt; prefill of {PREFILL} tokens; "
                  f"{THREADS} threads each; medians of {args.rounds} rounds, ours and llama.cpp taking turns. "
                  f"Roofline: the weights one token reads over torch's read speed in the same run "
                  f"({statistics.median(r['bandwidth_gb_s'] for r in rows):.1f} GB/s). llama.cpp's extra buffer "
                  f"types: {'off (AMX CPU)' if amx_cpu() else 'on (its default)'}.")
    if memory:
        write_results("vs_llamacpp_memory", memory, ["shape", "source", "dtype", "baseline_mb", "peak_mb",
                                                     "weights_mb", "peak_over_baseline"],
                      "Peak RSS through opening (open_model) and writing one token, in a fresh process each; "
                      "baseline: torch, its compiler (one kernel built) and our modules started; peak_over_baseline: "
                      "(peak - baseline) / the opened model's weights.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
