"""Reading .jsonl files of examples in the formats of transformers and TRL, one JSON object a line:
{"prompt": ..., "completion": ...} pairs and {"messages": [...]} conversations. Every line is
checked; a bad one is a UserError naming its file and line number."""

import json

from model.errors import UserError
from model.tasks.template import ROLES


def read_records(source, hasher=None):
    """(messages, is_pair) for every line of the .jsonl files, read one line at a time (its bytes
    into `hasher`, which then holds the files' SHA-256 as TextSource.chunks computes it). A bad
    line raises UserError naming its file and line number."""
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
                    yield conversation(line, f"{path}, line {n}")


def conversation(line, where):
    try:
        record = json.loads(line)
    except ValueError as e:
        raise UserError(f"{where}: not JSON ({e})") from None
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


def checked_messages(messages, where):
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a "
                            f"string}}, got {json.dumps(m, ensure_ascii=False)[:80]}")
        if m["role"] == "system" and i > 0:
            raise UserError(f"{where}: message {i} is a system message; only the first may be one")
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise UserError(f"{where}: the conversation has no assistant message with content; there is nothing to "
                        f"learn to answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def contents(source):
    """Every message's text, for building a tokenizer (never the JSON around it)."""
    for messages, _ in read_records(source):
        for m in messages:
            yield m["content"] + "\n"
