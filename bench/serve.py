"""Serving throughput: tokens/s streamed to 1, 4 and 16 concurrent greedy clients by
`python -m model.serve`, at nanoGPT's Shakespeare-char size (block_size 256, n_layer 6, n_head 6,
n_embd 384, 65 characters), random weights. Each client streams ROUNDS completions of
NEW_TOKENS tokens one after another; tokens/s is every client's tokens over the wall time. The
three cases take turns, PASSES times over (the machine's load drifts); the ratio is of medians.

    python bench/serve.py                 # on the CPU; goal: 16 clients get >= 6x the tokens/s of 1
"""

import http.client
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import ROOT, write_results

sys.path.insert(0, str(ROOT))
from model import GPT, GPTConfig  # noqa: E402

NEW_TOKENS, ROUNDS, CLIENTS, PASSES = 200, 2, (1, 4, 16), 3
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Shakespeare's 65


def write_model(folder):
    """A nanoGPT-style checkpoint and its meta.pkl (the character vocabulary)."""
    torch.manual_seed(0)
    args = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False, vocab_size=len(CHARS), dropout=0.0)
    torch.save({"model": GPT(GPTConfig(**args)).state_dict(), "model_args": args}, folder / "ckpt.pt")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(CHARS), "itos": dict(enumerate(CHARS)), "stoi": {c: i for i, c in enumerate(CHARS)}}, f)


def start_server(folder):
    """`python -m model.serve` on a free port -> (the process, its port)."""
    proc = subprocess.Popen([sys.executable, "-m", "model.serve", f"--ckpt={folder / 'ckpt.pt'}",
                             f"--meta={folder / 'meta.pkl'}", "--device=cpu", "--port=0", "--model_name=bench"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("the server ended before serving")
    return proc, int(line.split(" at ")[1].split("/ ")[0].rsplit(":", 1)[1])


def stream(port, prompt):
    """One streamed greedy completion -> the tokens it brought (from its usage chunk)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": "bench", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    tokens, response = 0, conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]}")
    for line in response:
        if line.startswith(b"data: {") and b'"usage"' in line:  # the last chunk: a light client reads only it
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    conn.close()
    return tokens


def measure(port, clients):
    prompts = [f"{CHARS[13 + i:18 + i]} speaks:" for i in range(clients)]  # a different prompt a client
    stream(port, "warm up")
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda p: sum(stream(port, p) for _ in range(ROUNDS)), prompts))
    seconds = time.perf_counter() - start
    assert tokens == clients * ROUNDS * NEW_TOKENS, f"{tokens} tokens came back"
    return {"clients": clients, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp))
        proc, port = start_server(Path(tmp))
        try:
            rows = [dict(measure(port, n), run=run) for run in range(1, PASSES + 1) for n in CLIENTS]
        finally:
            proc.terminate()
            proc.wait(30)
    median = {n: statistics.median(r["tokens_per_s"] for r in rows if r["clients"] == n) for n in CLIENTS}
    write_results("serve", rows, ["run", "clients", "tokens", "seconds", "tokens_per_s"],
                  f"Median tokens/s: {', '.join(f'{n} clients {v:,.0f}' for n, v in median.items())}. 16 concurrent "
                  f"clients: {median[16] / median[1]:.1f}x the tokens/s of 1 (goal: at least 6x). Streamed greedy "
                  f"completions of {NEW_TOKENS} tokens, {ROUNDS} a client, one server on this machine's CPU.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
