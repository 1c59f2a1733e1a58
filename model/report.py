"""out_dir/report.md: what a training run was and what it reached. train.py writes it when
training ends (with out_dir/run.json, the run's summary); `python -m model.plots` writes it
again to link the plots it made."""

import json
from pathlib import Path

import torch

from model.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from model.sampling import generate
from model.tasks import SortTask

PLOTS = {"loss.png": "loss curves", "attention.png": "attention maps"}


def write_run_summary(out_dir, summary):
    """Keep the training summary (device, wall time, final losses, ...) beside the checkpoint."""
    (Path(out_dir) / "run.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


def samples(ckpt, model, count=3, new_tokens=100):
    """A few lines that show what the model does: sort answers to held-out inputs, or text
    sampled at temperature 0.8 (seeded, so the report is the same each time)."""
    if ckpt.get("task", {}).get("type") == "sort":
        task = SortTask.from_state(ckpt["task"])
        letters = task.inputs(task.splits["val"][:count])
        answers = task.answers(model, letters, "cpu")
        tok = task.tokenizer
        return "\n".join(f"{tok.decode(x.tolist())} -> {tok.decode(a.tolist())}"
                         f"{'' if torch.equal(a, x.sort().values) else '  (wrong)'}" for x, a in zip(letters, answers))
    tok = tokenizer_from_checkpoint(ckpt)
    ids = torch.tensor([tok.encode(tok.start_text())] * count)
    out = generate(model, ids, new_tokens, temperature=0.8, generator=torch.Generator().manual_seed(1337))
    return f"\n{'-' * 40}\n".join(tok.decode(row.tolist()) for row in out)


def summary_rows(ckpt, run, params):
    args, cfg = ckpt["model_args"], ckpt["config"]
    task = ckpt.get("task", {})
    what = (f"sort {task['length']} letters from {task['alphabet']}" if task.get("type") == "sort"
            else f"text from {cfg.get('data')} ({args['vocab_size']} characters)")
    rows = [("task", what),
            ("model", f"{params:,} parameters: n_layer {args['n_layer']}, n_head {args['n_head']}, "
                      f"n_embd {args['n_embd']}, block_size {args['block_size']}"),
            ("device", f"{run['device']}, {run['dtype']}, {run['processes']} "
                       f"process{'es' if run['processes'] > 1 else ''}"),
            ("iterations", f"{run['iter_num']} (stopped: {run['stopped']})"),
            ("wall time", f"{run['wall_s']:.1f} s of training")]
    for key, name in (("train_loss", "final train loss"), ("val_loss", "final val loss")):
        if run.get(key) is not None:
            rows.append((name, f"{run[key]:.4f}"))
    if task.get("type") == "sort" and run.get("heldout_acc") is not None:
        sizes = {k: min(len(v), SortTask.EVAL_LIMIT) for k, v in SortTask.from_state(task).splits.items()}
        rows += [("held-out exact match", f"{run['heldout_acc']:.1%} of {sizes['val']} inputs"),
                 ("training exact match", f"{run['train_acc']:.1%} of {sizes['train']} inputs")]
    return rows


def write_report(out_dir):
    """Write out_dir/report.md from out_dir's checkpoint, run.json and the plots found there."""
    out = Path(out_dir)
    ckpt = load_checkpoint(out / "ckpt.pt")
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    model = model_from_checkpoint(ckpt).eval()
    lines = [f"# Run report: {out_dir}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(ckpt, run, model.num_params())]
    lines += ["", f"## Samples (from ckpt.pt, iteration {ckpt['iter_num']})", "", "```text"]
    lines += [samples(ckpt, model), "```", "", "## Plots", ""]
    found = [name for name in PLOTS if (out / name).is_file()]
    lines += [f"![{PLOTS[name]}]({name})" for name in found] or [
        f"None yet: `pip install -e \".[plots]\"`, then `python -m model.plots --out_dir={out_dir}`."]
    lines += ["", "## Config", "", "```python"]
    lines += [f"{k} = {v!r}" for k, v in ckpt["config"].items()] + ["```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
