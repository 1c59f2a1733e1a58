"""Choosing the next token: temperature, top-k, top-p, and generate() with a KV cache."""

import torch
from torch.nn import functional as F


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=1.0):
    """logits (B, V) -> probabilities (B, V) to sample from: softmax(logits / temperature),
    keeping only the top_k most likely tokens and then the smallest set of most likely tokens
    whose probability reaches top_p (the rest get 0)."""
    logits = logits / temperature
    if top_k is not None:
        k = min(top_k, logits.size(-1))  # a k beyond the vocabulary keeps everything
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above
        drop_sorted = before >= top_p  # the set already reached p without this token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=1.0, generator=None):
    """logits (B, V) -> next token ids (B, 1). temperature 0 is greedy: always the argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = next_token_probs(logits.float(), temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def compiled_step(model):
    """The model compiled for one-token steps over a StaticKVCache: the shapes never change, so it
    compiles once, and on CUDA the step runs as one CUDA graph (no launch per kernel)."""
    mode = "reduce-overhead" if model.lm_head.weight.is_cuda else None
    return torch.compile(model, dynamic=False, fullgraph=True, mode=mode)


@torch.inference_mode()  # no autograd bookkeeping at all: a few percent faster than no_grad when decoding
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0,
             generator=None, use_cache=True, on_token=None, vocab_limit=None, banned=None, stop_id=None,
             compiled=False):
    """Extend idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).

    The model reads a window of at most block_size recent tokens. When the window is full it
    drops its older half and goes on (one recompute of the kept half, then one token per step
    again), so the KV cache stays useful past block_size; with use_cache=False every step
    recomputes the same window from scratch, giving the same tokens more slowly.
    on_token(ids (B, 1)) is called after each new token, for streaming. With vocab_limit, ids
    from vocab_limit on (a model's vocabulary padded past its tokenizer's) are never drawn, nor
    are the `banned` ids (e.g. BERT's [CLS] and [SEP]). With stop_id (an end-of-turn token), it
    stops early once every row has written it (rows that ended first go on: cut them there).
    compiled: one-token steps through compiled_step(model) over a StaticKVCache of block_size
    slots (the same tokens; it pays a compile first, and wins on a GPU)."""
    was_training = model.training
    model.eval()
    step = compiled_step(model) if compiled else model
    block_size = model.config.block_size
    start = max(0, idx.size(1) - block_size)  # where the window begins in idx
    cache = None
    ended = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if idx.size(1) - start > block_size:
            start = idx.size(1) - max(1, block_size // 2)  # window full: keep its newer half
            cache = None
        if not use_cache:
            logits, _ = model(idx[:, start:])
        elif cache is None:
            length = block_size if compiled else min(block_size, idx.size(1) - start + max_new_tokens)
            cache = model.new_kv_cache(idx.size(0), length, kind="static" if compiled else "plain")
            logits, _ = model(idx[:, start:], kv_cache=cache)
        else:
            logits, _ = step(next_id, kv_cache=cache)  # the token just chosen (B, 1)
        logits = logits[:, -1, :vocab_limit]
        if banned:
            logits[:, banned] = float("-inf")
        next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, next_id], dim=1)
        if on_token is not None:
            on_token(next_id)
        if stop_id is not None:
            ended |= next_id[:, 0] == stop_id
            if ended.all():
                break
    model.train(was_training)
    return idx
