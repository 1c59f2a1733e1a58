"""The 3D LLM visualisation's sorter and minGPT's state_dicts: imported, they run here; exported,
every tensor is the visualisation's own, and the activations are the NumPy reference's."""

import base64
import json

import numpy as np
import pytest
import torch

import sample as sample_cli
from conftest import ROOT
from model import reference as ref
from model.checkpoint import open_model
from model.convert import main as convert_main
from model.llmviz import decode_tensor

VIZ = ROOT / "tests" / "data" / "llm-viz" / "gpt-nano-sort-model.json"  # shipped with its MIT licence beside it


def tensors(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["config"], {k: decode_tensor(k, v, path) for k, v in data.items() if k != "config"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    dest = tmp_path_factory.mktemp("viz") / "sorter"
    assert convert_main([str(VIZ), str(dest)]) == 0
    return dest


def test_the_visualisations_sorter_sorts_every_input(imported, capsys):
    assert sample_cli.main([f"--ckpt={imported}", "--start=CBABBC"]) == 0
    assert capsys.readouterr().out.strip() == "CBABBC -> ABBBCC"
    assert sample_cli.main([f"--ckpt={imported}", "--eval"]) == 0
    out = capsys.readouterr().out
    assert "all inputs: 100.0% of 729 sorted exactly (the split this model was trained with is unknown" in out
    model = open_model(imported, quiet=True).model
    assert model.num_params() == 85_728 and model.config.head == "untied" and model.config.activation == "gelu_tanh"


def test_exported_back_every_tensor_is_the_original(imported, tmp_path):
    assert convert_main([str(imported), str(tmp_path), "--to=llmviz"]) == 0
    config, theirs = tensors(VIZ)
    got_config, ours = tensors(tmp_path / "gpt-nano-sort-model.json")
    assert list(ours) == list(theirs), "the same tensors, in the same order"
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), f"{k} differs from the visualisation's file"
    assert {k: got_config[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")} == \
        {k: config[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")}


def test_partials_are_the_reference_forward_pass(imported, tmp_path):
    assert convert_main([str(imported), str(tmp_path), "--to=llmviz", "--start=CBABBC,ABCABC"]) == 0
    config, parts = tensors(tmp_path / "gpt-nano-sort-t0-partials.json")
    assert config["B"] == 2 and config["block_size"] == 11
    idx = parts["idx"].numpy().astype(np.int64)
    assert idx.tolist() == [[2, 1, 0, 1, 1, 2, 0, 1, 1, 1, 2], [0, 1, 2, 0, 1, 2, 0, 0, 1, 1, 2]], \
        "each row: the input, then the model's greedy answer (its first five letters)"
    model = open_model(imported, quiet=True).model
    _, _, acts = ref.forward(ref.params_from_state_dict(model.state_dict()), model.config, idx)
    a = acts["layer0"]
    expected = {"tok_emb": acts["tok_emb"], "pos_emb": acts["pos_emb"][None], "x": acts["x0"], "ln1": a["ln_1"],
                "qkv": a["qkv"], "q": a["q"], "k": a["k"], "v": a["v"], "att": a["masked"], "attSm": a["att"],
                "y": a["y"], "yProj": a["attn_out"], "attnResid": a["sum_1"], "ln2": a["ln_2"], "fc": a["fc"],
                "gelu": a["act"], "mlp": a["mlp_out"], "mlpResid": a["sum_2"], "block2": acts["layer2"]["x_out"],
                "ln_f": acts["ln_f"], "lm_head": acts["logits"], "probs": ref.softmax(acts["logits"])}
    for name, value in expected.items():
        np.testing.assert_allclose(parts[name].numpy(), value.astype(np.float32), rtol=1e-6, atol=1e-6,
                                   err_msg=f"partial {name!r}")
    assert parts["att"].shape == (2, 3, 11, 11) and torch.isinf(parts["att"][0, 0, 0, 1]), "-inf above the diagonal"
    assert parts["probs"][..., :].sum(-1).sub(1).abs().max() < 1e-5


def test_our_sorter_exports_with_a_note_when_it_computes_differently(trained_sort, tmp_path, capsys):
    base, _ = trained_sort
    assert convert_main([str(base / "out" / "sort"), str(tmp_path), "--to=llmviz"]) == 0
    assert "note:" not in capsys.readouterr().err, "configs/sort.py computes what the visualisation computes"
    ckpt = torch.load(base / "out" / "sort" / "ckpt.pt", weights_only=True)
    ckpt["model_extra"]["activation"] = "gelu"
    torch.save(ckpt, tmp_path / "exact.pt")
    assert convert_main([str(tmp_path / "exact.pt"), str(tmp_path / "exact"), "--to=llmviz"]) == 0
    assert "has activation='gelu'; the visualisation computes activation='gelu_tanh'" in capsys.readouterr().err
    config, ours = tensors(tmp_path / "gpt-nano-sort-model.json")
    assert torch.equal(ours["lm_head.weight"], ours["transformer.wte.weight"]), "the tied head is written out"
    assert torch.equal(ours["transformer.h.0.attn.bias"], torch.tril(torch.ones(11, 11)).view(1, 1, 11, 11))


def test_a_mingpt_state_dict_needs_n_head_and_then_converts(tmp_path, capsys):
    _, state = tensors(VIZ)
    torch.save(state, tmp_path / "mingpt.pt")
    assert convert_main([str(tmp_path / "mingpt.pt"), str(tmp_path / "a")]) == 2
    assert "is a bare state_dict, which does not record the number of heads; give it with --n_head" in \
        capsys.readouterr().err
    assert convert_main([str(tmp_path / "mingpt.pt"), str(tmp_path / "a"), "--n_head=3"]) == 0
    capsys.readouterr()
    assert sample_cli.main([f"--ckpt={tmp_path / 'a'}", "--start=CCBAAB"]) == 0
    assert capsys.readouterr().out.strip() == "CCBAAB -> AABBCC"


def bad(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_bad_visualisation_files_are_one_clear_line(tmp_path, capsys):
    config, _ = tensors(VIZ)
    original = json.loads(VIZ.read_text(encoding="utf-8"))
    short = dict(original)
    short["transformer.wte.weight"] = {**original["transformer.wte.weight"],
                                       "data": base64.b64encode(b"\0" * 12).decode()}
    cases = {
        bad(tmp_path, "notjson.json", "{nope"): "is not JSON",
        bad(tmp_path, "other.json", {"weights": [1, 2, 3]}): "is not a visualisation model file",
        bad(tmp_path, "short.json", short): "entry 'transformer.wte.weight' holds 12 bytes, but shape [3, 48] needs 576",
        bad(tmp_path, "heads.json", {**original, "config": {**config, "n_head": 5}}): "n_embd=48 is not divisible by n_head=5",
    }
    for path, message in cases.items():
        assert convert_main([str(path), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (path.name, err)
