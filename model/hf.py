"""Hugging Face GPT-2 folders, read as checkpoints and written from them, without transformers.

A folder is config.json (model_type gpt2) + model.safetensors or pytorch_model.bin + tokenizer
files (tokenizer.json, vocab.json + merges.txt, or vocab.txt). GPT-2 keeps its linear layers as
"Conv1D" modules, whose weights are (in, out): they are transposed to our (out, in). Weights are
read with the safetensors library or torch.load(weights_only=True): no code runs. Nothing is
ever downloaded: fetch a folder once with the Hugging Face CLI (README, "Start from GPT-2").
"""

import json
from pathlib import Path

import torch

from model.errors import UserError
from model.tokenizer import HFTokenizer, hf, load_tokenizer_files

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}  # HF -> ours
# config.json fields whose other values GPT-2 computes differently from us: (field, the value we compute)
SAME_AS_OURS = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                ("reorder_and_upcast_attn", False), ("add_cross_attention", False), ("tie_word_embeddings", True))


def is_hf_folder(path):
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError('Hugging Face folders need the safetensors library: pip install -e ".[hf]"') from None
    return safetensors.torch


def config_from_hf(folder):
    """config.json -> GPTConfig fields. Anything we do not compute the same is refused, naming the field."""
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON: {e}") from None
    refuse = lambda field, why: UserError(f"{path}: {field}={hf.get(field)!r} {why}; this model cannot be loaded")  # noqa: E731
    if hf.get("model_type") != "gpt2":
        raise refuse("model_type", "is not gpt2, the one architecture read here")
    if hf.get("activation_function", "gelu_new") not in ACTIVATIONS:
        raise refuse("activation_function", f"is not one of {', '.join(ACTIVATIONS)}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise refuse("n_inner", f"is not 4 x n_embd = {4 * hf['n_embd']}, the feed-forward width computed here")
    for field, ours in SAME_AS_OURS:
        if hf.get(field, ours) != ours:
            raise refuse(field, f"differs from {ours}, what is computed here")
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
                vocab_size=hf["vocab_size"], bias=True, dropout=0.0,
                activation=ACTIVATIONS[hf.get("activation_function", "gelu_new")],
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def weights_from_hf(folder):
    """The folder's weights in our layout (nanoGPT's keys, Linear weights (out, in))."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        state = safetensors_torch().load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin")
    out = {}
    for key, value in state.items():
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key  # GPT2Model saves without
        out[key] = value.t().contiguous() if key.endswith(CONV1D) else value
    return out


def read_folder(folder):
    """A GPT-2 folder as a checkpoint of ours (no optimizer state: it can be fine-tuned, not resumed)."""
    args = config_from_hf(folder)
    extra = {k: args.pop(k) for k in ("activation", "layer_norm_eps")}
    return {"model": weights_from_hf(folder), "model_args": args, "model_extra": extra,
            "tokenizer": load_tokenizer_files(folder).to_dict(), "task": {"type": "text"},
            "iter_num": 0, "best_val_loss": float("inf"), "config": {"source": str(Path(folder).resolve())}}


# ---- writing a folder ---------------------------------------------------------------------

def hf_config(config, tokenizer):
    """GPTConfig -> GPT-2's config.json."""
    out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
           "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
           "n_head": config.n_head, "n_inner": None,
           "activation_function": {"gelu_tanh": "gelu_new"}.get(config.activation, config.activation),
           "layer_norm_epsilon": config.layer_norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
           "scale_attn_weights": True, "tie_word_embeddings": True}
    end = tokenizer.tok.token_to_id("<|endoftext|>")
    out.update(bos_token_id=end, eos_token_id=end)  # None (not GPT2Config's default 50256) when there is none
    return out


def hf_weights(model):
    """Our weights in GPT-2's layout: Conv1D weights (in, out), zero biases where ours has none,
    the tied LM head written once (as transformers itself saves it)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not model.config.bias:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head" and module.bias is None:
                state[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    return {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state.items()}


def char_tokenizer_json(tokenizer):
    """A character vocabulary as a tokenizers `tokenizer.json`: every character its own token,
    the same ids, decoded by joining them; its special tokens (longer entries) added as such."""
    lib = hf()
    tok = lib.Tokenizer(lib.models.WordLevel({c: i for i, c in enumerate(tokenizer.itos)}, unk_token=None))
    tok.pre_tokenizer = lib.pre_tokenizers.Split(lib.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = lib.decoders.Fuse()
    tok.add_special_tokens([lib.AddedToken(t, special=True, normalized=False) for t in tokenizer.itos if len(t) > 1])
    return HFTokenizer(tok, "file")


def write_folder(model, tokenizer, dest, chat=None):
    """Write DEST as a GPT-2 folder: model.safetensors, config.json, tokenizer.json and
    tokenizer_config.json, which transformers' GPT2LMHeadModel and AutoTokenizer load. A model
    GPT-2 cannot express (sinusoidal positions, post-LN, an untied head) is refused. With `chat`
    (a model's ChatTemplate), its template goes where transformers reads one, its end of turn is
    the eos and pad token, and generation_config.json says so."""
    gpt2 = {"positions": "learned", "norm": "pre", "head": "tied"}
    for field, value in gpt2.items():
        if getattr(model.config, field) != value:
            raise UserError(f"a GPT-2 folder cannot hold {field}={getattr(model.config, field)!r} (GPT-2 has "
                            f"{field}={value!r}); keep this model in our format (--to=ours)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    exported = char_tokenizer_json(tokenizer) if tokenizer.kind == "char" else tokenizer
    safetensors_torch().save_file(hf_weights(model), str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(hf_config(model.config, exported), indent=2) + "\n")
    exported.tok.save(str(dest / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size}
    if chat is not None:
        write_chat_files(dest, chat, exported.tok.token_to_id(chat.end_of_turn), tokenizer_config)
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=1) + "\n")
    return dest


def write_chat_files(dest, chat, end_id, tokenizer_config):
    """The chat template as chat_template.jinja and in tokenizer_config.json (older transformers read it
    there), the end of turn as eos and pad, and generation_config.json: greedy generate stops at it."""
    (dest / "chat_template.jinja").write_text(chat.jinja(), encoding="utf-8")
    tokenizer_config.update(chat_template=chat.jinja(), eos_token=chat.end_of_turn, pad_token=chat.end_of_turn)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "eos_token_id": end_id}, indent=2) + "\n")
    (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": end_id, "pad_token_id": end_id}) + "\n")
