"""Why `python -m model.serve` runs the model in its main thread: one decoding step (a forward
pass over a ragged KV cache, the server's) at the Shakespeare-char size (6 x 384, block 256),
batch 1 and 16, called from the main thread and from a second thread, alternating.

    python bench/thread_forward.py
"""

import statistics
import sys
import threading
import time

import torch

from common import ROOT, write_results

sys.path.insert(0, str(ROOT))
from model import GPT, GPTConfig  # noqa: E402
from model.engine import new_cache  # noqa: E402
from model.quantize import for_decoding  # noqa: E402

ROUNDS, STEPS = 3, 40


def step_ms(model, batch):
    """ms per decoding step for `batch` rows of about 100 cached tokens each."""
    with torch.inference_mode():
        cache = new_cache(model, batch, kind="ragged")
        for row in range(batch):
            cache.use(row, row + 1)
            model(torch.randint(65, (1, 100 + row)), kv_cache=cache)
        ids = torch.randint(65, (batch, 1))
        for _ in range(3):  # warm-up
            cache.use(0, batch)
            model(ids, kv_cache=cache)
        start = time.perf_counter()
        for _ in range(STEPS):
            cache.use(0, batch)
            model(ids, kv_cache=cache)
        return (time.perf_counter() - start) / STEPS * 1000


def in_thread(model, batch):
    out = []
    thread = threading.Thread(target=lambda: out.append(step_ms(model, batch)))
    thread.start()
    thread.join()
    return out[0]


def main():
    torch.manual_seed(0)
    model = for_decoding(GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65,
                                       bias=False)).eval(), "float32")
    rows = []
    for batch in (1, 16):
        times = {"main": [], "thread": []}
        for _ in range(ROUNDS):
            times["main"].append(step_ms(model, batch))
            times["thread"].append(in_thread(model, batch))
        main_ms, thread_ms = statistics.median(times["main"]), statistics.median(times["thread"])
        rows.append({"batch": batch, "main_ms": main_ms, "thread_ms": thread_ms, "thread_over_main": thread_ms / main_ms})
    write_results("thread_forward", rows, ["batch", "main_ms", "thread_ms", "thread_over_main"],
                  f"ms per decoding step, medians of {ROUNDS} alternating rounds of {STEPS} steps; "
                  f"{torch.get_num_threads()} torch threads.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
