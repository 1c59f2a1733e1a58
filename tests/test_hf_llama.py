"""Llama, Qwen2 and Qwen3 folders in and out, held to transformers' own models. The folders are
built here, offline: tiny random models (grouped-query attention, rope_theta other than 10000,
tied and untied heads, Qwen3's head_dim apart from n_embd / n_head) and a byte-level BPE."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import train as train_cli
from conftest import ROOT, working_dir
from model.checkpoint import open_model
from model.convert import main as convert_main
from model.errors import UserError
from model.hf import read_folder
from model.engine import complete, generate
from model.terminal import fit

transformers = pytest.importorskip("transformers")  # the [hf] extra; CI installs it, so nothing skips there
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. 天行健,君子以自强不息。\n" * 40
ARCHS = {  # name -> (config class, its fields)
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=12, rope_theta=1e6, tie_word_embeddings=False)),
}


def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def tiny(folder, name, seed=0):
    cls, fields = ARCHS[name]
    tok = bpe()
    cfg = getattr(transformers, cls)(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                     rms_norm_eps=1e-5, **fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases random too: ones and zeros would hide mistakes
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if n.endswith("weight") else 0.0))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("llama")
    return {name: tiny(base / name, name, seed=i) for i, name in enumerate(ARCHS)}


@pytest.fixture
def exact_transformers(monkeypatch):
    """transformers computes RoPE tables and RMSNorm in float32 even in a float64 model; for the
    float64 comparison they compute in the model's own dtype (the same maths, no rounding)."""
    def rope(self, x, position_ids):
        dim = self.inv_freq.numel() * 2
        inv = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = position_ids[..., None].double() * inv
        angle = torch.cat([angle, angle], dim=-1)
        return angle.cos().to(x.dtype), angle.sin().to(x.dtype)

    def rms(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    for name in ARCHS:
        module = getattr(transformers.models, name)
        prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[name]
        monkeypatch.setattr(getattr(getattr(module, f"modeling_{name}"), f"{prefix}RotaryEmbedding"), "forward", rope)
        monkeypatch.setattr(getattr(getattr(module, f"modeling_{name}"), f"{prefix}RMSNorm"), "forward", rms)


def ids(n=20, seed=0):
    return torch.randint(300, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ARCHS)
def test_logits_equal_transformers_in_float64(name, folders, exact_transformers):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folders[name]).double().eval()
    ours = open_model(folders[name], quiet=True).model.double()
    x = ids()
    with torch.no_grad():
        expected = theirs(x).logits
    got, _ = ours(x)
    assert (got - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize("name", ARCHS)
def test_logits_and_greedy_text_equal_transformers_in_float32(name, folders):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folders[name]).eval()
    opened = open_model(folders[name], quiet=True)
    x = ids(12)
    with torch.no_grad():
        expected = theirs(x).logits
    torch.testing.assert_close(opened.model(x)[0], expected, rtol=1e-5, atol=1e-5)
    prompt = torch.tensor([opened.tokenizer.encode("The quick brown")])
    out = theirs.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(opened.model, prompt, 30, temperature=0.0), out)


def test_the_config_says_what_was_read(folders):
    qwen3 = read_folder(folders["qwen3"]).config
    assert qwen3["n_embd"] == 32 and qwen3["head_dim"] == 12
    assert qwen3["n_kv_head"] == 2 and qwen3["qk_norm"] is True
    qwen2 = read_folder(folders["qwen2"]).config
    assert qwen2["qkv_bias"] is True and qwen2["head"] == "tied" and qwen2["rope_theta"] == 1e6
    assert read_folder(folders["llama"]).config["head"] == "untied"


@pytest.mark.parametrize("name", ARCHS)
def test_hf_to_ours_to_hf_is_exact(name, folders, tmp_path):
    from safetensors.torch import load_file
    assert convert_main([str(folders[name]), str(tmp_path / "ours")]) == 0
    assert convert_main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to=hf"]) == 0
    before, after = load_file(folders[name] / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    original = json.loads((folders[name] / "config.json").read_text())
    for field in ("model_type", "hidden_size", "num_key_value_heads", "intermediate_size", "tie_word_embeddings",
                  "rms_norm_eps", "num_hidden_layers", "max_position_embeddings"):
        assert config[field] == original[field], field
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids()).logits, transformers.AutoModelForCausalLM.from_pretrained(
            folders[name]).eval()(ids()).logits)


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}), ("hidden_act", "gelu"),
    ("use_sliding_window", True), ("attention_bias", True), ("mlp_bias", True), ("model_type", "mistral")])
def test_fields_we_cannot_compute_are_refused_by_name(field, value, folders, tmp_path):
    import shutil
    shutil.copytree(folders["qwen2"], tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    config[field] = value
    if field == "rope_scaling":
        config.pop("rope_parameters", None)
    (tmp_path / "f" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=rf"{field}=.*this model cannot be loaded"):
        read_folder(tmp_path / "f")


def test_a_model_no_folder_holds_is_refused_naming_the_field(tmp_path):
    from model.gpt import GPT, GPTConfig
    from model.hf import write_folder
    from model.tokenizer import CharTokenizer
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, vocab_size=4, block_size=8, positions="rope"))
    with pytest.raises(UserError, match=r"a Llama-family folder cannot hold normalization='layernorm'"):
        write_folder(model, CharTokenizer(list("abcd")), tmp_path / "x")


def test_finetune_a_qwen2_folder_and_its_loss_falls(folders, tmp_path):
    (tmp_path / "my.txt").write_text(TEXT, encoding="utf-8")
    args = [str(ROOT / "configs" / "finetune.py"), f"--init_from={folders['qwen2']}", f"--data={tmp_path / 'my.txt'}",
            "--max_iters=40", "--eval_interval=40", "--lr_decay_iters=40", "--log_interval=1", "--learning_rate=3e-3",
            "--block_size=32", f"--out_dir={tmp_path / 'ft'}"]
    with working_dir(tmp_path):
        assert train_cli.main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), f"the loss did not fall: {losses[:3]} -> {losses[-5:]}"
    opened = open_model(tmp_path / "ft", quiet=True)
    assert opened.model.config.qkv_bias and opened.model.config.n_kv_head == 1


# ---- a folder's own chat template (Qwen's ChatML) -----------------------------------------

CHATML = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}\n{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
          "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}"
          "{%- endfor %}\n{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
TALK = [{"role": "user", "content": "The quick fox?"}, {"role": "assistant", "content": "It jumps."},
        {"role": "user", "content": "天行健"}]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """A Qwen2 folder as Qwen's instruct models ship: ChatML special tokens and template, eos <|im_end|>."""
    folder = tiny(tmp_path_factory.mktemp("chatml") / "qwen", "qwen2", seed=5)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": tok.get_vocab_size()}))
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")  # room for the two new tokens
    state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"],
                                                    torch.randn(2, 32, generator=torch.Generator().manual_seed(0))])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return folder


def test_a_folders_chat_template_gives_transformers_prompt_ids(chatml):
    from model.tasks import chat_task
    opened = open_model(chatml, quiet=True)
    task = chat_task(opened.ckpt, opened.task)
    hf_tok = transformers.AutoTokenizer.from_pretrained(chatml)
    for messages in (TALK, TALK[:1], [{"role": "system", "content": "Be brief."}] + TALK):
        ours, _ = task.template.encode(opened.tokenizer, messages, generation_prompt=True)
        theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
        assert list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs) == ours
    ids, in_loss = task.template.encode(opened.tokenizer, TALK[:2])
    answer = opened.tokenizer.decode([i for i, keep in zip(ids, in_loss) if keep])
    assert answer == "It jumps.<|im_end|>\n", "the loss counts the reply and its end of turn"


def test_chat_with_a_folder_stops_where_transformers_does(chatml):
    from model.tasks import chat_task
    opened = open_model(chatml, quiet=True)
    task = chat_task(opened.ckpt, opened.task)
    hf = transformers.AutoModelForCausalLM.from_pretrained(chatml).eval()
    end = opened.tokenizer.tok.token_to_id("<|im_end|>")
    assert task.end == end
    ids, room, _ = fit(task, TALK, 40)
    ours = complete(opened.model, [ids], replace(task.rules, max_tokens=room, temperature=0))[0]
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=room, do_sample=False, eos_token_id=end,
                         pad_token_id=end, bad_words_ids=[[i] for i in task.rules.banned])[0, len(ids):].tolist()
    assert task.rules.banned == (opened.tokenizer.tok.token_to_id("<|im_start|>"),), "ChatML's marker is never drawn"
    assert theirs == ours


def test_chat_and_fine_tune_a_folder_with_its_own_template(chatml, tmp_path, capsys, monkeypatch):
    import io
    import sys

    import sample as sample_cli
    monkeypatch.setattr(sys, "stdin", io.StringIO("The quick fox?\n天行健\n"))
    assert sample_cli.main([f"--ckpt={chatml}", "--chat", "--temperature=0", "--max_new_tokens=8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2, "one reply a line"
    data = tmp_path / "chat.jsonl"
    data.write_text((json.dumps({"messages": TALK[:2]}) + "\n") * 8, encoding="utf-8")
    args = [str(ROOT / "configs" / "finetune.py"), f"--init_from={chatml}", f"--data={data}", "--max_iters=40",
            "--eval_interval=40", "--lr_decay_iters=40", "--warmup_iters=5", "--log_interval=1", "--learning_rate=3e-3",
            "--block_size=64", "--val_fraction=0", f"--out_dir={tmp_path / 'ft'}"]
    with working_dir(tmp_path):
        assert train_cli.main(args) == 0
    opened = open_model(tmp_path / "ft", quiet=True)
    assert opened.task.template.source == CHATML and opened.task.template.end_of_turn == "<|im_end|>"
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), f"the loss did not fall: {losses[:3]} -> {losses[-5:]}"


# peft itself still calls a transformers API that transformers 5 deprecates; our code does not
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_on_a_qwen2_folder_loads_in_peft_with_equal_logits(folders, tmp_path):
    """Our one c_attn adapter becomes peft's q/k/v adapters (A shared, B split by rows) exactly."""
    peft = pytest.importorskip("peft")
    (tmp_path / "my.txt").write_text(TEXT, encoding="utf-8")
    args = [str(ROOT / "configs" / "finetune.py"), f"--init_from={folders['qwen2']}", f"--data={tmp_path / 'my.txt'}",
            "--max_iters=10", "--eval_interval=10", "--lr_decay_iters=10", "--learning_rate=1e-2", "--block_size=32",
            "--lora_rank=4", "--lora_targets=all", f"--out_dir={tmp_path / 'lora'}"]
    with working_dir(tmp_path):
        assert train_cli.main(args) == 0
    from model.checkpoint import load_checkpoint, model_from_checkpoint
    from model.lora import merge_adapters
    ours = model_from_checkpoint(load_checkpoint(tmp_path / "lora" / "ckpt.pt")).eval()
    assert convert_main([str(tmp_path / "lora"), str(tmp_path / "adapters"), "--to=peft"]) == 0
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folders["qwen2"]),
                                            tmp_path / "adapters").eval()
    x = ids(16)
    with torch.no_grad():
        expected = ours(x)[0]
        assert (merge_adapters(model_from_checkpoint(load_checkpoint(folders["qwen2"])))(x)[0] - expected).abs().max() > 1e-4
        torch.testing.assert_close(theirs(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_served_folder_answers_as_transformers_generates(chatml):
    """python -m model.serve on a Qwen2 folder: its ChatML template and <|im_end|> through the OpenAI
    API give transformers' greedy reply. Catches a folder's template or end of turn lost in serving."""
    from test_serve import serving
    from model.tasks import chat_task
    opened = open_model(chatml, quiet=True)
    task = chat_task(opened.ckpt, opened.task)
    hf = transformers.AutoModelForCausalLM.from_pretrained(chatml).eval()
    ids = task.template.encode(opened.tokenizer, TALK[:1], generation_prompt=True)[0]
    room = opened.model.config.block_size + 1 - len(ids)  # what may follow the prompt in the context
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=room, do_sample=False, eos_token_id=task.end,
                         pad_token_id=task.end, bad_words_ids=[[i] for i in task.rules.banned])[0, len(ids):].tolist()
    with serving(chatml) as running:
        answer = running.client().chat.completions.create(model="qwen", messages=TALK[:1], max_tokens=room, temperature=0)
    assert answer.choices[0].message.content == opened.tokenizer.decode([t for t in theirs if t != task.end])
    assert answer.choices[0].finish_reason == ("stop" if task.end in theirs else "length")
    assert answer.usage.prompt_tokens == len(ids)


def test_dpo_with_lora_and_grpo_from_a_qwen2_folder_with_chatml(chatml, tmp_path):
    """Bug: preference tuning or RL that works only from our checkpoints: a folder's own template
    (ChatML) not used for the answers, its adapters' base not the reference."""
    prefs = tmp_path / "prefs.jsonl"
    ask = lambda q: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]  # noqa: E731
    answer = lambda a: [{"role": "assistant", "content": a}]  # noqa: E731
    prefs.write_text("".join(json.dumps({"prompt": ask(q), "chosen": answer(c), "rejected": answer(r)}) + "\n"
                             for q, c, r in [("Fox?", "It jumps.", "No."), ("天", "行健", "不")] * 4))
    common = ["--max_iters=2", "--lr_decay_iters=2", "--warmup_iters=1", "--eval_interval=2", "--eval_iters=1",
              "--log_interval=1", "--batch_size=2", "--val_fraction=0"]
    with working_dir(tmp_path):
        assert train_cli.main([str(ROOT / "configs" / "dpo.py"), f"--init_from={chatml}", f"--data={prefs}",
                               "--lora_rank=4", f"--out_dir={tmp_path / 'dpo'}", *common]) == 0
        rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
        assert next(r for r in rows if "loss" in r)["loss"] == pytest.approx(np.log(2), abs=1e-6)
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": ask("Fox?"), "answer": "It jumps."}) + "\n" for _ in range(4)))
        assert train_cli.main([str(ROOT / "configs" / "grpo.py"), f"--init_from={chatml}", f"--data={prompts}",
                               "--reward=exact_match", "--num_generations=2", "--max_completion_length=6",
                               f"--out_dir={tmp_path / 'grpo'}", *common]) == 0
    opened = open_model(tmp_path / "dpo", quiet=True)
    assert opened.task.template.source == CHATML
