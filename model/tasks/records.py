"""Reading .jsonl files of examples in the formats of transformers and TRL, one JSON object a line:
{"prompt": ..., "completion": ...} pairs and {"messages": [...]} conversations; preferences,
{"prompt": ..., "chosen": ..., "rejected": ...} (strings, message lists, or whole conversations
sharing their start); and prompts alone, for reinforcement learning. Every line is checked; a bad
one is a UserError naming its file and line number."""

import json

import numpy as np
import torch

from model.errors import UserError
from model.tasks.template import ROLES


def read_records(source, hasher=None, read=None):
    """(messages, is_pair) for every line of the .jsonl files, read one line at a time (its bytes
    into `hasher`, which then holds the files' SHA-256 as TextSource.chunks computes it). A bad
    line raises UserError naming its file and line number. `read(line, where)` reads a line of
    another kind (preference, prompt)."""
    for record, where in json_lines(source, hasher):
        yield (read or conversation)(record, where)


def held_out(n, val_fraction, seed):
    """Which of n examples are held out: a seeded, fixed val_fraction of them (at least one)."""
    is_val = np.zeros(n, dtype=bool)
    if val_fraction > 0 and n > 1:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        is_val[perm[:max(1, round(n * val_fraction))]] = True
    return is_val


def json_lines(source, hasher=None):
    """(the JSON value, "file, line n") of every non-empty line."""
    for path in source.files:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if hasher is not None:
                    hasher.update(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}, line {n} is not UTF-8 text: {e.reason}") from None
                if line.strip():
                    try:
                        yield json.loads(line), f"{path}, line {n}"
                    except ValueError as e:
                        raise UserError(f"{path}, line {n}: not JSON ({e})") from None


def first_keys(source):
    """The keys of the first line's object (which kind of file this is), or () for none."""
    for record, _ in json_lines(source):
        return tuple(record) if isinstance(record, dict) else ()
    return ()


def conversation(record, where):
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UserError(f"{where}: 'prompt' and 'completion' must be strings")
        if not completion:
            raise UserError(f"{where}: the completion is empty; there is nothing to learn to answer")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], True
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise UserError(f"{where}: each line needs 'prompt' and 'completion', or 'messages' (a list of "
                        f"{{\"role\": ..., \"content\": ...}})")
    return checked_messages(record["messages"], where), False


def checked_messages(messages, where, answered=True):
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a "
                            f"string}}, got {json.dumps(m, ensure_ascii=False)[:80]}")
        if m["role"] == "system" and i > 0:
            raise UserError(f"{where}: message {i} is a system message; only the first may be one")
    if answered and not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise UserError(f"{where}: the conversation has no assistant message with content; there is nothing to "
                        f"learn to answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def contents(source):
    """Every message's text, for building a tokenizer (never the JSON around it)."""
    for messages, _ in read_records(source):
        for m in messages:
            yield m["content"] + "\n"


def preference(record, where):
    """A preference line -> (prompt messages, chosen messages, rejected messages), in TRL's three
    forms: strings (the prompt a user's message, the answers the assistant's), message lists, or
    `chosen` and `rejected` whole conversations whose shared start is the prompt."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise UserError(f"{where}: each line needs 'chosen' and 'rejected' (and 'prompt'), as TRL's preference data")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise UserError(f"{where}: with string answers, 'prompt' must be a string (the user's message)")
        prompt, chosen, rejected = ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen}],
                                    [{"role": "assistant", "content": rejected}])
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = checked_messages(chosen, where, False), checked_messages(rejected, where, False)
        if prompt is None:  # implicit: the prompt is what the two conversations share
            n = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif isinstance(prompt, list):
            prompt = checked_messages(prompt, where, False)
        else:
            raise UserError(f"{where}: with message-list answers, 'prompt' must be a list of messages (or left out)")
    else:
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be strings or both lists of messages")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer or answer[0]["role"] != "assistant" or not any(m["content"] for m in answer):
            raise UserError(f"{where}: the {name} answer must be an assistant message with content, after the prompt")
    if not prompt:
        raise UserError(f"{where}: the prompt is empty; a preference is between two answers to one prompt")
    return prompt, chosen, rejected


def prompt_row(record, where):
    """A prompt line (for reinforcement learning) -> (prompt messages, the record): 'prompt' a string
    (a user's message) or a list of messages, or 'messages'; its other columns go to the rewards."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: each line needs 'prompt' (a string or a list of messages)")
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], record
    if isinstance(prompt, list) and prompt:
        messages = checked_messages(prompt, where, False)
        if messages[-1]["role"] == "assistant":
            raise UserError(f"{where}: the prompt ends with an assistant message; it must end where the answer starts")
        return messages, record
    raise UserError(f"{where}: each line needs 'prompt' (a string or a list of messages)")
