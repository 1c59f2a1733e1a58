"""python -m model.walkthrough: one forward pass shown step by step, every matrix the model's own."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import assert_writes_each_line, trained_run
from model import reference as ref
from model.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from model.walkthrough import main


@pytest.fixture(scope="module")
def tiny_chinese(tmp_path_factory):
    """configs/walkthrough.py as shipped: 6 channels, 2 heads, 1 block."""
    return trained_run("walkthrough.py", tmp_path_factory.mktemp("walk"))


def test_the_tiny_config_learns_the_corpus(tiny_chinese):
    assert assert_writes_each_line(tiny_chinese).num_params() == 900


def model_logits(out_dir, text):
    """The torch model's own logits for `text` (T, V), to hold the printed numbers against."""
    ckpt = load_checkpoint(out_dir / "ckpt.pt")
    model, tok = model_from_checkpoint(ckpt).double().eval(), tokenizer_from_checkpoint(ckpt)
    with torch.no_grad():
        logits, _ = model(torch.tensor([tok.encode(text)]))
    return logits[0].numpy(), tok


def printed_matrix(text, title):
    """The rows of numbers printed under the step called `title` (text format)."""
    block = text.split(f"] {title}   (", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    return [[float(x) for x in line.split()[1:] if x != "..."] for line in block]


def test_sort_walk_shows_every_step_with_the_models_numbers(trained_sort, capsys):
    base, _ = trained_sort
    out_dir = base / "out" / "sort"
    assert main([f"--out_dir={out_dir}", "--start=CBABBC"]) == 0
    text = capsys.readouterr().out
    titles = re.findall(r"^\[(\d+)\] (.+?)   \((.+)\)$", text, flags=re.M)
    assert len(titles) == 3 + 3 * (1 + 3 * 8 + 8) + 3, "embeddings, 3 blocks of 3 heads, final LN, logits, probs"
    assert titles[0][1:] == ("token embedding", "T x C = 6 x 48")
    assert ("block 1, head 2: causal mask", "T x T = 6 x 6") in [t[1:] for t in titles]
    assert ("block 0: feed-forward, first layer", "T x 4C = 6 x 192") in [t[1:] for t in titles]
    assert "input: 'CBABBC' -> tokens C0 B1 A2 B3 B4 C5 -> ids [2, 1, 0, 1, 1, 2]" in text
    assert "within 1e-09" in text

    logits, _ = model_logits(out_dir, "CBABBC")
    np.testing.assert_allclose(printed_matrix(text, "logits"), logits, atol=0.0005 + 1e-12,
                               err_msg="the printed logits are not the model's")
    mask = text.split("] block 0, head 0: causal mask")[1].split("\n\n")[0].splitlines()
    assert mask[3].split()[2:] == ["-inf"] * 5, "the first token sees only itself"
    probs = text.split("next token after C5: probabilities")[1]
    assert re.search(r"most likely first at temperature 1\n\s+A\s", probs), "the sorted answer starts with A"
    assert [line.split()[:2] for line in probs.splitlines()[3:6]] == [["temperature", "0.5"], ["temperature", "1"],
                                                                      ["temperature", "2"]]


def test_options_pick_layers_heads_decimals_and_columns(trained_sort, capsys):
    base, _ = trained_sort
    assert main([f"--out_dir={base / 'out' / 'sort'}", "--start=CBABBC", "--layers=2", "--heads=1",
                 "--decimals=1", "--max_cols=3", "--temperature=0.8"]) == 0
    text = capsys.readouterr().out
    titles = re.findall(r"^\[\d+\] (.+?)   \(", text, flags=re.M)
    assert len(titles) == 3 + (1 + 8 + 8) + 3
    assert all("block 2" in t for t in titles[3:-3]) and all("head 1" in t for t in titles if re.search(r"head \d", t))
    step = text.split("] token embedding")[1].split("\n\n")[0].splitlines()
    assert step[2].split() == ["c0", "c1", "...", "c47"], "wide matrices: first columns, '...', the last"
    assert re.fullmatch(r"C0(\s+-?\d+\.\d){3}", re.sub(r"\s+\.\.\.", "", step[3]).strip()), "one decimal"
    assert "temperature 0.8" in text and "most likely first at temperature 0.8" in text


@pytest.mark.parametrize("args,message", [
    (["--layers=3"], "--layers=3: the model has 3 layers (0..2); 3 is not one"),
    (["--heads=first"], "--heads must be 'all' or numbers like 0,1; got 'first'"),
    (["--start=CBAD"], "--start has characters the model does not know: 'D'"),
    (["--start=CBABBCABBBCC"], "--start has 12 tokens; this model reads at most block_size=11"),
    (["--start="], "give the input to walk through with --start"),
    (["--format=pdf"], "format must be one of text, md, json, html; got 'pdf'"),
])
def test_bad_options_are_clear_errors(trained_sort, capsys, args, message):
    base, _ = trained_sort
    argv = [f"--out_dir={base / 'out' / 'sort'}", "--start=CBABBC", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_reference_that_disagrees_with_the_model_stops_the_walk(trained_sort, capsys, monkeypatch):
    base, _ = trained_sort
    monkeypatch.setattr(ref, "gelu", lambda x, form="exact": np.maximum(x, 0.0))  # ReLU instead of GELU
    assert main([f"--out_dir={base / 'out' / 'sort'}", "--start=CBABBC"]) == 1
    captured = capsys.readouterr()
    assert "'block 0: GELU' (layer0.act): the NumPy reference and the torch model differ by" in captured.err
    assert captured.out == "", "nothing unchecked is printed"


def test_chinese_walk_as_markdown(tiny_chinese, capsys):
    assert main([f"--out_dir={tiny_chinese}", "--start=天行健", "--format=md"]) == 0
    md = capsys.readouterr().out
    assert "### 1. token embedding\n\n`X_tok[t] = W_te[id_t]" in md and "T x C = 3 x 6" in md
    assert "|  | c0 | c1 | c2 | c3 | c4 | c5 |\n|---|---|---|---|---|---|---|\n| 天0 |" in md
    assert "### 8. block 0, head 0: scores" in md and "|  | 天0 | 行1 | 健2 |" in md
    last = md.split("next token after 健2: probabilities")[1]
    assert "| temperature 0.5 |" in last and "| ... |" in last, "39 characters: columns cut with '...'"


def test_chinese_walk_as_json_holds_every_number(tiny_chinese, capsys):
    assert main([f"--out_dir={tiny_chinese}", "--start=天行健", "--format=json", "--decimals=6"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == ["天", "行", "健"] and data["model"]["n_embd"] == 6
    steps = {s["key"]: s for s in data["steps"]}
    assert len(data["steps"]) == 3 + (1 + 2 * 8 + 8) + 3
    logits, tok = model_logits(tiny_chinese, "天行健")
    assert steps["logits"]["size"] == [3, 39] and steps["logits"]["cols"] == [
        {"\n": "\\n"}.get(c, c) for c in tok.itos], "every column, none cut"
    np.testing.assert_allclose(steps["logits"]["values"], logits, atol=5e-7)
    masked = steps["layer0.head1.masked"]["values"]
    assert masked[0][1] is None and masked[0][2] is None and masked[1][2] is None, "-inf is null"
    probs = np.array(steps["next_probs"]["values"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    top = steps["next_probs"]["cols"][0]
    assert top == ",", f"the model continues 天行健 with ',' (got {top!r})"


@pytest.fixture(scope="module")
def explainer(tmp_path_factory):
    """configs/explainer.py as shipped: sinusoidal positions, post-LN, ReLU, 8 channels, 2 heads."""
    return trained_run("explainer.py", tmp_path_factory.mktemp("explainer"))


def test_the_explainer_config_learns_the_corpus(explainer):
    model = assert_writes_each_line(explainer)
    assert (model.config.positions, model.config.norm, model.config.activation) == ("sinusoidal", "post", "relu")
    assert model.num_params() == 1_184


def test_the_explainer_walk_follows_the_explainers_order(explainer, capsys):
    assert main([f"--out_dir={explainer}", "--start=白日依山尽", "--heads=0"]) == 0
    text = capsys.readouterr().out
    titles = [t.split(": ")[-1] if t.startswith(("block", "next token")) else t.split(":")[0]
              for t in re.findall(r"^\[\d+\] (.+?)   \(", text, flags=re.M)]
    assert titles == ["token embedding", "positional encoding", "embeddings summed", "queries", "keys", "values",
                      "scores", "scaled scores", "causal mask", "attention weights", "weighted values", "heads joined",
                      "attention output", "add (residual)", "LayerNorm 1", "feed-forward, first layer", "ReLU",
                      "feed-forward, second layer", "add (residual)", "the block's output", "logits",
                      "probabilities"], titles
    pe = printed_matrix(text, "positional encoding")
    assert pe[1][:2] == [round(np.sin(1.0), 3), round(np.cos(1.0), 3)], "PE(1, 0) = sin 1, PE(1, 1) = cos 1"
    assert "add & norm: LayerNorm 2: the block's output" in text and "final LayerNorm" not in text


def test_the_modern_config_learns_and_its_walk_shows_rope_and_shared_heads(tmp_path, capsys):
    """configs/modern.py (RoPE, RMSNorm, SwiGLU, grouped-query attention, Q/K norms) learns the three
    lines, and its walkthrough names each new step with numbers checked against the model."""
    from conftest import assert_writes_each_line, run_training, working_dir
    with working_dir(tmp_path):
        run_training("modern.py", tmp_path / "modern")
    assert_writes_each_line(tmp_path / "modern")
    assert main([f"--out_dir={tmp_path / 'modern'}", "--start=天行健", "--layers=1"]) == 0
    text = capsys.readouterr().out
    titles = re.findall(r"^\[\d+\] (.+?)   \(", text, flags=re.M)
    assert titles[0] == "token embedding: the input to block 0", "RoPE adds nothing to the embeddings"
    for title in ("block 1: RMSNorm 1", "block 1, head 3: keys (key/value head 1, shared by query heads 2..3)",
                  "block 1, head 0: queries normed", "block 1, head 2: queries turned by position (RoPE)",
                  "block 1: SiLU of the gate", "block 1: gated", "final RMSNorm"):
        assert title in titles, title
    assert "x cos + rotate_half(x) sin" in text and "within 1e-09" in text
