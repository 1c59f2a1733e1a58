"""Sorting letters: the 3D visualisation's "nano-gpt" task. The input is `length` letters, the
answer the same letters sorted; the loss is on the answer only, and every input is scored."""

import torch

from model.errors import UserError
from model.sampling import generate
from model.tokenizer import CharTokenizer

class SortTask:
    """Inputs are `length` letters from `alphabet`; the answer is the same letters sorted.
    A sequence is the input followed by the answer, e.g. CBABBC ABBBCC; the model reads all
    but its last token and is scored only on the answer, so the targets on input positions
    are -1. Each input is numbered (its letters as base-k digits); a seeded, fixed fraction
    of the numbers is held out and never trained on."""

    EVAL_LIMIT = 10_000  # larger splits are scored on a fixed random subset of this size

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
    def for_training(cls, cfg, start):
        """A new task from the config, or (resuming) the checkpoint's task with its exact split."""
        if start.mode == "resume":
            return cls.from_state(start.ckpt["task"])
        if start.mode == "finetune":
            raise UserError("a sorter is not fine-tuned from another model: train it from scratch, or continue "
                            "it with --init_from=resume")
        return cls(cfg.sort_length, cfg.sort_alphabet, cfg.sort_holdout, cfg.seed)

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

    def answers(self, model, letters, device):
        """The model's greedy answers to inputs (N, length) -> (N, length), on the CPU."""
        return generate(model, letters.to(device), self.length, temperature=0.0)[:, self.length:].cpu()

    def accuracy(self, model, split, device):
        """Greedy exact match: the share of the split's inputs whose whole answer is right."""
        letters = self.inputs(self.splits[split][:self.EVAL_LIMIT])
        right = (self.answers(model, letters, device) == letters.sort(dim=1).values).all(dim=1)
        return right.float().mean().item()

    def evaluate(self, model, device):
        return {"heldout_acc": self.accuracy(model, "val", device),
                "train_acc": self.accuracy(model, "train", device)}

    def solved(self, evaluation):
        """Why training may stop now (every held-out input sorted right), or None."""
        return "heldout_acc 100%" if evaluation.get("heldout_acc") == 1.0 else None

    def state(self):
        """Plain data for the checkpoint: enough to rebuild the task and its exact split (None:
        the split is unknown, as for a model imported from minGPT or the visualisation)."""
        return {"type": "sort", "length": self.length, "alphabet": self.alphabet,
                "heldout": self.splits["val"].clone() if self.split_known else None}

    @classmethod
    def from_state(cls, state):
        if state["heldout"] is not None:
            return cls(state["length"], state["alphabet"], heldout=state["heldout"])
        task = cls(state["length"], state["alphabet"], heldout=torch.arange(len(state["alphabet"]) ** state["length"]))
        task.split_known = False
        return task

    # ---- what the commands show ----

    def describe(self, config):
        return f"sort {self.length} letters from {self.alphabet}"

    def report_rows(self, run):
        if run.get("heldout_acc") is None or not self.split_known:
            return []
        sizes = {k: min(len(v), self.EVAL_LIMIT) for k, v in self.splits.items()}
        return [("held-out exact match", f"{run['heldout_acc']:.1%} of {sizes['val']} inputs"),
                ("training exact match", f"{run['train_acc']:.1%} of {sizes['train']} inputs")]

    def demo(self, model, device, count=3):
        """The model's answers to the first held-out inputs, wrong ones marked."""
        letters = self.inputs(self.splits["val"][:count])
        answers = self.answers(model, letters, device)
        return "\n".join(f"{self.tokenizer.decode(x.tolist())} -> {self.tokenizer.decode(a.tolist())}"
                         f"{'' if torch.equal(a, x.sort().values) else '  (wrong)'}" for x, a in zip(letters, answers))

    def read_letters(self, text):
        """A prompt as letters (1, length), or UserError saying what a prompt must be."""
        return torch.tensor([self.encode_prompt(text)])

    def encode_prompt(self, text):
        """A prompt's ids: `length` letters from the alphabet, else UserError saying so."""
        text = text.strip()
        if len(text) != self.length or self.tokenizer.unknown(text):
            raise UserError(f"a prompt must be {self.length} letters from {self.alphabet}, got {text!r}")
        return self.tokenizer.encode(text)

    def attention_prompt(self, model, start):
        """An input and the model's greedy answer (as trained), as (tokens, ids)."""
        letters = self.read_letters(start) if start else self.inputs(self.splits["val"][:1])
        ids = generate(model, letters, self.length - 1, temperature=0.0)[0].tolist()
        return [self.tokenizer.label(i) for i in ids], ids

    def sample(self, cfg, prompt, model, device):
        """sample.py: --eval scores every input; --start prints its answer; else random inputs, marked."""
        if cfg.eval:
            if not self.split_known:
                n = min(len(self.splits["val"]), self.EVAL_LIMIT)
                print(f"all inputs: {self.accuracy(model, 'val', device):.1%} of {n} sorted exactly (the split this "
                      f"model was trained with is unknown: it was imported, so seen and unseen inputs are mixed)")
                return
            for split, name in (("val", "held-out"), ("train", "training")):
                n = min(len(self.splits[split]), self.EVAL_LIMIT)
                print(f"{name} inputs: {self.accuracy(model, split, device):.1%} of {n} sorted exactly")
            return
        if prompt:
            letters = self.read_letters(prompt)
        else:
            g = torch.Generator().manual_seed(cfg.seed)
            letters = torch.randint(len(self.alphabet), (cfg.num_samples, self.length), generator=g)
        answers = self.answers(model, letters, device)
        heldout = set(self.splits["val"].tolist())
        decode = self.tokenizer.decode
        for inp, ans, number in zip(letters, answers, self.numbers(letters).tolist()):
            expected = inp.sort().values
            mark = "right" if torch.equal(ans, expected) else f"wrong, expected {decode(expected.tolist())}"
            where = ("held-out" if number in heldout else "seen in training") if self.split_known else "split unknown"
            line = f"{decode(inp.tolist())} -> {decode(ans.tolist())}"
            print(line if prompt else f"{line}  ({mark}; {where})")
        if prompt and not torch.equal(answers[0], letters[0].sort().values):
            print(f"(wrong: sorted is {decode(letters[0].sort().values.tolist())})")
