"""Plots of a training run, as PNG files in its out_dir (needs matplotlib: pip install -e ".[plots]"):

    python -m model.plots --out_dir=out/sort                  # loss.png, attention.png
    python -m model.plots --out_dir=out/chinese --start=天行健

loss.png: the training loss at each logged step, the train/val loss estimates, and for the
sorter the exact-match accuracy. attention.png: one heatmap per layer and head, row t showing
how much position t attends to each earlier position, for the prompt (the sorter: an input and
the model's answer, so you see which input letters each answer letter looks at).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from model import reference as ref
from model.checkpoint import open_model
from model.config import PlotConfig, load_config, run_command
from model.engine import complete
from model.errors import UserError
from model.report import write_report
from model.tasks import ChatTask
from model.tokenizer import UnknownCharacters, visible

PLOT_TOKENS = 24  # the maps show at most this many tokens: more would not be readable
CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS"]


def pyplot():
    """matplotlib's pyplot without a display, or a UserError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError('plots need matplotlib: pip install -e ".[plots]" (or pip install matplotlib)') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_metrics(path):
    """metrics.jsonl -> (step rows with 'loss', evaluation rows with 'val_loss')."""
    if not Path(path).is_file():
        raise UserError(f"{path} not found; it is written by train.py into its out_dir")
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def plot_losses(metrics_path, png_path):
    """Loss curves (and sort accuracy, when logged) from a metrics.jsonl, saved as PNG."""
    plt = pyplot()
    steps, evals = read_metrics(metrics_path)
    has_acc = any("heldout_acc" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6.5, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, label="training loss (step)")
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        ax.plot([r["iter"] for r in evals], [r[key] for r in evals], style, ms=4, label=key.replace("_", " "))
    ax.set(xlabel="iteration", ylabel="cross-entropy loss", yscale="log", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[0, 1]
        for key, name in (("heldout_acc", "held-out inputs"), ("train_acc", "training inputs")):
            ax.plot([r["iter"] for r in evals], [100 * r[key] for r in evals], "o-", ms=4, label=name)
        ax.set(xlabel="iteration", ylabel="exact match (%)", ylim=(-2, 102), title="sorted exactly")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def attention_maps(model, ids):
    """Attention weights for ids (T,): (n_layer, n_head, T, T), each row summing to 1. Computed
    by the NumPy reference, which the tests hold equal to the model."""
    params = ref.params_from_state_dict(model.state_dict())
    _, _, acts = ref.forward(params, model.config, np.array([ids]))
    return np.stack([acts[f"layer{i}"]["att"][0] for i in range(model.config.n_layer)])


def cjk_font():
    """A font that has Chinese characters, if the machine has one."""
    from matplotlib import font_manager
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def plot_attention(model, tokens, ids, png_path):
    """One heatmap per layer (rows) and head (columns), saved as PNG."""
    plt = pyplot()
    att = attention_maps(model, ids)
    L, H, T, _ = att.shape
    labels = [visible(t) for t in tokens]
    wide = any(ord(c) > 0x2E7F for c in "".join(tokens))  # CJK and beyond: not in matplotlib's own font
    font = cjk_font() if wide else None
    if wide and font is None:
        print("notice: no Chinese font found for matplotlib (e.g. install fonts-noto-cjk); the axes show "
              "positions", file=sys.stderr)
        labels = [str(t) for t in range(T)]
    size = max(2.2, 0.28 * T + 1)
    fig, axes = plt.subplots(L, H, figsize=(size * H + 1, size * L + 0.6), squeeze=False)
    for i in range(L):
        for h in range(H):
            ax = axes[i, h]
            image = ax.imshow(att[i, h], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(T), labels, fontsize=8, family=font or "sans-serif")
            ax.set_yticks(range(T), labels, fontsize=8, family=font or "sans-serif")
            ax.set_title(f"layer {i}, head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel("query (position attending)", fontsize=8)
            if i == L - 1:
                ax.set_xlabel("key (position attended to)", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def attention_input(model, task, start):
    """(labels, ids) of what the attention maps show: the prompt (--start; without one the first
    held-out input, or a fresh line; for a model trained to answer, --start or '?' as a question in
    its template), continued greedily by the model up to PLOT_TOKENS tokens or the end of its reply."""
    try:
        if isinstance(task, ChatTask):
            ids = task.encode_messages([{"role": "user", "content": start or "?"}])
        else:
            ids = task.encode_prompt(start) if start or not task.answers("val") else task.answers("val")[0][0]
    except UnknownCharacters as e:
        raise UserError(f"--start has characters the model does not know: {''.join(e.missing)!r}") from None
    ids = ids[-task.block_size:]
    room = min(task.block_size, PLOT_TOKENS) - len(ids)
    if room > 0:
        ids = ids + complete(model, [ids], replace(task.rules, max_tokens=room, temperature=0.0))[0]
    return [task.tokenizer.label(i) for i in ids], ids


def make_plots(source, start=""):
    """loss.png and attention.png beside the checkpoint, then report.md again with the plots linked.
    A model not trained here (a GPT-2 folder, a converted checkpoint) has no metrics: only its
    attention maps are drawn."""
    opened = open_model(source, quiet=True)
    out = opened.path if opened.path.is_dir() else opened.path.parent
    made = []
    if (out / "metrics.jsonl").is_file():
        made.append(plot_losses(out / "metrics.jsonl", out / "loss.png"))
    tokens, ids = attention_input(opened.model, opened.task, start)
    made.append(plot_attention(opened.model, tokens, ids, out / "attention.png"))
    if (out / "run.json").is_file():
        made.append(write_report(out, opened.model, opened.task, opened.ckpt.config, opened.ckpt.iter_num))
    return made


def plots_command(argv):
    cfg = load_config(PlotConfig, argv)
    for path in make_plots(cfg, cfg.start):
        print(path)
    return 0


def main(argv):
    return run_command(plots_command, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
