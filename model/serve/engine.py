"""The decoding engine: many requests decoded together, continuously batched.

Requests wait in a bounded queue. Between decoding steps the engine takes waiting ones into the
running batch, up to max_batch rows: each new prompt is read once on its own (the prefill), its
keys and values stored in its row of a ragged KV cache. Then one step feeds every row's newest
token at once, each at its own position. A request that finishes, or whose client went away,
leaves the batch at once and its row is refilled by the last one, so the running rows are
always the cache's first rows. Runs in its own thread; requests talk to it through Job.
"""

import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch

from model.sampling import sample_next_token
from model.tokenizer import StreamDecoder


class QueueFull(Exception):
    """Every place in the queue is taken: the request should come back later."""


class StopText:
    """A reply's text as its tokens come, cut before the first stop string. Text that may be the
    beginning of a stop string is held back until the next tokens show it is not."""

    def __init__(self, tokenizer, stop=()):
        self.decoder, self.stop = StreamDecoder(tokenizer), [s for s in stop if s]
        self.text, self.sent = "", 0

    def add(self, token_id):
        """-> (new text to send, whether a stop string was reached)."""
        self.text += self.decoder.add(token_id)
        return self.release()

    def finish(self):
        """The text still held back, at the end of the reply."""
        self.text += self.decoder.flush()
        return self.release(final=True)[0]

    def release(self, final=False):
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
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


@dataclass(eq=False)  # a job is itself, not its fields: the engine keeps jobs in sets and as keys
class Job:
    """One request: the prompt's ids and how to choose and stop. The engine calls emit(event)
    from its thread with ("text", str) for each piece of the reply and, last, ("end", reason):
    "stop" (the stop token or a stop string), "length" (max_tokens) or "error"."""
    prompt: list
    max_tokens: int
    text: StopText
    emit: object
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = None
    stop_id: int = None
    banned: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # the ids generated so far
    cancelled: bool = False  # set by the request's side when its client goes away

    def add(self, token_id):
        """Take the next token; -> whether the reply is finished (then "end" has been emitted)."""
        self.tokens.append(token_id)
        if token_id == self.stop_id:
            return self.end("stop")
        delta, stopped = self.text.add(token_id)
        if delta:
            self.emit(("text", delta))
        if stopped:
            return self.end("stop")
        return len(self.tokens) >= self.max_tokens and self.end("length")

    def end(self, reason):
        rest = self.text.finish() if reason != "stop" or self.tokens[-1] == self.stop_id else ""
        if rest:
            self.emit(("text", rest))
        self.emit(("end", reason))
        return True


class Engine:
    """Decodes the jobs submitted to it, up to max_batch at a time: run() until stop(), in the
    main thread (the command does: a step called from another thread took 1.1-1.3x as long on
    this project's 2-core machine, bench/thread_forward.py) or start() in a thread of its own. vocab_limit: ids from there on (a
    vocabulary padded past its tokenizer's) are never chosen."""

    def __init__(self, model, max_batch=16, max_queue=64, vocab_limit=None):
        self.model, self.max_batch, self.max_queue, self.vocab_limit = model, max_batch, max_queue, vocab_limit
        self.device = model.lm_head.weight.device
        self.cache = model.new_kv_cache(max_batch, kind="ragged")
        self.rows = []  # the running jobs: job i's keys and values are the cache's row i
        self.waiting = deque()
        self.generators = {}  # job -> its own random numbers (seeded jobs), so a seed repeats whatever else runs
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self.run, name="decoder", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        """run() returns before its next step (from any thread)."""
        with self.changed:
            self.stopped = True
            self.changed.notify()

    def submit(self, job):
        """Queue a job (from any thread); QueueFull when max_queue jobs are waiting already."""
        with self.changed:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(job)
            self.changed.notify()

    def cancel(self, job):
        """The job's client went away: its row (or its place in the queue) is freed before the next step."""
        job.cancelled = True
        with self.changed:
            self.changed.notify()

    def run(self):
        with torch.inference_mode():
            while True:
                with self.changed:
                    while not (self.stopped or self.rows or self.waiting):
                        self.changed.wait()
                    if self.stopped:
                        return
                    joining = self.take_waiting()
                try:
                    for job in joining:
                        self.prefill(job)
                    self.leave([i for i, job in enumerate(self.rows) if job.cancelled])
                    if self.rows:
                        self.step()
                except Exception:  # a bug: the running requests fail with it, the server goes on serving
                    traceback.print_exc()
                    for job in {*self.rows, *joining}:
                        job.emit(("end", "error"))
                    self.rows, self.generators = [], {}

    def take_waiting(self):
        joining = []
        while self.waiting and len(self.rows) + len(joining) < self.max_batch:
            job = self.waiting.popleft()
            if not job.cancelled:
                joining.append(job)
        return joining

    def prefill(self, job):
        """Read the job's prompt into a new last row of the cache and choose its first token."""
        row = len(self.rows)
        self.rows.append(job)
        self.cache.reset(row)
        self.cache.use(row, row + 1)
        if job.seed is not None:
            self.generators[job] = torch.Generator(self.device).manual_seed(job.seed)
        logits, _ = self.model(torch.tensor([job.prompt], device=self.device), kv_cache=self.cache)
        self.advance(logits[:, -1], [row])

    def step(self):
        """One token for every running row at once."""
        self.cache.use(0, len(self.rows))
        ids = torch.tensor([[job.tokens[-1]] for job in self.rows], device=self.device)
        logits, _ = self.model(ids, kv_cache=self.cache)
        self.advance(logits[:, -1], range(len(self.rows)))

    def advance(self, logits, rows):
        """logits (B, V) of the given rows -> each row's next token; finished rows leave."""
        tokens = self.choose(logits[:, :self.vocab_limit].float(), [self.rows[i] for i in rows])
        self.leave([i for i, token in zip(rows, tokens) if self.rows[i].add(token)])

    def choose(self, logits, jobs):
        """The next token of each job: greedy rows by one argmax, the others drawn one by one with
        their own temperature, top_p and random numbers."""
        for b, job in enumerate(jobs):
            if job.banned:
                logits[b, job.banned] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for b, job in enumerate(jobs):
            if job.temperature > 0:
                generator = self.generators.get(job)
                tokens[b] = sample_next_token(logits[b:b + 1], job.temperature, None, job.top_p, generator).item()
        return tokens

    def leave(self, rows):
        """The jobs in these rows leave the batch; the last rows move into their places."""
        for i in sorted(rows, reverse=True):  # from the end: a moved row is never one still to remove
            self.generators.pop(self.rows[i], None)
            last = len(self.rows) - 1
            if i != last:
                self.cache.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
