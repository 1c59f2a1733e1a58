"""Sample from a trained model: python sample.py --temperature 0.8

With no --out_dir or --ckpt it uses the checkpoint train.py wrote last. Sort checkpoints:
--start CBABBC prints its answer; --eval scores every possible input.
"""

import sys
from pathlib import Path

import torch

from model.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from model.config import SampleConfig, UserError, load_config, run_command
from model.sampling import generate
from model.tasks import SortTask
from model.trainer import resolve_device


def load_model(cfg):
    """The checkpoint's model (in eval mode) and tokenizer, on the chosen device."""
    device = resolve_device(cfg.device)
    path = find_checkpoint(cfg.out_dir, cfg.ckpt)
    print(f"checkpoint: {path}", file=sys.stderr)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, device).eval()
    tokenizer = tokenizer_from_checkpoint(ckpt, cfg.meta)
    if tokenizer is None:
        print("notice: this checkpoint has no vocabulary (a nanoGPT checkpoint keeps it in meta.pkl); "
              "printing token ids. Pass --meta=path/to/meta.pkl to see text", file=sys.stderr)
    elif tokenizer.vocab_size != model.config.vocab_size:
        print(f"notice: the vocabulary has {tokenizer.vocab_size} characters, the model "
              f"{model.config.vocab_size} ids; ids past the vocabulary are never sampled", file=sys.stderr)
    return ckpt, model, tokenizer, device


def read_prompt(start):
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise UserError(f"prompt file {path} not found")
        return path.read_text(encoding="utf-8")
    return start


def sample_ids(cfg, model, device):
    """No vocabulary: sample from token 0 (or --start given as ids, '1 5 2') and print ids."""
    try:
        ids = [int(t) for t in read_prompt(cfg.start).split()] or [0]
    except ValueError:
        raise UserError(f"without a vocabulary --start must be token ids like '1 5 2', got {cfg.start!r}") from None
    generator = torch.Generator(device).manual_seed(cfg.seed)
    for _ in range(cfg.num_samples):
        out = generate(model, torch.tensor([ids], device=device), cfg.max_new_tokens, cfg.temperature,
                       cfg.top_k, cfg.top_p, generator, cfg.kv_cache)
        print(" ".join(str(i) for i in out[0].tolist()))


def sample_text(cfg, model, tokenizer, device):
    """Print num_samples continuations of the prompt, streaming characters as they come."""
    prompt = read_prompt(cfg.start) or tokenizer.start_text()
    ids = tokenizer.encode(prompt, drop_unknown=cfg.drop_unknown)
    if not ids:
        raise UserError("the prompt is empty once unknown characters are dropped; give --start with known characters")
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"notice: the prompt has {len(ids)} tokens; the model reads its last {block_size} (block_size)",
              file=sys.stderr)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    top_k = cfg.top_k
    if model.config.vocab_size > tokenizer.vocab_size:  # never sample an id with no character
        top_k = min(top_k or tokenizer.vocab_size, tokenizer.vocab_size)
    for i in range(cfg.num_samples):
        print(tokenizer.decode(ids), end="", flush=True)
        generate(model, torch.tensor([ids], device=device), cfg.max_new_tokens, cfg.temperature, top_k,
                 cfg.top_p, generator, cfg.kv_cache,
                 on_token=lambda t: print(tokenizer.decode(t[0].tolist()), end="", flush=True))
        print("\n" + ("-" * 40 if i < cfg.num_samples - 1 else ""))


def run_sort(cfg, ckpt, model, device):
    task = SortTask.from_state(ckpt["task"])
    tok = task.tokenizer
    if cfg.eval:
        for split, name in (("val", "held-out"), ("train", "training")):
            n = min(len(task.splits[split]), task.EVAL_LIMIT)
            print(f"{name} inputs: {task.accuracy(model, split, device):.1%} of {n} sorted exactly")
        return
    if cfg.start:
        text = read_prompt(cfg.start).strip()
        bad = tok.unknown(text)
        if len(text) != task.length or bad:
            raise UserError(f"--start must be {task.length} letters from {task.alphabet}, got {text!r}")
        letters = torch.tensor([tok.encode(text)])
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        letters = torch.randint(len(task.alphabet), (cfg.num_samples, task.length), generator=g)
    answers = task.answers(model, letters, device)
    heldout = set(task.splits["val"].tolist())
    for inp, ans, number in zip(letters, answers, task.numbers(letters).tolist()):
        expected = inp.sort().values
        mark = "right" if torch.equal(ans, expected) else f"wrong, expected {tok.decode(expected.tolist())}"
        where = "held-out" if number in heldout else "seen in training"
        line = f"{tok.decode(inp.tolist())} -> {tok.decode(ans.tolist())}"
        print(line if cfg.start else f"{line}  ({mark}; {where})")
    if cfg.start and not torch.equal(answers[0], letters[0].sort().values):
        print(f"(wrong: sorted is {tok.decode(letters[0].sort().values.tolist())})")


def sample(argv):
    cfg = load_config(SampleConfig, argv)
    ckpt, model, tokenizer, device = load_model(cfg)
    if ckpt.get("task", {}).get("type") == "sort":
        run_sort(cfg, ckpt, model, device)
    elif tokenizer is None:
        sample_ids(cfg, model, device)
    else:
        sample_text(cfg, model, tokenizer, device)
    return 0


def main(argv):
    return run_command(sample, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
