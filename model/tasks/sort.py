"""Sorting letters: the 3D visualisation's "nano-gpt" task. The input is `length` letters, the
answer the same letters sorted; the loss is on the answer only, and every input is scored."""

import torch

from model.engine import Rules
from model.errors import UserError
from model.tokenizer import CharTokenizer


class SortTask:
    """Inputs are `length` letters from `alphabet`; the answer is the same letters sorted.
    A sequence is the input followed by the answer, e.g. CBABBC ABBBCC; the model reads all
    but its last token and is scored only on the answer, so the targets on input positions
    are -1. Each input is numbered (its letters as base-k digits); a seeded, fixed fraction
    of the numbers is held out and never trained on."""

    EVAL_LIMIT = 10_000  # larger splits are scored on a fixed random subset of this size
    exact_match = True  # the sorted letters are the one right answer
    examples_name = "inputs"

    def __init__(self, length=6, alphabet="ABC", holdout=0.2, seed=1337, heldout=None):
        if len(set(alphabet)) < 2 or len(set(alphabet)) != len(alphabet):
            raise UserError(f"sort_alphabet needs at least 2 distinct letters, each once; got {alphabet!r}")
        if not 0.0 < holdout < 1.0:
            raise UserError(f"sort_holdout must be in (0, 1), got {holdout}")
        self.length = length
        self.alphabet = alphabet
        self.tokenizer = CharTokenizer(list(alphabet))  # ids follow the alphabet: A=0, B=1, C=2
        self.block_size = 2 * length - 1
        self.model_vocab_size = len(alphabet)
        self.rules = Rules(max_tokens=length, temperature=0.0)  # the answer: as many letters, the most likely each
        n = len(alphabet) ** length
        if n > 2 ** 40:
            raise UserError(f"{len(alphabet)}^{length} inputs are too many to number; use fewer letters")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        if heldout is None:
            heldout = perm[:max(1, round(n * holdout))]
        is_heldout = torch.zeros(n, dtype=torch.bool)
        is_heldout[heldout] = True
        self.splits = {"val": heldout, "train": perm[~is_heldout[perm]]}
        self.split_known = True  # False for an imported model: its "held-out" part is every input

    @classmethod
    def for_training(cls, settings, start):
        """A new task from the data settings, or (resuming) the checkpoint's task with its exact split."""
        if start.mode == "resume":
            return cls.from_state(start.ckpt.task)
        if start.mode == "finetune":
            raise UserError("a sorter is not fine-tuned from another model: train it from scratch, or continue "
                            "it with --init_from=resume")
        return cls(settings.sort_length, settings.sort_alphabet, settings.sort_holdout, settings.seed)

    def inputs(self, numbers):
        """Input numbers (N,) -> their letters as token ids (N, length)."""
        k = len(self.alphabet)
        powers = k ** torch.arange(self.length - 1, -1, -1)
        return (numbers[:, None] // powers) % k

    def numbers(self, letters):
        """The inverse of inputs(): letters (N, length) -> input numbers (N,)."""
        k = len(self.alphabet)
        return (letters * k ** torch.arange(self.length - 1, -1, -1)).sum(dim=1)

    def examples(self, numbers):
        """Input numbers (N,) -> x, y (N, 2 * length - 1): x = input + answer[:-1], y = the
        next token at each place, -1 on the first length - 1 places (still reading the input)."""
        letters = self.inputs(numbers)
        seq = torch.cat([letters, letters.sort(dim=1).values], dim=1)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :self.length - 1] = -1
        return x, y

    def get_batch(self, split, batch_size, generator):
        numbers = self.splits[split]
        pick = torch.randint(len(numbers), (batch_size,), generator=generator)
        return self.examples(numbers[pick])

    def draw_prompts(self, split, n, generator):
        """n inputs of the split as rows for reinforcement learning: {"ids", "prompt": the letters}."""
        numbers = self.splits[split]
        letters = self.inputs(numbers[torch.randint(len(numbers), (n,), generator=generator)]).tolist()
        return [{"ids": ids, "prompt": self.tokenizer.decode(ids)} for ids in letters]

    def answers(self, split):
        """(input ids, the sorted ids) of the split's inputs (up to EVAL_LIMIT), for exact match."""
        letters = self.inputs(self.splits[split][:self.EVAL_LIMIT])
        return list(zip(letters.tolist(), letters.sort(dim=1).values.tolist()))

    def encode_prompt(self, text, drop_unknown=False):
        """A prompt's ids: `length` letters from the alphabet (never any left out), else UserError saying so."""
        text = text.strip()
        if len(text) != self.length or self.tokenizer.unknown(text):
            raise UserError(f"a prompt must be {self.length} letters from {self.alphabet}, got {text!r}")
        return self.tokenizer.encode(text)

    def describe(self, config):
        return f"sort {self.length} letters from {self.alphabet}"

    def state(self):
        """Plain data for the checkpoint: enough to rebuild the task and its exact split (None:
        the split is unknown, as for a model imported from minGPT or the visualisation)."""
        return {"type": "sort", "length": self.length, "alphabet": self.alphabet,
                "heldout": self.splits["val"].clone() if self.split_known else None}

    @classmethod
    def from_state(cls, state, tokenizer=None, block_size=None, model_vocab_size=None):
        if state["heldout"] is not None:
            return cls(state["length"], state["alphabet"], heldout=state["heldout"])
        task = cls(state["length"], state["alphabet"], heldout=torch.arange(len(state["alphabet"]) ** state["length"]))
        task.split_known = False
        return task
