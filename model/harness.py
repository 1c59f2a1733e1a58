"""Evaluation with lm-evaluation-harness (lm-eval): any model we open as an lm-eval language model,
and `python -m model.eval` to run its tasks on one:

    python -m model.eval --out_dir=out/numerals --tasks=numerals [--limit=100] [--include_path=data/eval]

Offline, tasks come from YAML files with local .jsonl data (lm-eval's `dataset_path: json`);
data/eval/ ships some for our data. Texts are encoded as transformers encodes them (special
tokens' spellings read as those tokens), so the numbers equal lm-eval's own `hf` model on our
Hugging Face export (python -m model.convert DIR DEST --to=hf).
"""

import sys
from dataclasses import dataclass

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from model.checkpoint import open_model
from model.config import Decoding, load_config, run_command
from model.engine import Engine, Request, Rules, without_stop
from model.errors import UserError
from model.tasks import chat_task, end_of_text
from model.tokenizer import encode_as_transformers


class SmallGPT(LM):
    """lm-eval's LM interface over one of our models: loglikelihood, loglikelihood_rolling and
    generate_until, batched (requests sorted longest first, as lm-eval's own models do)."""

    def __init__(self, opened, batch_size=16):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = opened.model, opened.tokenizer, batch_size
        self.max_length = opened.model.config.block_size
        self.end = end_of_text(chat_task(opened.ckpt, opened.task), self.tokenizer)
        self.prefix = self.end if self.end is not None else self.tokenizer.start_ids()[0]  # what an empty context is
        self.on = next(opened.model.parameters()).device

    def encode(self, text):
        return encode_as_transformers(self.tokenizer, text)

    def pair(self, context, continuation):
        """(context ids, continuation ids) as lm-eval's hf model splits them: trailing spaces of the
        context move to the continuation, which is what the whole encodes past the context; an empty
        context is the prefix token (the end of text or turn)."""
        if not context:
            return [self.prefix], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        start = self.encode(context)
        return start, self.encode(context + continuation)[len(start):]

    @torch.no_grad()
    def score(self, pairs):
        """[(context ids, continuation ids)] -> [(sum of the continuation's log-probabilities, whether
        it is the greedy one)], at most block_size tokens read (the context's start cut off)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out = [None] * len(pairs)
        for k in range(0, len(order), self.batch_size):
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in order[k:k + self.batch_size]]
            x = torch.full((len(rows), max(map(len, rows))), self.prefix, dtype=torch.long)
            for b, r in enumerate(rows):
                x[b, :len(r)] = torch.tensor(r)
            logp = torch.log_softmax(self.model(x.to(self.on))[0].float(), dim=-1)
            for b, i in enumerate(order[k:k + self.batch_size]):
                cont = pairs[i][1]
                at = logp[b, len(rows[b]) - len(cont):len(rows[b])]
                target = torch.tensor(cont, device=at.device)
                out[i] = (at.gather(-1, target[:, None]).sum().item(), bool((at.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        return self.score([self.pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each text's whole log-probability, in windows of block_size tokens (lm-eval's own windows)."""
        windows, owner = [], []
        for n, r in enumerate(requests):
            for w in map(make_disjoint_window, get_rolling_token_windows(self.encode(r.args[0]), self.prefix,
                                                                          self.max_length, context_len=1)):
                windows.append(w)
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self.score(windows)):
            totals[n] += logp
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy (or sampled, with do_sample) continuations through the engine, cut at the first
        `until` string; a chat model's end of turn ends one too."""
        decoded = []
        for r in requests:
            context, kwargs = r.args
            prompt = self.encode(context)[-(self.max_length - 1):] or [self.prefix]
            until = kwargs.get("until") or []
            rules = Rules(max_tokens=min(kwargs.get("max_gen_toks", 256), self.max_length - len(prompt)),
                          temperature=kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0,
                          stop=tuple([until] if isinstance(until, str) else until),
                          stop_ids=(self.end,) if self.end is not None else ())
            decoded.append(Request(prompt, rules))
        Engine(self.model, max_batch=self.batch_size).complete(decoded)
        return [cut(self.tokenizer.decode(without_stop(r.tokens, r.rules)), r.rules.stop) for r in decoded]


def cut(text, stops):
    """The text before the first stop string (the engine stops after it; its text may hold it whole)."""
    for s in stops:
        text = text.split(s)[0]
    return text


@dataclass
class EvalConfig(Decoding):
    tasks: str = ""  # lm-eval task names, comma-separated (data/eval/ holds ours; --include_path adds folders)
    include_path: str = "data/eval"  # folders of task YAML files
    limit: int = 0  # examples per task at most (0: all)
    num_fewshot: int = -1  # -1: each task's own
    batch_size: int = 16

    def validate(self):
        super().validate()
        if not self.tasks:
            raise UserError("give --tasks=NAME[,NAME...] (e.g. --tasks=numerals; data/eval/ holds our tasks)")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")


def evaluate(cfg):
    """lm-eval's results dict for the config's model and tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    names = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    manager = TaskManager(include_path=cfg.include_path or None, include_defaults=False)  # ours: read in a moment
    if any(t not in manager.all_tasks for t in names):  # lm-eval's own: its index of thousands of files
        manager = TaskManager(include_path=cfg.include_path or None)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval knows no task {', '.join(unknown)}; ours are in {cfg.include_path} (or give "
                        f"--include_path=FOLDER of task YAML files)")
    lm = SmallGPT(open_model(cfg, cfg.device, dtype=cfg.dtype), cfg.batch_size)
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=cfg.limit or None,
                           num_fewshot=None if cfg.num_fewshot < 0 else cfg.num_fewshot, log_samples=False)


def eval_command(argv):
    from lm_eval.utils import make_table
    results = evaluate(load_config(EvalConfig, argv))
    print(make_table(results))
    return 0


def main(argv):
    return run_command(eval_command, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
