"""Rewards for reinforcement learning (GRPO): Python functions with TRL's signature,

    fn(prompts, completions, **columns) -> list[float]

one number per completion (None: this function does not score it). prompts and completions are
lists of strings, or of message lists for conversational prompts, as TRL passes them; columns are
the prompt lines' other fields, one list each. Built in: exact_match and sort; a user's own as
path.py:function. Several are summed with --reward_weights.
"""

import importlib.util
import math
import traceback
from dataclasses import dataclass
from pathlib import Path

from model.errors import UserError


def text_of(completion):
    """A completion's text: itself, or its assistant message's content (conversational)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_match(prompts, completions, completion=None, answer=None, **columns):
    """1.0 where the reply is the line's `completion` (or `answer`), spaces around it aside, else 0.0."""
    targets = completion or answer
    if targets is None:
        raise ValueError("exact_match compares replies with each prompt line's 'completion' or 'answer'; "
                         "these lines have neither")
    return [float(text_of(c).strip() == str(text_of(t)).strip()) for c, t in zip(completions, targets)]


def sort(prompts, completions, **columns):
    """The sorter's checker: the share of places where the reply has the prompt's letters sorted."""
    out = []
    for p, c in zip(prompts, completions):
        want, got = sorted(p), text_of(c)
        out.append(sum(a == b for a, b in zip(want, got)) / len(want))
    return out


BUILT_IN = {"exact_match": exact_match, "sort": sort}


def load_reward(spec):
    """'exact_match', 'sort' or 'path.py:function' -> the function."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise UserError(f"--reward={spec}: give one of {', '.join(BUILT_IN)} or path/to/file.py:function")
    if not Path(path).is_file():
        raise UserError(f"--reward={spec}: there is no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"--reward={spec}: {path} raised {where(e)} when it was read") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward={spec}: {path} has no function {name}")
    return fn


def where(e):
    """An exception in a user's code as one line: its type, message and the line that raised it."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} (at {frame.filename}, line {frame.lineno})"


@dataclass
class Rewards:
    """The weighted sum of reward functions, each checked: one that raises, or does not return one
    number (or None) per completion, stops the run with one line naming it."""
    names: tuple
    functions: tuple
    weights: tuple

    @classmethod
    def parse(cls, reward, weights=""):
        names = tuple(s.strip() for s in reward.split(",") if s.strip())
        w = tuple(float(x) for x in weights.split(",")) if weights else (1.0,) * len(names)
        if len(w) != len(names):
            raise UserError(f"--reward_weights has {len(w)} numbers for {len(names)} rewards; give one each")
        return cls(names, tuple(load_reward(n) for n in names), w)

    def __call__(self, rows, completions):
        """Rows of the prompts ({"prompt", columns, "ids"}) and the completions' texts -> a reward each."""
        conversational = [not isinstance(r["prompt"], str) for r in rows]
        shown = [[{"role": "assistant", "content": c}] if conv else c for c, conv in zip(completions, conversational)]
        columns = {k: [r.get(k) for r in rows] for k in {k for r in rows for k in r} - {"prompt", "ids"}}
        total = [0.0] * len(completions)
        for name, fn, weight in zip(self.names, self.functions, self.weights):
            try:
                values = fn(prompts=[r["prompt"] for r in rows], completions=shown, **columns)
            except Exception as e:
                raise UserError(f"reward {name} raised {where(e)}") from None
            if not isinstance(values, (list, tuple)) or len(values) != len(completions):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
                raise UserError(f"reward {name} returned {got} for {len(completions)} completions; it must return "
                                f"a list of one number (or None) per completion")
            for i, v in enumerate(values):
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise UserError(f"reward {name} returned {v!r} for completion {i}; each must be a finite number "
                                    f"or None")
                total[i] += weight * v
        return total
