"""Decoding: the one engine every command generates tokens with.

Read top to bottom:
- the KV caches: the keys and values a generation keeps, so each step feeds only the new token
  (plain; static, for compiled steps; ragged, rows of different lengths for continuous batching);
- choosing the next token: temperature, top-k, top-p;
- Rules: how one request decodes and where it stops, as plain data;
- TextStream: a reply's text as its tokens come, held back where a stop string may begin;
- generate(): the decoding loop in a few lines, for reading (and compiled decoding on a GPU);
- Engine: many requests decoded together (continuous batching). sample.py, the server,
  evaluation during training and the report all decode through it.

Shapes: B = batch (rows), T = new tokens, V = vocabulary, nkv = key/value heads, hs = head size.
"""

import threading
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch.nn import functional as F


# ---- the KV caches ------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer for the tokens seen so far. Each layer's store is
    (B, nkv, length, hs): with grouped-query attention it holds only the shared heads. Every row
    has the same length: the tokens of a step take the positions after the cached ones, and the
    usual causal mask applies. The model calls start(), append() for each layer, then advance()."""
    length = 0  # tokens stored so far (the position of the next token)

    def __init__(self, config, batch_size, device, dtype, length=None):
        shape = (batch_size, config.n_kv_head, length or config.block_size, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    def start(self, T, device):
        """A step of T new tokens begins -> (their positions (T,), None: the usual causal mask)."""
        return torch.arange(self.length, self.length + T, dtype=torch.long, device=device), None

    def append(self, layer, k, v):
        """Store k, v (B, nkv, T, hs) after the cached ones; return all keys and values so far."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, T):
        self.length += T


class StaticKVCache(KVCache):
    """A KV cache whose every step has the same shapes, for torch.compile and CUDA graphs: the
    next position is a tensor on the device (no Python number changes between steps, so nothing
    recompiles and the host never waits), and each step reads all `length` slots, the ones not
    written yet masked out. Every row is at the same position, as in generate()."""

    def __init__(self, config, batch_size, device, dtype, length=None):
        super().__init__(config, batch_size, device, dtype, length)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        for t in (*self.keys, *self.values, self.pos):  # updated in place: a CUDA graph may keep their addresses
            torch._dynamo.mark_static_address(t)

    @property
    def length(self):
        return int(self.pos)  # the host reads it only for forward's checks, which compiled code skips

    def start(self, T, device):
        """-> (positions (T,), mask (T, slots)): query t sees the slots up to its own position."""
        pos = self.pos + torch.arange(T, device=device)
        return pos, torch.arange(self.keys[0].size(2), device=device) <= pos[:, None]

    def append(self, layer, k, v):
        where = self.pos + torch.arange(k.size(2), device=k.device)
        self.keys[layer].index_copy_(2, where, k)
        self.values[layer].index_copy_(2, where, v)
        return self.keys[layer], self.values[layer]

    def advance(self, T):
        self.pos += T


class RaggedKVCache(KVCache):
    """A KV cache whose rows are sequences of different lengths, for continuous batching: requests
    join and leave a running batch between steps. A step runs on the rows use(a, b) picks, each
    row's new tokens at its own positions, each query seeing only its own row's keys up to itself."""

    def __init__(self, config, batch_size, device, dtype, length=None):
        super().__init__(config, batch_size, device, dtype, length)
        self.lengths = [0] * batch_size  # tokens stored in each row
        self.rows = slice(0, batch_size)

    def use(self, a, b):
        """The next steps run on rows a .. b - 1 (their tokens are the batch's rows, in order)."""
        self.rows = slice(a, b)
        self.length = max(self.lengths[self.rows])  # the longest row: what the model checks against block_size

    def start(self, T, device):
        """-> (positions (B, T), mask (B, 1, T, S)): query t of row b sees keys 0 .. lengths[b] + t.
        Rows all at one position (one sequence, or samples of one prompt) take the plain cache's way
        (positions (T,), the usual causal mask): the same numbers, without the mask's cost."""
        lengths = self.lengths[self.rows]
        if min(lengths) == max(lengths):
            self.pos = None
            return super().start(T, device)
        past = torch.tensor(lengths, dtype=torch.long, device=device)
        self.pos = past[:, None] + torch.arange(T, device=device)  # (B, T)
        keys = torch.arange(self.length + T, device=device)
        return self.pos, keys[None, None, None, :] <= self.pos[:, None, :, None]

    def append(self, layer, k, v):
        """Store k, v (B, nkv, T, hs) at each row's positions; return the rows' keys and values so far."""
        keys, values = self.keys[layer][self.rows], self.values[layer][self.rows]
        end = self.length + k.size(2)
        if self.pos is None:  # every row at self.length
            keys[:, :, self.length:end], values[:, :, self.length:end] = k, v
        else:
            where = self.pos[:, None, :, None].expand_as(k)
            keys.scatter_(2, where, k.to(keys.dtype))  # under autocast k may be bfloat16 in a float32 cache
            values.scatter_(2, where, v.to(values.dtype))
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, T):
        for i in range(self.rows.start, self.rows.stop):
            self.lengths[i] += T
        self.length += T

    def reset(self, row):
        self.lengths[row] = 0

    def move(self, src, dst):
        """Row src[i]'s cached tokens become row dst[i]'s (a finished request's row is refilled by the
        last one), for every layer in one copy; no row is both read and written."""
        n = max(self.lengths[i] for i in src)
        for store in (*self.keys, *self.values):
            store[dst, :, :n] = store[src, :, :n]
        for i, j in zip(src, dst):
            self.lengths[j] = self.lengths[i]

    @property
    def capacity(self):
        return self.keys[0].size(2)

    def grow(self, length):
        """Room for `length` tokens in every row; what the rows hold is kept."""
        if length <= self.capacity:
            return
        more = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], length - t.size(2), t.size(3))], dim=2)  # noqa: E731
        self.keys, self.values = [more(t) for t in self.keys], [more(t) for t in self.values]


CACHES = {"plain": KVCache, "ragged": RaggedKVCache, "static": StaticKVCache}


def norm_weight(model):
    """A norm's gain: on the device and in the dtype the model computes in (a model laid out for
    decoding keeps its matrices in another type, model/quantize.py)."""
    return model.transformer.h[0].ln_1.weight


def new_cache(model, batch_size, length=None, kind="plain"):
    """A cache for batch_size sequences of up to `length` tokens (default block_size), in the
    model's dtype and on its device; kind 'plain', 'static' (compiled decoding) or 'ragged'."""
    p = norm_weight(model)
    return CACHES[kind](model.config, batch_size, p.device, p.dtype, length)


# ---- choosing the next token --------------------------------------------------------------

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


@dataclass(frozen=True)
class Rules:
    """How one request is decoded. A model's task gives the rules that come from its vocabulary
    and template (stop_ids, banned, vocab_limit); the caller sets the rest with dataclasses.replace."""
    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0: greedy, always the most likely token
    top_k: Optional[int] = None  # draw only among the k most likely tokens
    top_p: float = 1.0  # draw only among the most likely tokens whose probabilities reach p
    seed: Optional[int] = None  # the request's own random numbers (None: torch's global generator)
    stop_ids: tuple = ()  # tokens that end the reply (an end of turn): kept in its tokens, never in its text
    stop: tuple = ()  # strings that end the reply; not part of its text
    banned: tuple = ()  # ids never drawn (a vocabulary's structure tokens, a chat template's markers)
    vocab_limit: Optional[int] = None  # ids from here on (a vocabulary padded past its tokenizer's) never drawn
    logprobs: Optional[int] = None  # keep each written token's log-probability and this many most likely others
    prompt_logprobs: Optional[int] = None  # the same for each prompt token after the first (when the prompt is read)


# ---- a reply's text as it comes -----------------------------------------------------------

class TextStream:
    """A reply's text as its tokens come, cut before the first stop string.

    Whole characters only: a byte-level token can end inside a character (Chinese is 3 bytes in
    UTF-8), so text waits until its bytes are complete, and no U+FFFD replacement character is ever
    sent for one cut in two. Each token decodes only a short window of recent ids (from `prefix`, a
    few tokens back), not the whole reply: time linear in its length; the window starts a little
    before the new text, so each token is decoded beside its neighbours as in the whole text
    (WordPiece's spaces, BERT's Chinese spacing). `context`: the ids before the reply (a
    completion's prompt). Text that may be the beginning of a stop string is held back until the
    next tokens show it is not."""

    def __init__(self, tokenizer, stop=(), context=()):
        self.tokenizer, self.stop, self.ids = tokenizer, [s for s in stop if s], list(context)
        self.prefix, self.read = max(0, len(self.ids) - 1), len(self.ids)  # the window's start; ids shown before read
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token_id):
        """-> (new text to send, whether a stop string was reached)."""
        self.ids.append(int(token_id))
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if not (text.endswith("\ufffd") or len(text) <= len(shown) or not text.startswith(shown)):
            self.text += text[len(shown):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.release()

    def finish(self):
        """The text still held back, at the end of the reply (bytes that never completed a character
        show as U+FFFD, as they would in the whole text's decoding)."""
        if self.stopped:
            return ""
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.text += text[len(shown):] if text.startswith(shown) else ""
        self.prefix = self.read = len(self.ids)
        return self.release(final=True)[0]

    def release(self, final=False):
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
        held = 0 if found or final else self.held_back()
        end = max(self.sent, len(self.text) - held)
        delta, self.sent = self.text[self.sent:end], end
        return delta, bool(found)

    def held_back(self):
        """The length of the longest unsent end of the text that a stop string begins with."""
        for n in range(min(len(self.text) - self.sent, max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0


# ---- generate(): the loop, for reading -----------------------------------------------------

def compiled_step(model):
    """The model compiled for one-token steps over a StaticKVCache: the shapes never change, so it
    compiles once, and on CUDA the step runs as one CUDA graph (no launch per kernel)."""
    mode = "reduce-overhead" if norm_weight(model).is_cuda else None
    return torch.compile(model, dynamic=False, fullgraph=True, mode=mode)


@torch.inference_mode()  # no autograd bookkeeping at all: a few percent faster than no_grad when decoding
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=1.0, generator=None,
             use_cache=True, compiled=False):
    """Extend idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens): the decoding loop
    in a few lines. The Engine decodes the same tokens (a test holds them equal); it is what the
    commands use, with rules for where a reply stops and which tokens are never drawn.

    The model reads a window of at most block_size recent tokens. When the window is full it
    drops its older half and goes on (one recompute of the kept half, then one token per step
    again), so the KV cache stays useful past block_size; with use_cache=False every step
    recomputes the same window from scratch, giving the same tokens more slowly. compiled:
    one-token steps through compiled_step(model) over a StaticKVCache of block_size slots (the
    same tokens; it pays a compile first, and wins on a GPU)."""
    was_training = model.training
    model.eval()
    step = compiled_step(model) if compiled else model
    block_size = model.config.block_size
    start, cache = max(0, idx.size(1) - block_size), None  # where the window begins in idx
    for _ in range(max_new_tokens):
        if idx.size(1) - start > block_size:
            start, cache = idx.size(1) - max(1, block_size // 2), None  # window full: keep its newer half
        if not use_cache:
            logits, _ = model(idx[:, start:])
        elif cache is None:
            length = block_size if compiled else min(block_size, idx.size(1) - start + max_new_tokens)
            cache = new_cache(model, idx.size(0), length, "static" if compiled else "plain")
            logits, _ = model(idx[:, start:], kv_cache=cache)
        else:
            logits, _ = step(next_id, kv_cache=cache)  # the token just chosen (B, 1)
        next_id = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)
        idx = torch.cat([idx, next_id], dim=1)
    model.train(was_training)
    return idx


# ---- requests and the engine --------------------------------------------------------------

@dataclass
class Scored:
    """A token's log-probability under the model (its own distribution: before temperature, top-k,
    top-p or banned tokens, as OpenAI's and vLLM's logprobs) and the most likely tokens' [(id, logprob)]."""
    logprob: float
    top: list


def scored(logits, targets, n):
    """logits (N, V), targets (N,) -> a Scored for each target, with the n most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, targets[:, None])[:, 0].tolist()
    values, ids = logp.topk(min(n, logp.size(-1)), dim=-1)
    return [Scored(c, list(zip(i, v))) for c, i, v in zip(chosen, ids.tolist(), values.tolist())]


class QueueFull(Exception):
    """Every place in the queue is taken: the request should come back later."""


@dataclass(eq=False)  # a request is itself, not its fields: the engine keeps requests in lists and sets
class Request:
    """One sequence to decode: its prompt's ids and its Rules. The engine writes `tokens` (a stop
    id that ends it included) and, when it ends, `reason`: "stop" (a stop id or string), "length"
    (max_tokens) or "error". With `text` (a TextStream), each piece of the reply's text goes to
    emit(("text", str)) as it comes; emit(("end", reason)) comes last, with or without text."""
    prompt: list
    rules: Rules
    text: Optional[TextStream] = None
    emit: Optional[Callable] = None
    tokens: list = field(default_factory=list)
    reason: Optional[str] = None
    cancelled: bool = False  # set by the caller's side when nobody waits for it any more
    start: int = 0  # where the model's window begins in prompt + tokens
    logprobs: list = field(default_factory=list)  # a Scored for each token written, when the rules ask
    prompt_logprobs: list = field(default_factory=list)  # a Scored for each prompt token (None: nothing predicts it)
    generator: Optional[torch.Generator] = field(default=None, repr=False)

    def add(self, token_id):
        """Take the next token; -> whether the request is finished (then "end" has been emitted)."""
        self.tokens.append(token_id)
        if token_id in self.rules.stop_ids:
            return self.end("stop")
        if self.text is not None:
            delta, stopped = self.text.add(token_id)
            if delta:
                self.send(("text", delta))
            if stopped:
                return self.end("stop")
        return len(self.tokens) >= self.rules.max_tokens and self.end("length")

    def end(self, reason):
        rest = self.text.finish() if self.text is not None else ""
        if rest:
            self.send(("text", rest))
        self.reason = reason
        self.send(("end", reason))
        return True

    def send(self, event):
        if self.emit is not None:
            self.emit(event)

    def reply(self):
        """The ids the reply consists of: its tokens without the stop id that ended it."""
        return without_stop(self.tokens, self.rules)


def without_stop(ids, rules):
    """ids (a reply, an answer) without the stop id that ends them, if one does."""
    return list(ids[:-1]) if len(ids) and ids[-1] in rules.stop_ids else list(ids)


class Engine:
    """Decodes requests together, up to max_batch rows at a time, over one ragged KV cache.

    Each round, requests that came take free rows, and every row gets its next token: rows that
    must read their window (a new prompt, a window gone past block_size, every row without the
    cache) read it, all in one forward pass; the others take one step together, each at its own
    position. A finished request leaves at once and the last row moves into its place, so the
    running rows are always the cache's first rows.

    complete(requests) decodes requests to their ends in the calling thread (sample.py,
    evaluation). A server submits requests from other threads and runs run() until stop(), in
    the main thread (a step called from another thread took 1.1-1.3x as long on this project's
    2-core machine, bench/thread_forward.py) or start() in a thread of its own."""

    def __init__(self, model, max_batch=16, max_queue=64, use_cache=True):
        self.model, self.max_batch, self.max_queue, self.use_cache = model, max_batch, max_queue, use_cache
        self.block_size = model.config.block_size
        self.device = norm_weight(model).device
        self.cache = new_cache(model, max_batch, 1, kind="ragged")  # it grows to what the requests need
        self.rows = []  # the running requests: request i's keys and values are the cache's row i
        self.waiting = deque()
        self.masks = {}  # (vocab_limit, banned, V) -> the ids those rules never draw
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = None

    # ---- from any thread ----

    def submit(self, *requests):
        """Queue requests, all or none: QueueFull when there is no room for them among max_queue."""
        with self.changed:
            if len(self.waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.extend(requests)
            self.changed.notify()

    def cancel(self, *requests):
        """Nobody waits for the requests: their rows (or places in the queue) are freed before the next round."""
        for request in requests:
            request.cancelled = True
        with self.changed:
            self.changed.notify()

    def stop(self):
        """run() returns before its next round (from any thread)."""
        with self.changed:
            self.stopped = True
            self.changed.notify()

    def start(self):
        self.thread = threading.Thread(target=self.run, name="decoder", daemon=True)
        self.thread.start()
        return self

    def run(self):
        """Decode what is submitted until stop(). A bug fails the requests it was decoding, not the server."""
        with torch.inference_mode():
            while True:
                with self.changed:
                    while not (self.stopped or self.rows or self.waiting):
                        # a timeout, so an idle main thread still sees a Ctrl-C the system gave another thread
                        # (Python runs signal handlers in the main thread only, between bytecodes)
                        self.changed.wait(timeout=0.5)
                    if self.stopped:
                        return
                    joining = self.take_waiting()
                try:
                    self.round(joining)
                except Exception:
                    traceback.print_exc()
                    for request in {*self.rows, *joining}:
                        if request.reason is None:
                            request.reason = "error"
                            request.send(("end", "error"))
                    self.rows = []

    # ---- in the decoding thread ----

    def complete(self, requests):
        """Decode the requests to their ends, in this thread; -> the requests, their tokens written."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                self.waiting.extend(requests)
                while self.rows or self.waiting:
                    self.round(self.take_waiting())
        finally:
            self.model.train(was_training)
        return requests

    def take_waiting(self):
        joining = []
        while self.waiting and len(self.rows) + len(joining) < self.max_batch:
            request = self.waiting.popleft()
            if not request.cancelled:
                joining.append(request)
        return joining

    def round(self, joining):
        """Every running row gets its next token (see the class docstring); finished rows leave."""
        for request in joining:
            request.start = max(0, len(request.prompt) - self.block_size)
            if request.rules.seed is not None and request.generator is None:
                request.generator = torch.Generator(self.device).manual_seed(request.rules.seed)
            if request.rules.max_tokens < 1:
                request.end("length")
        self.rows += [r for r in joining if r.reason is None]
        self.leave([i for i, r in enumerate(self.rows) if r.cancelled])
        joined = set(joining)
        stepping = self.order_rows({r for r in self.rows if r in joined or self.must_read(r)})
        if stepping:
            self.step(stepping)
        if stepping < len(self.rows):
            self.read(stepping, len(self.rows))
        self.leave([i for i, r in enumerate(self.rows) if r.reason is not None])

    def must_read(self, request):
        """Whether the row reads its window again: without the cache always, and once the next token
        would take the window past block_size (it then keeps its newer half)."""
        n = len(request.prompt) + len(request.tokens)
        if n - request.start > self.block_size:
            request.start = n - max(1, self.block_size // 2)
            return True
        return not self.use_cache

    def order_rows(self, reading):
        """The rows that step come first (their cache rows moved down, in order), the ones that read
        after; -> how many rows step."""
        keep = [(old, r) for old, r in enumerate(self.rows) if r not in reading]
        for new, (old, _) in enumerate(keep):  # into a slot a reading row held, or one a kept row left already
            if old != new:
                self.cache.move([old], [new])
        self.rows = [r for _, r in keep] + [r for r in self.rows if r in reading]
        return len(keep)

    def read(self, a, b):
        """Rows a .. b - 1 read their windows into their cache rows from scratch, in one forward pass:
        windows shorter than the longest are padded after their end, which no token of theirs sees
        (the causal mask) and their next step overwrites in the cache."""
        windows = [(r.prompt + r.tokens)[r.start:] for r in self.rows[a:b]]
        # each row then steps once for each token it may still write but the first, up to block_size
        need = max(len(w) + r.rules.max_tokens - len(r.tokens) - 1 for w, r in zip(windows, self.rows[a:b]))
        if need > self.cache.capacity:  # doubling: a few reallocations for a long-running server
            self.cache.grow(min(self.block_size, max(need, 2 * self.cache.capacity)))
        for row in range(a, b):
            self.cache.reset(row)
        self.cache.use(a, b)
        T = max(map(len, windows))
        ids = torch.tensor([w + [0] * (T - len(w)) for w in windows], device=self.device)
        last = torch.tensor([len(w) - 1 for w in windows], device=self.device)
        scoring = [r.rules.prompt_logprobs is not None and not r.tokens for r in self.rows[a:b]]  # a prompt read first
        every = any(scoring)  # every position's logits are needed, else only each row's last
        logits, _ = self.model(ids, kv_cache=self.cache, last=None if every else last)
        for row, w in zip(range(a, b), windows):
            self.cache.lengths[row] = len(w)
        for i, (request, w) in enumerate(zip(self.rows[a:b], windows)):
            if scoring[i]:
                ahead = scored(logits[i, :len(w) - 1], torch.tensor(w[1:], device=self.device),
                               request.rules.prompt_logprobs)
                request.prompt_logprobs = [None] * (request.start + 1) + ahead  # the window's first predicts nothing
        self.advance(logits[torch.arange(b - a, device=self.device), last] if every else logits[:, 0], range(a, b))

    def step(self, n):
        """One token for each of the first n rows at once: each feeds its newest token."""
        self.cache.use(0, n)
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows[:n]], device=self.device)
        logits, _ = self.model(ids, kv_cache=self.cache)
        self.advance(logits[:, -1], range(n))

    def advance(self, logits, rows):
        """logits (B, V) of the given rows -> each row's next token, added to its request."""
        requests = [self.rows[i] for i in rows]
        raw = logits.float().clone() if any(r.rules.logprobs is not None for r in requests) else None
        for b, (request, token) in enumerate(zip(requests, self.choose(logits.float(), requests))):  # choose() masks
            if request.rules.logprobs is not None:  # scored before add(), whose end event may be read at once
                request.logprobs += scored(raw[b:b + 1], torch.tensor([token], device=self.device),
                                           request.rules.logprobs)
            request.add(token)

    def choose(self, logits, requests):
        """The next token of each request by its own rules: greedy rows by one argmax, the others drawn
        one by one with their own temperature, top_k, top_p and random numbers."""
        masks = [self.never_drawn(r.rules, logits.size(-1)) for r in requests]
        if any(m is not None for m in masks):
            if all(m is masks[0] for m in masks):  # the usual case: every row under the model's own rules
                logits.masked_fill_(masks[0], float("-inf"))
            else:
                none = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
                logits.masked_fill_(torch.stack([none if m is None else m for m in masks]), float("-inf"))
        tokens = logits.argmax(dim=-1).tolist()
        alike = {}  # rows drawn under the same rules share one softmax; each draws with its own random numbers
        for b, request in enumerate(requests):
            rules = request.rules
            if rules.temperature > 0:
                alike.setdefault((rules.temperature, rules.top_k, rules.top_p, rules.vocab_limit), []).append(b)
        for (temperature, top_k, top_p, limit), rows in alike.items():
            probs = next_token_probs(logits[rows, :limit], temperature, top_k, top_p)
            for b, p in zip(rows, probs):
                tokens[b] = torch.multinomial(p, 1, generator=requests[b].generator).item()
        return tokens

    def never_drawn(self, rules, vocab):
        """(V,) True for the ids the rules never draw (banned, past the vocabulary limit), or None; one
        tensor per such rule set, kept."""
        if rules.vocab_limit is None and not rules.banned:
            return None
        key = (rules.vocab_limit, rules.banned, vocab)
        if key not in self.masks:
            mask = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            mask[rules.vocab_limit or vocab:] = True
            mask[list(rules.banned)] = True
            self.masks[key] = mask
        return self.masks[key]

    def leave(self, rows):
        """The requests in these rows leave the batch; the last rows move into their places, in one copy."""
        origin = list(range(len(self.rows)))  # the row each remaining slot's cache will come from
        for i in sorted(rows, reverse=True):  # from the end: a moved row is never one still to remove
            origin[i] = origin[-1]
            self.rows[i] = self.rows[-1]
            origin.pop()
            self.rows.pop()
        moved = [(src, dst) for dst, src in enumerate(origin) if src != dst]
        if moved:  # every source lies past the remaining rows: none is also written
            self.cache.move([src for src, _ in moved], [dst for _, dst in moved])


def draws(rules, count):
    """The rules of `count` samples of one prompt: sample i draws with seed + i, so sample 0 is what
    one request with that seed gets (from sample.py, the server or the report alike)."""
    return [replace(rules, seed=None if rules.seed is None else rules.seed + i) for i in range(count)]


def complete(model, prompts, rules, max_batch=256):
    """The tokens each prompt gets under `rules` (a list of id lists, a stop id that ended one
    included): prompts decoded together to their ends, for evaluation, the report and the plots."""
    engine = Engine(model, max_batch=max_batch)
    return [r.tokens for r in engine.complete([Request(list(p), rules) for p in prompts])]
