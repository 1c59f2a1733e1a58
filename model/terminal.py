"""What sample.py shows in the terminal: continuations of a text streamed as they come, the
sorter's answers marked right or wrong, a model's replies to a question, and a conversation
(--chat). Every token comes from the engine; `rules` are the decoding rules sample.py's flags
ask for on top of the model's own."""

import sys
from dataclasses import replace

import torch

from model.engine import Request, TextStream, draws
from model.errors import UserError
from model.eval import exact_match
from model.report import SEPARATOR
from model.tasks.chat import exchanges
from model.tokenizer import spelled


def printed(event):
    """A request's emit: its text printed as it comes."""
    if event[0] == "text":
        print(event[1], end="", flush=True)


# ---- text ---------------------------------------------------------------------------------

class TokenIds:
    """A model without its vocabulary (a nanoGPT checkpoint without --meta): its ids are its text."""

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def prompt_ids(prompt, vocab_size):
    """Without a vocabulary the prompt is token ids ('1 5 2'), each below vocab_size; none given: token 0."""
    try:
        ids = [int(t) for t in prompt.split()] or [0]
    except ValueError:
        raise UserError(f"without a vocabulary --start must be token ids like '1 5 2', got {prompt!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"--start has token ids {bad[:10]} outside the model's vocabulary [0, {vocab_size})")
    return ids


def continue_text(engine, task, prompt, rules, count, drop_unknown=False):
    """`count` continuations of the prompt, drawn as one batch (sample i with seed + i): the first
    printed as it comes, the others when they are done."""
    tok = task.tokenizer or TokenIds()
    ids = task.encode_prompt(prompt, drop_unknown) if task.tokenizer else prompt_ids(prompt, task.model_vocab_size)
    if len(ids) > task.block_size:
        print(f"notice: the prompt has {len(ids)} tokens; the model reads its last {task.block_size} (block_size)",
              file=sys.stderr)
    requests = [Request(ids, r) for r in draws(rules, count)]
    requests[0].text, requests[0].emit = TextStream(tok, context=ids), printed
    print(tok.decode(ids), end="", flush=True)
    engine.complete(requests)
    for r in requests[1:]:
        print(f"\n{SEPARATOR}\n{tok.decode(r.prompt + r.tokens)}", end="")
    print()


# ---- the sorter ---------------------------------------------------------------------------

def show_sort(engine, task, prompt, count, seed):
    """--start: its answer; else `count` random inputs, each marked right or wrong and seen or held out."""
    if prompt:
        letters = torch.tensor([task.encode_prompt(prompt)])
    else:
        letters = torch.randint(len(task.alphabet), (count, task.length), generator=torch.Generator().manual_seed(seed))
    requests = engine.complete([Request(row, task.rules) for row in letters.tolist()])
    heldout, decode = set(task.splits["val"].tolist()), task.tokenizer.decode
    for inp, request, number in zip(letters, requests, task.numbers(letters).tolist()):
        answer, expected = decode(request.tokens), decode(inp.sort().values.tolist())
        print(f"{decode(inp.tolist())} -> {answer}", end="")
        if prompt:
            print("" if answer == expected else f"\n(wrong: sorted is {expected})")
            continue
        where = ("held-out" if number in heldout else "seen in training") if task.split_known else "split unknown"
        print(f"  ({'right' if answer == expected else f'wrong, expected {expected}'}; {where})")


def score_sort(model, task):
    """--eval: greedy exact match over the held-out and the training inputs (every input, for an imported model)."""
    if not task.split_known:
        pairs = task.answers("val")
        print(f"all inputs: {exact_match(model, pairs, task.rules):.1%} of {len(pairs)} sorted exactly (the split this "
              f"model was trained with is unknown: it was imported, so seen and unseen inputs are mixed)")
        return
    for split, name in (("val", "held-out"), ("train", "training")):
        pairs = task.answers(split)
        print(f"{name} inputs: {exact_match(model, pairs, task.rules):.1%} of {len(pairs)} sorted exactly")


# ---- answers and conversations ------------------------------------------------------------

def fit(task, messages, max_new_tokens):
    """(prompt ids, how many tokens the reply may take, turns dropped): the oldest exchanges after
    the system message are dropped (a user turn and the reply to it) until the prompt leaves a
    quarter of block_size (or max_new_tokens) for the reply."""
    room = min(max_new_tokens, max(1, task.block_size // 4))
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = task.encode_messages(system + turns, drop_unknown=True)  # the caller checked the new message
        if len(ids) + room <= task.block_size or len(turns) == 1:
            break
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation starts with a question
            turns = turns[1:]
    if len(ids) >= task.block_size:
        raise UserError(f"the message is {len(ids)} tokens with the template; this model reads at most "
                        f"block_size={task.block_size}: write a shorter one")
    return ids, min(max_new_tokens, task.block_size - len(ids)), len(messages) - len(system) - len(turns)


def stream_replies(engine, task, ids, rules, count=1):
    """`count` replies to the prompt ids as one batch, the first printed as it comes -> their texts."""
    requests = [Request(ids, r) for r in draws(rules, count)]
    requests[0].text, requests[0].emit = TextStream(task.tokenizer), printed
    engine.complete(requests)
    return [task.tokenizer.decode(r.reply()) for r in requests]


def answer(engine, task, question, rules, count, system="", drop_unknown=False):
    """sample.py --start=QUESTION: `count` replies (the first streamed as it comes)."""
    if not question:
        raise UserError("give the question with --start=\"...\", or talk to the model with --chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    for m in messages:
        spelled(task.tokenizer, m["content"], drop_unknown)
    ids, room, _ = fit(task, messages, rules.max_tokens)
    for reply in stream_replies(engine, task, ids, replace(rules, max_tokens=room), count)[1:]:
        print(f"\n{SEPARATOR}\n{reply}", end="")
    print()


def converse(engine, task, rules, system="", drop_unknown=False):
    """sample.py --chat: a conversation in the terminal. Each user turn (a line) gets a reply,
    streamed; the history is kept (oldest turns dropped to fit block_size, said so). /reset starts
    again, /quit, Ctrl-D or Ctrl-C (the command's code 130) end. From a pipe: one reply per line
    read, nothing else printed. Turn t draws with seed + t."""
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 become one clear line, in any locale
        sys.stdin.reconfigure(errors="surrogateescape")
    start = [{"role": "system", "content": system}] if system else []
    history, turn, told = list(start), 0, False
    if interactive:
        print("chat: type a message and Enter; /reset starts a new conversation, /quit (or Ctrl-D) ends", file=sys.stderr)
    try:
        while True:
            line = input("> " if interactive else "")
            if line.strip() in ("/quit", "/exit"):
                break
            if line.strip() == "/reset":
                history, told = list(start), False
                print("(new conversation)", file=sys.stderr)
                continue
            history = reply_to(engine, task, history + [{"role": "user", "content": line}],
                               replace(rules, seed=rules.seed + turn), drop_unknown)
            turn += 1
            if not told and task.turns and exchanges(history) > task.turns:
                told = True
                print(f"notice: this conversation is longer than any the model was trained on ({task.turns} "
                      f"exchange(s) at most), so its replies may get worse; /reset starts a new one", file=sys.stderr)
    except EOFError:
        pass
    return 0


def reply_to(engine, task, history, rules, drop_unknown):
    """Stream the reply to the history's last turn; return the history with it (or without that
    turn, after a message the model cannot read, so the conversation goes on)."""
    try:
        if any("\udc80" <= c <= "\udcff" for c in history[-1]["content"]):  # what surrogateescape made of bad bytes
            raise UserError("that line is not UTF-8 text (the terminal sent other bytes); type it again")
        spelled(task.tokenizer, history[-1]["content"], drop_unknown)
        ids, room, dropped = fit(task, history, rules.max_tokens)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return history[:-1]
    if dropped:
        print(f"notice: the {dropped} oldest turn(s) are dropped to fit block_size={task.block_size}", file=sys.stderr)
        start = 1 if history[0]["role"] == "system" else 0
        history = history[:start] + history[start + dropped:]
    reply = stream_replies(engine, task, ids, replace(rules, max_tokens=room))[0]
    print()
    return history + [{"role": "assistant", "content": reply}]
