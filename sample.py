"""Sample from a trained model: python sample.py --temperature 0.8

With no --out_dir or --ckpt it uses the checkpoint train.py wrote last. Sort checkpoints:
--start CBABBC prints its answer; --eval scores every possible input. Models trained on .jsonl
pairs or conversations: --start="question" prints the reply; --chat is a conversation.
"""

import sys
from pathlib import Path

from model.checkpoint import open_model
from model.config import SampleConfig, load_config, run_command
from model.data import decode_utf8
from model.engine import Engine
from model.errors import UserError
from model.tasks import ChatTask, SortTask, chat_task
from model.terminal import answer, continue_text, converse, score_sort, show_sort


def read_prompt(start):
    """--start's text, or the UTF-8 text of the file FILE:path names."""
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise UserError(f"prompt file {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
        return decode_utf8(path.read_bytes(), path, 0, 0, False)  # a file that is not UTF-8: one line, as for data
    return start


def sample(argv):
    cfg = load_config(SampleConfig, argv)
    opened = open_model(cfg, cfg.device, dtype=cfg.dtype)
    task, prompt = opened.task, read_prompt(cfg.start)
    if cfg.chat or cfg.system:
        task = chat_task(opened.ckpt, opened.task)
        if task is None:
            raise UserError(f"{opened.path} was not trained to answer (it is a {opened.task.state()['type']} model) and "
                            f"has no chat template; --chat and --system need one trained on .jsonl pairs or "
                            f"conversations, or a folder with a chat template")
    vocab, ids = opened.tokenizer, opened.model.config.vocab_size
    if vocab is None:
        print("notice: this checkpoint has no vocabulary (a nanoGPT checkpoint keeps it in meta.pkl); "
              "printing token ids. Pass --meta=path/to/meta.pkl to see text", file=sys.stderr)
    elif vocab.vocab_size < ids:
        print(f"notice: the vocabulary has {vocab.vocab_size} tokens, the model {ids} ids; ids past the "
              f"vocabulary are never sampled", file=sys.stderr)
    engine = Engine(opened.model, max_batch=cfg.num_samples, use_cache=cfg.kv_cache)
    if isinstance(task, SortTask):
        return score_sort(opened.model, task) if cfg.eval else show_sort(engine, task, prompt, cfg.num_samples, cfg.seed)
    if isinstance(task, ChatTask) and cfg.chat:
        return converse(engine, task, cfg.rules(task), cfg.system, cfg.drop_unknown)
    if isinstance(task, ChatTask):
        return answer(engine, task, prompt, cfg.rules(task), cfg.num_samples, cfg.system, cfg.drop_unknown)
    return continue_text(engine, task, prompt, cfg.rules(task), cfg.num_samples, cfg.drop_unknown)


def main(argv):
    return run_command(lambda args: sample(args) or 0, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
