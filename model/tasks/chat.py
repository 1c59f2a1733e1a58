"""Answers: teach a model to answer from prompt/completion pairs or conversations, the two
formats of TRL and transformers, one JSON object a line in .jsonl files:

    {"prompt": "305", "completion": "三百零五"}
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}]}

A chat template turns messages into tokens: each turn is its role's marker, the content and the
end-of-turn token, e.g. <|user|>305<|end|><|assistant|>三百零五<|end|>. Markers and the
end-of-turn token are special tokens that no text encodes to. The loss is on what the assistant
writes, its content and its end-of-turn token (so the model learns to stop); the targets of the
markers, the system and user turns are -1, as on the sorter's input.
"""

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.data import TextSource, reuse, token_dtype, write_meta
from model.errors import UserError
from model.sampling import generate
from model.tasks.text import SEPARATOR, prepare_settings, text_model_shape, text_tokenizer
from model.tokenizer import StreamDecoder, tokenizer_from_dict

ROLES = ("system", "user", "assistant")
SPLIT_FILES = ("ids.bin", "loss.bin", "offsets.npy")  # per split: token ids, 1 where in the loss, example starts


# ---- the template ------------------------------------------------------------------------

@dataclass
class ChatTemplate:
    """How messages become tokens (plain data, kept in the checkpoint). Ours: end_of_turn is GPT-2's
    <|endoftext|> or BERT's [SEP] where the vocabulary has one, else <|end|>. A Hugging Face
    folder's own template (Qwen's ChatML, ...) is kept as its Jinja `source` with the strings it
    reads (`variables`: bos_token, eos_token) and rendered as transformers renders it."""
    end_of_turn: str
    markers: dict = field(default_factory=lambda: {role: f"<|{role}|>" for role in ROLES})
    source: str = ""
    variables: dict = field(default_factory=dict)

    @classmethod
    def for_tokenizer(cls, tokenizer):
        """(the template, the tokenizer with its special tokens added where missing)."""
        vocab = getattr(tokenizer, "tok", None)
        known = [t for t in ("<|endoftext|>", "[SEP]") if vocab is not None and vocab.token_to_id(t) is not None]
        template = cls(known[0] if known else "<|end|>")
        return template, tokenizer.with_specials(template.special_tokens())

    def special_tokens(self):
        return [*self.markers.values(), self.end_of_turn]

    def encode(self, tokenizer, messages, generation_prompt=False, drop_unknown=False):
        """messages -> (ids, in_loss): in_loss[t] says whether token t is one the assistant writes.
        With generation_prompt, the assistant's marker ends the ids: the model answers next."""
        if self.source:
            return self.encode_rendered(tokenizer, messages, generation_prompt)
        ids, in_loss = [], []
        end = tokenizer.special_id(self.end_of_turn)
        for m in messages:
            content = tokenizer.encode(m["content"], drop_unknown=drop_unknown)
            answer = m["role"] == "assistant"
            ids += [tokenizer.special_id(self.markers[m["role"]]), *content, end]
            in_loss += [False] + [answer] * (len(content) + 1)
        if generation_prompt:
            ids.append(tokenizer.special_id(self.markers["assistant"]))
            in_loss.append(False)
        return ids, in_loss

    def render(self, messages, generation_prompt):
        """A folder's template as text, rendered as transformers renders it (sandboxed Jinja)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # jinja2 comes with torch
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(UserError(f"chat template: {message}"))
        return env.from_string(self.source).render(messages=messages, add_generation_prompt=generation_prompt,
                                                   **self.variables)

    def encode_rendered(self, tokenizer, messages, generation_prompt):
        """A folder's template: the rendered text's ids (its special tokens recognised). The loss
        counts each assistant turn: the tokens between the conversation rendered up to its
        question (with the answer's prompt) and rendered up to its answer."""
        ids = tokenizer.encode_template(self.render(messages, generation_prompt))
        in_loss = [False] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                start = len(tokenizer.encode_template(self.render(messages[:i], True)))
                end = len(tokenizer.encode_template(self.render(messages[:i + 1], False)))
                in_loss[start:end] = [True] * (end - start)
        return ids, in_loss

    def jinja(self):
        """The template in transformers' form (Jinja), for apply_chat_template."""
        if self.source:
            return self.source
        markers = json.dumps(self.markers, ensure_ascii=False)
        return ("{%- set markers = " + markers + " -%}"
                "{%- for message in messages -%}"
                "{{ markers[message['role']] + message['content'] + " + json.dumps(self.end_of_turn) + " }}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{ markers['assistant'] }}{%- endif -%}")

    def to_dict(self):
        return {"end_of_turn": self.end_of_turn, "markers": dict(self.markers), "source": self.source,
                "variables": dict(self.variables)}

    @classmethod
    def from_dict(cls, d):
        return cls(d["end_of_turn"], dict(d["markers"]), d.get("source", ""), dict(d.get("variables", {})))


# ---- reading .jsonl files ------------------------------------------------------------------

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


def start_template(start, tokenizer):
    """(template, tokenizer) for training: a resumed run's; a base model's own (trained on .jsonl, or a
    folder's chat template, which fine-tuning then teaches); else ours, its special tokens added."""
    state = (start.ckpt or {}).get("task") or {}
    if "template" in state:
        return ChatTemplate.from_dict(state["template"]), tokenizer
    if start.ckpt and "chat" in start.ckpt:
        return ChatTemplate.from_dict(start.ckpt["chat"]), tokenizer
    return ChatTemplate.for_tokenizer(tokenizer)


def contents(source):
    """Every message's text, for building a tokenizer (never the JSON around it)."""
    for messages, _ in read_records(source):
        for m in messages:
            yield m["content"] + "\n"


# ---- preparing examples ------------------------------------------------------------------

def held_out(n, val_fraction, seed):
    """Which of n examples are held out: a seeded, fixed val_fraction of them (at least one)."""
    is_val = np.zeros(n, dtype=bool)
    if val_fraction > 0 and n > 1:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
        is_val[perm[:max(1, round(n * val_fraction))]] = True
    return is_val


def prepare_examples(source, tokenizer, template, prepared, is_val, settings, hasher):
    """Each record's ids and loss mask into prepared/{train,val}.{ids,loss}.bin, with the examples'
    start offsets; meta.json last (a stopped run leaves nothing to reuse), with `hasher`'s digest of
    the files. Returns whether every record is a prompt/completion pair."""
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "meta.json").unlink(missing_ok=True)
    dtype, pairs = token_dtype(tokenizer.model_vocab_size()), True
    files = {s: (open(prepared / f"{s}.ids.bin", "wb"), open(prepared / f"{s}.loss.bin", "wb")) for s in ("train", "val")}
    offsets = {"train": [0], "val": [0]}
    bar = tqdm(total=len(is_val), unit="ex", desc="preparing examples", dynamic_ncols=True, disable=len(is_val) < 50_000)
    try:
        for i, (messages, is_pair) in enumerate(read_records(source)):
            bar.update(1)
            ids, in_loss = template.encode(tokenizer, messages, drop_unknown=True)  # the vocabulary spells the text
            split = "val" if is_val[i] else "train"
            files[split][0].write(np.array(ids, dtype=dtype).tobytes())
            files[split][1].write(np.array(in_loss, dtype=np.uint8).tobytes())
            offsets[split].append(offsets[split][-1] + len(ids))
            pairs &= is_pair
    finally:
        bar.close()
        for f in (f for pair in files.values() for f in pair):
            f.close()
    for split, starts in offsets.items():
        np.save(prepared / f"{split}.offsets.npy", np.array(starts, dtype=np.int64))
    write_meta(prepared, source, hasher, settings, tokenizer, dtype, pairs=pairs, template=template.to_dict())
    return pairs


@dataclass
class Examples:
    """One split's examples: example i is ids[offsets[i]:offsets[i + 1]] (memory-mapped), with its
    loss mask; `keep` lists the examples that fit the model (block_size + 1 tokens at most)."""
    ids: np.ndarray
    loss: np.ndarray
    offsets: np.ndarray
    keep: np.ndarray

    @classmethod
    def open(cls, prepared, split, dtype, block_size):
        offsets = np.load(prepared / f"{split}.offsets.npy")
        ids, loss = (np.memmap(prepared / f"{split}.{kind}.bin", dtype=t, mode="r") if offsets[-1] else np.zeros(0, t)
                     for kind, t in (("ids", dtype), ("loss", np.uint8)))
        return cls(ids, loss, offsets, np.flatnonzero(np.diff(offsets) <= block_size + 1))

    def example(self, i):
        """(ids, in_loss) of example i as int64 and bool arrays."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b].astype(np.int64), self.loss[a:b].astype(bool)


def open_examples(prepared, dtype, block_size):
    """The prepared splits; examples longer than block_size + 1 tokens are left out, said once."""
    data = {s: Examples.open(prepared, s, dtype, block_size) for s in ("train", "val")}
    dropped = sum(len(d.offsets) - 1 - len(d.keep) for d in data.values())
    if dropped:
        print(f"notice: {dropped} examples are longer than block_size + 1 = {block_size + 1} tokens and are left out "
              f"(a cut answer would teach the model not to finish); raise --block_size to keep them", file=sys.stderr)
    if not len(data["train"].keep):
        raise UserError(f"no training example fits block_size={block_size}; raise --block_size")
    return data


# ---- the task ----------------------------------------------------------------------------

class ChatTask:
    """Answering: batches of whole examples (padded, padding never in the loss), the val loss on
    answer tokens, greedy exact match of held-out completions (pairs data), and sampling a reply
    or a conversation."""

    EVAL_LIMIT = 2000  # larger splits are scored on their first examples

    def __init__(self, tokenizer, template, block_size, data=None, model_vocab_size=None, pairs=False):
        self.tokenizer, self.template, self.block_size = tokenizer, template, block_size
        self.data, self.pairs = data, pairs
        self.model_vocab_size = model_vocab_size or tokenizer.model_vocab_size()
        self.end = tokenizer.special_id(template.end_of_turn)
        self.banned = [i for i in tokenizer.never_sampled() if i != self.end]  # BERT's [SEP] may end a turn

    @classmethod
    def for_training(cls, cfg, start):
        """cfg.data's records with the tokenizer the start calls for (as for text) plus the
        template's special tokens, prepared once into prepared/ and reused while nothing changed."""
        source = TextSource.at(cfg.data, ".jsonl")
        settings = {**prepare_settings(cfg, start), "task": "chat", "seed": cfg.seed}
        prepared = Path(cfg.out_dir) / "prepared"
        meta = reuse(source, prepared, settings, [f"{s}.{f}" for s in ("train", "val") for f in SPLIT_FILES])
        if meta is not None:
            tokenizer, template = tokenizer_from_dict(meta["tokenizer"]), ChatTemplate.from_dict(meta["template"])
        else:
            hasher = hashlib.sha256()  # hashed as the lines are checked: no pass over the files only to hash them
            n = sum(1 for _ in read_records(source, hasher))  # every line checked before anything is written
            if n == 0:
                raise UserError(f"{cfg.data} holds no examples: one JSON object a line")
            base = text_tokenizer(cfg, start, lambda: contents(source))
            template, tokenizer = start_template(start, base)
            prepare_examples(source, tokenizer, template, prepared, held_out(n, cfg.val_fraction, cfg.seed), settings,
                             hasher)
            meta = json.loads((prepared / "meta.json").read_text(encoding="utf-8"))
        block_size, vocab = text_model_shape(cfg, start, tokenizer)
        data = open_examples(prepared, meta["dtype"], block_size)
        if not len(data["val"].keep):
            data["val"] = data["train"]  # nothing held out (val_fraction=0): evaluate on the training examples
        return cls(tokenizer, template, block_size, data, vocab, meta["pairs"])

    def get_batch(self, split, batch_size, generator):
        """Random examples of the split, each x = ids[:-1], y = ids[1:] where ids[t + 1] is in the
        loss, else -1; rows padded to the longest (x with the end-of-turn id, y with -1)."""
        d = self.data[split]
        rows = [d.example(i) for i in d.keep[torch.randint(len(d.keep), (batch_size,), generator=generator).numpy()]]
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((batch_size, T), self.end, dtype=torch.long)
        y = torch.full((batch_size, T), -1, dtype=torch.long)
        for b, (ids, in_loss) in enumerate(rows):
            x[b, :len(ids) - 1] = torch.from_numpy(ids[:-1])
            y[b, :len(ids) - 1] = torch.from_numpy(np.where(in_loss[1:], ids[1:], -1))
        return x, y

    def accuracy(self, model, split, device):
        """Greedy exact match: the share of the split's examples (up to EVAL_LIMIT) whose whole
        answer, end-of-turn token included, the model writes exactly. Batched by prompt length."""
        d = self.data[split]
        by_length = {}
        for i in d.keep[:self.EVAL_LIMIT]:
            ids, in_loss = d.example(i)
            first = int(np.argmax(in_loss))  # where the answer starts
            by_length.setdefault(first, []).append((ids[:first], ids[first:]))
        right = 0
        for group in by_length.values():
            for k in range(0, len(group), 256):
                chunk = group[k:k + 256]
                width = max(len(answer) for _, answer in chunk)
                prompts = torch.tensor(np.stack([p for p, _ in chunk]), device=device)
                out = self.generate(model, prompts, width, temperature=0.0)[:, prompts.size(1):].cpu().numpy()
                right += sum(np.array_equal(row[:len(answer)], answer) for row, (_, answer) in zip(out, chunk))
        return right / max(1, sum(len(g) for g in by_length.values()))

    def evaluate(self, model, device):
        if not self.pairs:
            return {}
        return {"heldout_acc": self.accuracy(model, "val", device), "train_acc": self.accuracy(model, "train", device)}

    def solved(self, evaluation):
        return "heldout_acc 100%" if evaluation.get("heldout_acc") == 1.0 else None

    def state(self):
        return {"type": "chat", "template": self.template.to_dict(), "pairs": self.pairs}

    @classmethod
    def from_state(cls, state, tokenizer, block_size, model_vocab_size):
        return cls(tokenizer, ChatTemplate.from_dict(state["template"]), block_size,
                   model_vocab_size=model_vocab_size, pairs=state.get("pairs", False))

    # ---- generating replies ----

    def generate(self, model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=1.0, generator=None,
                 on_token=None):
        """Replies to prompts (B, T) -> (B, T + n), stopping once every row has written the end of turn."""
        return generate(model, prompts, max_new_tokens, temperature, top_k, top_p, generator, on_token=on_token,
                        vocab_limit=self.tokenizer.vocab_size, banned=self.banned, stop_id=self.end)

    def reply_text(self, ids):
        """The text of a reply's ids, up to its end-of-turn token."""
        ids = list(ids)
        return self.tokenizer.decode(ids[:ids.index(self.end)] if self.end in ids else ids)

    def fit(self, messages, max_new_tokens):
        """(prompt ids, how many tokens the reply may take, turns dropped): the oldest exchanges
        after the system message are dropped (a user turn and the reply to it) until the prompt
        leaves a quarter of block_size (or max_new_tokens) for the reply."""
        room = min(max_new_tokens, max(1, self.block_size // 4))
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        while True:
            ids, _ = self.template.encode(self.tokenizer, system + turns, generation_prompt=True, drop_unknown=True)
            if len(ids) + room <= self.block_size or len(turns) == 1:
                break
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation starts with a question
                turns = turns[1:]
        if len(ids) >= self.block_size:
            raise UserError(f"the message is {len(ids)} tokens with the template; this model reads at most "
                            f"block_size={self.block_size}: write a shorter one")
        return ids, min(max_new_tokens, self.block_size - len(ids)), len(messages) - len(system) - len(turns)

    def stream_reply(self, model, ids, max_new_tokens, cfg, device, generator, count=1):
        """Generate `count` replies to ids as one batch; the first is printed as it comes. Returns their texts."""
        stream, done = StreamDecoder(self.tokenizer), [False]

        def show(t):
            token = t[0].item()
            done[0] = done[0] or token == self.end
            if not done[0]:
                print(stream.add(token), end="", flush=True)

        out = self.generate(model, torch.tensor([ids] * count, device=device), max_new_tokens, cfg.temperature,
                            cfg.top_k, cfg.top_p, generator, on_token=show)
        print(stream.flush(), end="", flush=True)
        return [self.reply_text(row[len(ids):].tolist()) for row in out]

    # ---- what the commands show ----

    def describe(self, config):
        kind = "prompt/completion pairs" if self.pairs else "conversations"
        return f"answers: {kind} from {config.get('data')} (end of turn {self.template.end_of_turn})"

    def report_rows(self, run):
        if run.get("heldout_acc") is None:
            return []
        sizes = {s: min(len(d.keep), self.EVAL_LIMIT) for s, d in self.data.items()} if self.data else {}
        return [("held-out exact match", f"{run['heldout_acc']:.1%} of {sizes.get('val', '?')} completions"),
                ("training exact match", f"{run['train_acc']:.1%} of {sizes.get('train', '?')} completions")]

    def prompts(self, split="val", count=3):
        """The first examples of a split as (prompt messages, expected answer text)."""
        out = []
        for i in self.data[split].keep[:count]:
            ids, in_loss = self.data[split].example(i)
            first = int(np.argmax(in_loss))
            out.append((ids[:first].tolist(), self.reply_text(ids[first:].tolist())))
        return out

    def demo(self, model, device, count=3):
        """The model's greedy replies to the first held-out prompts, wrong ones marked."""
        lines = []
        for prompt, expected in self.prompts("val", count):
            out = self.generate(model, torch.tensor([prompt], device=device), self.block_size - len(prompt))
            reply = self.reply_text(out[0, len(prompt):].tolist())
            lines.append(f"{self.tokenizer.decode(prompt)} -> {reply}{'' if reply == expected else '  (expected ' + expected + ')'}")
        return "\n".join(lines)

    def attention_prompt(self, model, start):
        """The templated question (--start, or '?' when none is given) and the model's greedy reply."""
        ids, room, _ = self.fit([{"role": "user", "content": start or "?"}], self.block_size)
        out = self.generate(model, torch.tensor([ids]), room)[0].tolist()
        out = out[:out.index(self.end, len(ids)) + 1] if self.end in out[len(ids):] else out
        return [self.tokenizer.label(i) for i in out], out

    def sample(self, cfg, prompt, model, device):
        """sample.py --start=QUESTION: num_samples replies (the first streamed); --chat: a conversation."""
        if cfg.chat:
            return converse(self, cfg, model, device)
        if not prompt:
            raise UserError("give the question with --start=\"...\", or talk to the model with --chat")
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": prompt}]
        self.check_spelling(messages, cfg.drop_unknown)
        ids, room, _ = self.fit(messages, cfg.max_new_tokens)
        replies = self.stream_reply(model, ids, room, cfg, device, torch.Generator(device).manual_seed(cfg.seed),
                                    cfg.num_samples)
        for reply in replies[1:]:
            print(f"\n{SEPARATOR}\n{reply}", end="")
        print()

    def encode_prompt(self, text):
        """Plain text (no template) as ids, to be continued; UserError for characters the model lacks."""
        self.refuse_unknown([{"content": text}])
        return self.tokenizer.encode(text)

    def encode_messages(self, messages):
        """A whole conversation as the ids its reply follows (ending with the assistant's marker);
        UserError for characters the model lacks."""
        self.refuse_unknown(messages)
        return self.template.encode(self.tokenizer, messages, generation_prompt=True)[0]

    def refuse_unknown(self, messages, hint="rephrase without them"):
        missing = "".join(dict.fromkeys(c for m in messages for c in self.tokenizer.unknown(m["content"])))
        if missing:
            raise UserError(f"the model does not know the characters {missing!r}; {hint}")

    def check_spelling(self, messages, drop_unknown):
        """sample.py: characters the model lacks stop it, unless --drop_unknown leaves them out."""
        if not drop_unknown:
            self.refuse_unknown(messages, "rephrase, or pass --drop_unknown=True to leave them out")


def converse(task, cfg, model, device):
    """sample.py --chat: a conversation in the terminal. Each user turn (a line) gets a reply,
    streamed; the history is kept (oldest turns dropped to fit block_size, said so). /reset starts
    again, /quit, Ctrl-D or Ctrl-C end. From a pipe: one reply per line read, nothing else printed."""
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history, generator = list(system), torch.Generator(device).manual_seed(cfg.seed)
    if interactive:
        print("chat: type a message and Enter; /reset starts a new conversation, /quit (or Ctrl-D) ends", file=sys.stderr)
    try:
        while True:
            line = input("> " if interactive else "")
            if line.strip() in ("/quit", "/exit"):
                break
            if line.strip() == "/reset":
                history = list(system)
                print("(new conversation)", file=sys.stderr)
                continue
            history = reply_to(task, history + [{"role": "user", "content": line}], cfg, model, device, generator)
    except EOFError:
        pass
    except KeyboardInterrupt:  # Ctrl-C: end the conversation, as Ctrl-D does, with the shell's code for it
        print(file=sys.stderr)
        return 130
    return 0


def reply_to(task, history, cfg, model, device, generator):
    """Stream the reply to the history's last turn; return the history with it (or without that
    turn, after a message the model cannot read, so the conversation goes on)."""
    try:
        task.check_spelling(history[-1:], cfg.drop_unknown)
        ids, room, dropped = task.fit(history, cfg.max_new_tokens)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return history[:-1]
    if dropped:
        print(f"notice: the {dropped} oldest turn(s) are dropped to fit block_size={task.block_size}", file=sys.stderr)
        start = 1 if history[0]["role"] == "system" else 0
        history = history[:start] + history[start + dropped:]
    reply = task.stream_reply(model, ids, room, cfg, device, generator)[0]
    print()
    return history + [{"role": "assistant", "content": reply}]
