"""The chat template: how a conversation's messages become tokens, and which of them the loss counts.

Ours: each turn is its role's marker, the content and the end-of-turn token, e.g.
<|user|>305<|end|><|assistant|>三百零五<|end|>. Markers and the end-of-turn token are special
tokens that no text encodes to. A Hugging Face folder's own template (Qwen's ChatML, ...) is
kept as its Jinja source and rendered as transformers renders it.
"""

import json
from dataclasses import dataclass, field

from model.errors import UserError
from model.tokenizer import spelled

ROLES = ("system", "user", "assistant")


@dataclass
class ChatTemplate:
    """How messages become tokens (plain data, kept in the checkpoint). Ours: end_of_turn is GPT-2's
    <|endoftext|> or BERT's [SEP] where the vocabulary has one, else <|end|>. A Hugging Face
    folder's own template is kept as its Jinja `source` with the strings it reads (`variables`:
    bos_token, eos_token)."""
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

    def marker_ids(self, tokenizer):
        """The ids of the special tokens the template writes other than its end of turn (role markers,
        ChatML's <|im_start|>): they mark structure, so a reply never contains one."""
        names = [t for t in tokenizer.special_tokens() if t in self.source] if self.source else self.markers.values()
        ids = (tokenizer.special_id(n) for n in names if n != self.end_of_turn)
        return sorted({i for i in ids if i is not None})

    def encode(self, tokenizer, messages, generation_prompt=False, drop_unknown=False):
        """messages -> (ids, in_loss): in_loss[t] says whether token t is one the assistant writes.
        With generation_prompt, the assistant's marker ends the ids: the model answers next."""
        if self.source:  # the rendered text is read with its special tokens: check the messages' own text first
            messages = [{**m, "content": spelled(tokenizer, m["content"], drop_unknown)} for m in messages]
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
