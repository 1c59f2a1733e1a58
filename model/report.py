"""out_dir/report.md: what a training run was and what it reached. train.py writes it when
training ends (with out_dir/run.json, the run's summary); `python -m model.plots` writes it
again to link the plots it made."""

import json
from pathlib import Path

PLOTS = {"loss.png": "loss curves", "attention.png": "attention maps"}


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
    return rows + task.report_rows(run)


def write_report(out_dir, model, task, config, iter_num, device):
    """Write out_dir/report.md for the model at iteration iter_num (on `device`) with its task and
    the run's config (a dict), from out_dir/run.json and the plots found there."""
    out = Path(out_dir)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    lines = [f"# Run report: {out_dir}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary_rows(model, task, config, run)]
    lines += ["", f"## Samples (the model at iteration {iter_num})", "", "```text"]
    lines += [task.demo(model, device), "```", "", "## Plots", ""]
    found = [name for name in PLOTS if (out / name).is_file()]
    lines += [f"![{PLOTS[name]}]({name})" for name in found] or [
        f"None yet: `pip install -e \".[plots]\"`, then `python -m model.plots --out_dir={out_dir}`."]
    lines += ["", "## Config", "", "```python"]
    lines += [f"{k} = {v!r}" for k, v in config.items()] + ["```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
