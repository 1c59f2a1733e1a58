"""Hugging Face GPT-2 folders in and out, held to transformers' own behaviour. The folders are
built here, offline: tiny GPT-2 models with random weights, and tokenizers made with `tokenizers`."""

import json
import pickle

import numpy as np
import pytest
import torch

import sample as sample_cli
import train as train_cli
from conftest import ROOT, nanogpt_checkpoint, working_dir
from model.checkpoint import load_checkpoint, open_model
from model.convert import main as convert_main

transformers = pytest.importorskip("transformers")  # the [hf] extra; CI installs it, so nothing skips there
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

ENGLISH = "The quick brown fox jumps over the lazy dog. It was 42 degrees, and the dog slept.\n" * 40
CHINESE_CHARS = list(dict.fromkeys("白日依山尽黄河入海流马无夜草不肥人横财富天行健君子以自强息地势坤厚德载物"))
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "。"] + CHINESE_CHARS
MIXED = "The quick fox, 42 dogs. It was cold."


def byte_level_bpe(size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([ENGLISH], trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def tiny_gpt2(folder, vocab_size, seed, **config):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, **config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorms and biases random too: defaults of 1 and 0 would hide mistakes
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """english: byte-level BPE, GPT-2's defaults; chinese: a BERT vocab.txt, exact GELU;
    eps: byte-level BPE, gelu_new and layer_norm_epsilon 1e-3."""
    base = tmp_path_factory.mktemp("hf")
    bpe = byte_level_bpe()
    english = tiny_gpt2(base / "english", bpe.get_vocab_size(), 0)
    bpe.save(str(english / "tokenizer.json"))
    chinese = tiny_gpt2(base / "chinese", len(BERT_VOCAB), 1, activation_function="gelu")
    (chinese / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    (chinese / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    eps = tiny_gpt2(base / "eps", bpe.get_vocab_size(), 2, activation_function="gelu_new", layer_norm_epsilon=1e-3)
    bpe.save(str(eps / "tokenizer.json"))
    return {"english": english, "chinese": chinese, "eps": eps}


def hf_model(folder, dtype=torch.float32):
    return transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval()


def prompt_of(name):
    return "天行健,君子" if name == "chinese" else "The quick brown"


# ---- reading a folder ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["english", "chinese", "eps"])
def test_logits_equal_transformers(name, folders):
    ours = open_model(folders[name], quiet=True)
    ids = torch.tensor([ours.tokenizer.encode(prompt_of(name))])
    theirs32 = hf_model(folders[name])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids)[0], theirs32(ids).logits, rtol=0, atol=1e-5,
                                   msg=lambda m: f"{name}, float32: {m}")
        diff = (ours.model.double()(ids)[0] - hf_model(folders[name], torch.float64)(ids).logits).abs().max().item()
    assert diff < 1e-10, f"{name}, float64: logits differ by {diff:.2e}"


@pytest.mark.parametrize("name", ["english", "chinese", "eps"])
def test_greedy_sample_py_equals_transformers_generate(name, folders, capsys):
    folder = folders[name]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = prompt_of(name)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    banned = [[tok.convert_tokens_to_ids(t)] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] \
        if name == "chinese" else None  # ours never samples BERT's structure tokens: ask the same of theirs
    out = hf_model(folder).generate(ids, max_new_tokens=20, do_sample=False, bad_words_ids=banned, pad_token_id=0)
    assert sample_cli.main([f"--ckpt={folder}", f"--start={prompt}", "--temperature=0", "--max_new_tokens=20",
                            "--num_samples=1"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    expected = tok.decode(out[0], skip_special_tokens=False)
    if name == "chinese":  # BertTokenizer's decode spaces every character; ours joins Chinese characters
        expected = expected.replace(" ", "")
    assert printed == expected, f"{name}: sample.py printed {printed!r}, transformers generated {expected!r}"


@pytest.mark.parametrize("name", ["english", "chinese"])
def test_tokenizer_ids_equal_transformers(name, folders):
    text = MIXED if name == "english" else "天行健,君子以自强不息。\n地势坤,君子以厚德载物。"
    ours = open_model(folders[name], quiet=True).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(folders[name])
    assert ours.encode(text) == theirs(text, add_special_tokens=False).input_ids


def test_special_tokens_are_never_sampled(folders, capsys):
    assert sample_cli.main([f"--ckpt={folders['chinese']}", "--start=天", "--temperature=3", "--max_new_tokens=200",
                            "--num_samples=4"]) == 0
    out = capsys.readouterr().out
    assert not any(t in out for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")), out[:300]


def test_attention_plots_of_a_folder(folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import shutil
    from model.plots import main as plots_main
    folder = shutil.copytree(folders["english"], tmp_path / "gpt2")
    assert plots_main([f"--out_dir={folder}", "--start=The quick brown fox"]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "attention.png")], "no metrics, so no loss curves"


def test_walkthrough_reads_a_folder(folders, capsys):
    from model.walkthrough import main as walk_main
    assert walk_main([f"--ckpt={folders['eps']}", "--start=The fox", "--layers=0", "--heads=0"]) == 0
    text = capsys.readouterr().out
    assert "sqrt(var(x) + 0.001)" in text and "tanh" in text, "the folder's epsilon and GELU form reach the model"


# ---- converting ---------------------------------------------------------------------------

def state(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_hf_to_ours_to_hf_is_exact(folders, tmp_path):
    assert convert_main([str(folders["english"]), str(tmp_path / "ours")]) == 0
    assert convert_main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to=hf"]) == 0
    before, after = state(folders["english"]), state(tmp_path / "back")
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed on the way hf -> ours -> hf"
    a = transformers.AutoTokenizer.from_pretrained(folders["english"])
    b = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert a(MIXED).input_ids == b(MIXED).input_ids
    ckpt = load_checkpoint(tmp_path / "ours" / "ckpt.pt")
    assert ckpt.config["converted_from"] == str(folders["english"].resolve()), "says where it came from"


def test_ours_to_hf_to_ours_is_exact_and_transformers_runs_it(trained_chinese, tmp_path):
    base, _ = trained_chinese
    run = base / "out" / "chinese"
    assert convert_main([str(run), str(tmp_path / "hf"), "--to=hf"]) == 0
    ours = open_model(run, quiet=True)
    theirs = hf_model(tmp_path / "hf")
    text = "天行健,君子以自强不息\n"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok(text).input_ids == ours.tokenizer.encode(text), "AutoTokenizer reads the characters back to our ids"
    assert tok.decode(ours.tokenizer.encode(text)) == text
    ids = torch.tensor([ours.tokenizer.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours.model(ids)[0], rtol=0, atol=1e-5)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "again")]) == 0
    again = load_checkpoint(tmp_path / "again" / "ckpt.pt")
    original = load_checkpoint(run / "ckpt.pt")
    assert set(again.model) == set(original.model)
    for k, v in original.model.items():
        assert torch.equal(again.model[k], v), f"{k} changed on the way ours -> hf -> ours"
    assert open_model(tmp_path / "again", quiet=True).tokenizer.encode(text) == ours.tokenizer.encode(text)


def test_a_nanogpt_checkpoint_converts_with_its_meta_pkl(tmp_path, capsys):
    (tmp_path / "nano").mkdir()
    path = nanogpt_checkpoint(tmp_path / "nano" / "ckpt.pt")
    assert convert_main([str(path), str(tmp_path / "ours")]) == 2
    assert "has no vocabulary (a nanoGPT checkpoint?) and no meta.pkl beside it" in capsys.readouterr().err
    itos = {0: "\n", 1: "a", 2: "b", 3: "c", 4: "d"}
    with open(tmp_path / "nano" / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 5, "itos": itos, "stoi": {v: k for k, v in itos.items()}}, f)
    assert convert_main([str(path), str(tmp_path / "ours")]) == 0
    assert convert_main([str(path), str(tmp_path / "hf"), "--to=hf"]) == 0
    capsys.readouterr()
    assert sample_cli.main([f"--ckpt={tmp_path / 'ours'}", "--start=ab", "--max_new_tokens=8", "--num_samples=1"]) == 0
    assert set(capsys.readouterr().out) <= set("\nabcd")
    logits = hf_model(tmp_path / "hf")(torch.tensor([[1, 2]])).logits
    mine = open_model(tmp_path / "ours", quiet=True).model(torch.tensor([[1, 2]]))[0]
    torch.testing.assert_close(logits, mine, rtol=0, atol=1e-5)


# ---- fine-tuning --------------------------------------------------------------------------

def test_finetune_a_bert_vocabulary_model_grows_it_and_learns(folders, tmp_path, capsys):
    corpus = (ROOT / "data" / "poems" / "input.txt").read_text(encoding="utf-8")
    (tmp_path / "poems.txt").write_text(corpus * 4, encoding="utf-8")
    args = [str(ROOT / "configs" / "finetune.py"), f"--init_from={folders['chinese']}", f"--data={tmp_path / 'poems.txt'}",
            "--max_iters=150", "--eval_interval=150", "--lr_decay_iters=150", "--log_interval=1", "--learning_rate=3e-3",
            "--block_size=32"]
    with working_dir(tmp_path):
        assert train_cli.main(args + [f"--out_dir={tmp_path / 'grown'}"]) == 0
        err = capsys.readouterr().err
        assert train_cli.main(args + [f"--out_dir={tmp_path / 'dropped'}", "--drop_unknown"]) == 0
        dropped_err = capsys.readouterr().err
    new = set(corpus) - set(BERT_VOCAB) - set(" \n")
    assert "characters of the text join the vocabulary as new tokens" in err
    grown = open_model(tmp_path / "grown", quiet=True)
    assert grown.tokenizer.vocab_size == len(BERT_VOCAB) + len(new), "each new character got an id"
    assert grown.tokenizer.unknown(corpus) == [] and grown.tokenizer.encode("床前")
    rows = [json.loads(line) for line in (tmp_path / "grown" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), f"the loss did not fall: {losses[:5]} -> {losses[-10:]}"
    assert "are not in the vocabulary and are left out (--drop_unknown)" in dropped_err
    assert open_model(tmp_path / "dropped", quiet=True).tokenizer.vocab_size == len(BERT_VOCAB)


def test_the_gpt2_fine_tune_config_runs_on_a_gpt2_folder(folders, tmp_path, capsys):
    """configs/finetune_gpt2.py as shipped, with a tiny GPT-2 folder standing in for the real one."""
    (tmp_path / "my.txt").write_text(ENGLISH, encoding="utf-8")
    with working_dir(tmp_path):
        assert train_cli.main([str(ROOT / "configs" / "finetune_gpt2.py"), f"--init_from={folders['english']}",
                               f"--data={tmp_path / 'my.txt'}", "--block_size=32", "--max_iters=4",
                               f"--out_dir={tmp_path / 'ft'}"]) == 0
    out = capsys.readouterr().out
    assert "fine-tuning" in out and "batch_size = 2" in out and "gradient_accumulation_steps = 4" in out
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "tokens_per_s" in r] == [1, 2, 3, 4] and rows[0]["tokens_per_s"] > 0
    report = (tmp_path / "ft" / "report.md").read_text(encoding="utf-8")
    assert "| peak memory |" in report and "-token file tokenizer" in report


# ---- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("model_type", "mistral", "model_type='mistral' is not one of gpt2, llama, qwen2, qwen3"),
    ("activation_function", "silu", "activation_function='silu' is not one of gelu_new, gelu_pytorch_tanh, gelu, relu"),
    ("n_inner", 64, "n_inner=64 is not 4 x n_embd = 128"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True differs from False"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn=True differs from False"),
    ("tie_word_embeddings", False, "tie_word_embeddings=False differs from True"),
])
def test_what_we_do_not_compute_is_refused_naming_the_field(field, value, message, folders, tmp_path, capsys):
    import shutil
    folder = shutil.copytree(folders["english"], tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert sample_cli.main([f"--ckpt={folder}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "cannot be loaded" in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_convert_refuses_to_overwrite_or_to_export_a_sorter(trained_sort, folders, tmp_path, capsys):
    base, _ = trained_sort
    assert convert_main([str(base / "out" / "sort"), str(tmp_path / "hf"), "--to=hf"]) == 2
    assert "is a sort model; a Hugging Face folder holds text and chat models only" in capsys.readouterr().err
    assert convert_main([str(folders["english"]), str(folders["chinese"]), "--to=hf"]) == 2
    assert "already holds model.safetensors, config.json" in capsys.readouterr().err
    assert convert_main(["--to=hf"]) == 2 and "usage: python -m model.convert" in capsys.readouterr().err


@pytest.mark.parametrize("there", ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"])
def test_convert_overwrites_no_file_it_would_write(trained_numerals, tmp_path, capsys, there):
    """Bug: only model.safetensors, config.json and tokenizer.json were checked, so a DEST holding a chat
    model's other files had them overwritten (README promises nothing in DEST is)."""
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / there).write_text("mine")
    assert convert_main([str(trained_numerals[0]), str(tmp_path / "dest"), "--to=hf"]) == 2
    assert f"already holds {there}; choose another DEST (nothing is overwritten)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "dest").iterdir()] == [there] and (tmp_path / "dest" / there).read_text() == "mine"


@pytest.mark.parametrize("to", ["ours", "hf", "llmviz"])
def test_a_dest_that_cannot_be_written_is_one_line(trained_sort, trained_chinese, tmp_path, capsys, to):
    """Bug: a DEST that is a file (or inside one) ended in a traceback, the temporary file's cleanup raising
    a second error that hid the first."""
    source = trained_sort[0] / "out" / "sort" if to == "llmviz" else trained_chinese[0] / "out" / "chinese"
    (tmp_path / "a_file").write_text("mine")
    for dest in (tmp_path / "a_file", tmp_path / "a_file" / "inside"):
        assert convert_main([str(source), str(dest), f"--to={to}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: DEST {dest} is not writable (") and "choose another DEST" in err[0]
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_downloaded_model_is_fine_tuned_not_resumed(folders, tmp_path, capsys):
    assert convert_main([str(folders["english"]), str(tmp_path / "ours")]) == 0
    with working_dir(tmp_path):
        code = train_cli.main([str(ROOT / "configs" / "finetune.py"), f"--out_dir={tmp_path / 'ours'}",
                               "--init_from=resume", f"--data={ROOT / 'data' / 'poems'}"])
    assert code == 2 and "has no optimizer state (a converted or downloaded model)" in capsys.readouterr().err


@pytest.mark.parametrize("name,end", [("english", "<|endoftext|>"), ("chinese", "[SEP]")])
def test_finetune_a_gpt2_folder_on_conversations(name, end, folders, tmp_path):
    """A GPT-2 folder learns to answer: its own end-of-text token (GPT-2's <|endoftext|>, BERT's
    [SEP]) ends each turn, the role markers join its vocabulary as special tokens, the loss falls."""
    text = "The quick fox" if name == "english" else "天行健"
    answer = "It was cold." if name == "english" else "君子以自强不息"
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": text}, {"role": "assistant",
                                                                                 "content": answer}]}) + "\n" * 1, encoding="utf-8")
    data.write_text(data.read_text() * 8)
    args = [str(ROOT / "configs" / "finetune.py"), f"--init_from={folders[name]}", f"--data={data}", "--max_iters=40",
            "--eval_interval=40", "--lr_decay_iters=40", "--log_interval=1", "--learning_rate=3e-3", "--block_size=32",
            "--val_fraction=0", f"--out_dir={tmp_path / 'ft'}"]
    with working_dir(tmp_path):
        assert train_cli.main(args) == 0
    opened = open_model(tmp_path / "ft", quiet=True)
    template, tok = opened.task.template, opened.tokenizer
    assert template.end_of_turn == end and opened.task.end == tok.tok.token_to_id(end)
    base_vocab = open_model(folders[name], quiet=True).tokenizer.vocab_size
    assert tok.vocab_size == base_vocab + 3, "three role markers added; the end of turn is the vocabulary's own"
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), f"the loss did not fall: {losses[:3]} -> {losses[-5:]}"
