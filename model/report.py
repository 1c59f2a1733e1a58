"""out_dir/report.md: what a training run was and what it reached. train.py writes it when
training ends (with out_dir/run.json, the run's summary); `python -m model.plots` writes it
again to link the plots it made."""

import json
from dataclasses import replace
from pathlib import Path

from model.engine import Engine, Request, complete, draws, without_stop

PLOTS = {"loss.png": "loss curves", "attention.png": "attention maps"}
SEPARATOR = "-" * 40  # between samples


def write_run_summary(out_dir, summary):
    """Keep the training summary (device, wall time, final losses, ...) beside the checkpoint."""
    (Path(out_dir) / "run.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


def summary_rows(model, task, config, run):
    args = model.config
    rows = [("task", task.describe(config)),
            ("model", f"{model.num_params():,} parameters: n_layer {args.n_layer}, n_head {args.n_head}, "
                      f"n_embd {args.n_embd}, block_size {args.block_size}"),
            ("device", f"{run['device']}, {run['dtype']}, {run['processes']} "
                       f"process{'es' if run['processes'] > 1 else ''}"),
            ("iterations", f"{run['iter_num']} (stopped: {run['stopped']})"),
            ("wall time", f"{run['wall_s']:.1f} s of training")]
    if run.get("peak_memory_mb"):
        where = "GPU memory of tensors" if run["device"].startswith("cuda") else "resident memory of the process"
        rows.append(("peak memory", f"{run['peak_memory_mb']:,.0f} MB ({where})"))
    for key, name in (("train_loss", "final train loss"), ("val_loss", "final val loss")):
        if run.get(key) is not None:
            rows.append((name, f"{run[key]:.4f}"))
    return rows + accuracy_rows(task, run)


def accuracy_rows(task, run):
    """The exact-match rows of a task with answers: held-out and training, with how many were scored."""
    rows = []
    for key, split, name in (("heldout_acc", "val", "held-out exact match"), ("train_acc", "train", "training exact match")):
        if run.get(key) is not None:
            rows.append((name, f"{run[key]:.1%} of {len(task.answers(split))} {task.examples_name}"))
    return rows


def demo(model, task, count=3):
    """The model's greedy answers to the first held-out prompts (the training ones when none is held
    out), each wrong one with what was expected; for text, samples at temperature 0.8 from a fresh
    line (seeded: the same every time)."""
    tok, pairs = task.tokenizer, (task.answers("val") or task.answers("train"))[:count]
    if not pairs:
        requests = [Request(tok.start_ids(), rules) for rules in draws(replace(task.rules, max_tokens=100,
                                                                                 temperature=0.8, seed=1337), count)]
        Engine(model, count).complete(requests)
        return f"\n{SEPARATOR}\n".join(tok.decode(r.prompt + r.tokens) for r in requests)
    room = task.block_size + 1 - max(len(p) for p, _ in pairs)  # the last token written is never read back
    replies = complete(model, [p for p, _ in pairs], replace(task.rules, max_tokens=room, temperature=0.0))
    lines = []
    for (prompt, answer), reply in zip(pairs, replies):
        expected = "" if reply == answer else f"  (expected {tok.decode(without_stop(answer, task.rules))})"
        lines.append(f"{tok.decode(prompt)} -> {tok.decode(without_stop(reply, task.rules))}{expected}")
    return "\n".join(lines)


def write_report(out_dir, model, task, config, iter_num):
    """Write out_dir/report.md for the model at iteration iter_num with its task and the run's
    config (a dict), from out_dir/run.json and the plots found there."""
    out = Path(out_dir)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    lines = [f"# Run report: {out_dir}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(model, task, config, run)]
    lines += ["", f"## Samples (the model at iteration {iter_num})", "", "```text"]
    lines += [demo(model, task), "```", "", "## Plots", ""]
    found = [name for name in PLOTS if (out / name).is_file()]
    lines += [f"![{PLOTS[name]}]({name})" for name in found] or [
        f"None yet: `pip install -e \".[plots]\"`, then `python -m model.plots --out_dir={out_dir}`."]
    lines += ["", "## Config", "", "```python"]
    lines += [f"{k} = {v!r}" for k, v in config.items()] + ["```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
