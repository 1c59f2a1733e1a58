"""Hugging Face folders damaged in every way a download or a hand edit can leave them: each is one
line naming the file and what is wrong, exit code 2, for GPT-2 and the Llama family alike, from
every command that opens a folder."""

import json
import shutil

import pytest

import sample as sample_cli
import train as train_cli
from conftest import ROOT, working_dir
from model.convert import main as convert_main
from model.walkthrough import main as walk_main

transformers = pytest.importorskip("transformers")  # the [hf] extra; CI installs it, so nothing skips there
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from test_hf import byte_level_bpe, tiny_gpt2  # noqa: E402
from test_hf_llama import tiny  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    base = tmp_path_factory.mktemp("good")
    gpt2 = tiny_gpt2(base / "gpt2", 300, 0)
    byte_level_bpe().save(str(gpt2 / "tokenizer.json"))
    return {"gpt2": gpt2, "llama": tiny(base / "llama", "llama")}


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))


def lacking(config, gpt2_field, llama_field):
    config.pop(gpt2_field if config["model_type"] == "gpt2" else llama_field)
    return config


def shard(folder):
    """model.safetensors as two shards and their index, then the second shard lost."""
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00002-of-00002.safetensors").unlink()


def without_a_tensor(folder):
    state = load_file(folder / "model.safetensors")
    state.pop("model.norm.weight" if "model.norm.weight" in state else "transformer.ln_f.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def grown_tokenizer(path):
    """The tokenizer of a model with 50 ids more than this one has."""
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([f"<extra_{i}>" for i in range(50)])
    tok.save(str(path))


def truncated(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


DAMAGE = {  # what is done to the folder -> what the one line must say
    "config not an object": (lambda f: (f / "config.json").write_text("[1, 2, 3]"), "config.json holds a JSON list"),
    "config not JSON": (lambda f: (f / "config.json").write_text('{"model_type": '), "config.json cannot be read as JSON"),
    "config lacks a field": (lambda f: edit_config(f, lambda c: lacking(c, "n_layer", "num_hidden_layers")), "lacks '"),
    "a field of the wrong kind": (lambda f: edit_config(f, lambda c: {**c, "vocab_size": "300"}),
                                  "config.json: vocab_size='300' is not an integer"),
    "a field no model can have": (lambda f: edit_config(f, lambda c: {**c, "vocab_size": 0}),
                                  "config.json: vocab_size must be a positive integer"),
    "weights truncated": (truncated, "model.safetensors cannot be read"),
    "weights not safetensors": (lambda f: (f / "model.safetensors").write_bytes(b"<html>404</html>" * 10),
                                "model.safetensors cannot be read"),
    "a shard missing": (shard, "model.safetensors.index.json names the shard model-00002-of-00002.safetensors"),
    "a tensor missing": (without_a_tensor, "weight"),
    "tokenizer_config not JSON": (lambda f: (f / "tokenizer_config.json").write_text("{oops"),
                                  "tokenizer_config.json cannot be read as JSON"),
    "another model's tokenizer": (lambda f: grown_tokenizer(f / "tokenizer.json"), "tokens but the model only"),
}


def damaged(good, kind, damage, tmp_path):
    folder = tmp_path / kind
    shutil.copytree(good[kind], folder)
    DAMAGE[damage][0](folder)
    return folder


def one_line(capsys, code, words):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("error: ") and words in err[-1] and "Traceback" not in "\n".join(err), err
    return err[-1]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_folder_is_one_line_naming_the_file(good, kind, damage, tmp_path, capsys):
    folder = damaged(good, kind, damage, tmp_path)
    line = one_line(capsys, sample_cli.main([f"--ckpt={folder}", "--start=The", "--max_new_tokens=3"]), DAMAGE[damage][1])
    assert str(folder) in line, "the line names the folder's file"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_every_command_that_opens_a_folder_says_so(good, kind, tmp_path, capsys):
    """train (fine-tuning from it), convert, the walkthrough, the plots and the server, besides sample.py."""
    from model.plots import main as plots_main
    from model.serve.__main__ import serve
    from model.config import run_command
    folder = damaged(good, kind, "weights truncated", tmp_path)
    (tmp_path / "my.txt").write_text("The quick brown fox. " * 50, encoding="utf-8")
    words = DAMAGE["weights truncated"][1]
    with working_dir(tmp_path):
        one_line(capsys, train_cli.main([str(ROOT / "configs" / "finetune.py"), f"--init_from={folder}",
                                         f"--data={tmp_path / 'my.txt'}", f"--out_dir={tmp_path / 'ft'}"]), words)
    one_line(capsys, convert_main([str(folder), str(tmp_path / "out")]), words)
    one_line(capsys, walk_main([f"--ckpt={folder}", "--start=The"]), words)
    one_line(capsys, plots_main([f"--ckpt={folder}"]), words)
    one_line(capsys, run_command(serve, [f"--ckpt={folder}", "--port=0"]), words)
