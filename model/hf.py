"""Hugging Face folders of GPT-2, Llama, Qwen2 and Qwen3, read as checkpoints and written from
them, without transformers.

A folder is config.json (its model_type says the architecture) + model.safetensors (or shards
listed in model.safetensors.index.json, or pytorch_model.bin) + tokenizer files (tokenizer.json,
vocab.json + merges.txt, or vocab.txt). GPT-2 keeps its linear layers as "Conv1D" modules, whose
weights are (in, out): they are transposed to our (out, in). The Llama family keeps Q, K and V
as three matrices, which become our one c_attn. Weights are read with the safetensors library or
torch.load(weights_only=True): no code runs. Nothing is ever downloaded: fetch a folder once with
the Hugging Face CLI (README, "Start from GPT-2").
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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


LLAMA_FAMILY = ("llama", "qwen2", "qwen3")  # model_types read and written besides gpt2


def read_json(path):
    """A JSON object from one of a folder's files; UserError naming the file and what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise UserError(f"{path} cannot be read as JSON ({str(e)[:120]}); fetch the folder again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not the object of fields it must be; fetch "
                        f"the folder again") from None
    return data


class Fields:
    """A config.json's fields, each read once and checked: a field the architecture needs that is
    missing or of the wrong kind is a UserError naming the file and the field."""

    def __init__(self, path, values):
        self.path, self.values = path, values

    def __call__(self, name, kind=int, default=None):
        value = self.values.get(name)
        if value is None:
            if default is None:
                raise UserError(f"{self.path} lacks {name!r}, which a {self.values.get('model_type')} model needs; "
                                f"fetch the folder again")
            return default
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise UserError(f"{self.path}: {name}={value!r} is not {'an integer' if kind is int else 'a number'}")
        return value

    def refuse(self, field, why):
        return UserError(f"{self.path}: {field}={self.values.get(field)!r} {why}; this model cannot be loaded")


def config_from_hf(folder):
    """config.json -> GPTConfig fields. Anything we do not compute the same is refused, naming the field."""
    path = Path(folder) / "config.json"
    fields = Fields(path, read_json(path))
    if fields.values.get("model_type") in LLAMA_FAMILY:
        return llama_config(fields)
    if fields.values.get("model_type") != "gpt2":
        raise fields.refuse("model_type", f"is not one of gpt2, {', '.join(LLAMA_FAMILY)}, the architectures read here")
    return gpt2_config(fields)


def gpt2_config(f):
    hf = f.values
    if hf.get("activation_function", "gelu_new") not in ACTIVATIONS:
        raise f.refuse("activation_function", f"is not one of {', '.join(ACTIVATIONS)}")
    if f("n_inner", int, 4 * f("n_embd")) != 4 * f("n_embd"):
        raise f.refuse("n_inner", f"is not 4 x n_embd = {4 * f('n_embd')}, the feed-forward width computed here")
    for field, ours in SAME_AS_OURS:
        if hf.get(field, ours) != ours:
            raise f.refuse(field, f"differs from {ours}, what is computed here")
    return dict(n_layer=f("n_layer"), n_head=f("n_head"), n_embd=f("n_embd"), block_size=f("n_positions"),
                vocab_size=f("vocab_size"), bias=True, dropout=0.0,
                activation=ACTIVATIONS[hf.get("activation_function", "gelu_new")],
                layer_norm_eps=f("layer_norm_epsilon", (int, float), 1e-5))


def llama_config(f):
    """A Llama, Qwen2 or Qwen3 config.json -> GPTConfig fields: RoPE, RMSNorm, the gated SiLU
    feed-forward, grouped-query attention; Qwen2 adds Q/K/V biases, Qwen3 per-head Q/K norms."""
    hf = f.values
    rope = hf.get("rope_scaling") or {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"}
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise f.refuse("rope_scaling", "is a RoPE scaling this project does not compute (only plain RoPE)")
    if hf.get("hidden_act", "silu") != "silu":
        raise f.refuse("hidden_act", "is not silu, the gated feed-forward's activation computed here")
    for field in ("use_sliding_window", "attention_bias", "mlp_bias"):
        if hf.get(field):
            raise f.refuse(field, "is not computed here")
    heads = f("num_attention_heads")
    theta = f("rope_theta", (int, float), (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return dict(n_layer=f("num_hidden_layers"), n_head=heads, n_kv_head=f("num_key_value_heads", int, heads),
                n_embd=f("hidden_size"), head_dim=f("head_dim", int, f("hidden_size") // heads),
                intermediate_size=f("intermediate_size"), vocab_size=f("vocab_size"),
                block_size=f("max_position_embeddings"), bias=False, dropout=0.0, positions="rope",
                rope_theta=float(theta), normalization="rmsnorm", mlp="gated", activation="silu",
                layer_norm_eps=f("rms_norm_eps", (int, float), 1e-6),
                head="tied" if hf.get("tie_word_embeddings", False) else "untied",
                qkv_bias=hf["model_type"] == "qwen2", qk_norm=hf["model_type"] == "qwen3")


def read_tensors(path):
    """One safetensors file's tensors; UserError naming it when it is truncated or not safetensors at all."""
    try:
        return safetensors_torch().load_file(str(path))
    except Exception as e:  # safetensors raises its own errors (and OSError) for a damaged file
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} cannot be read ({reason}): it is truncated or damaged; fetch it again") from None


def load_state(folder):
    """Every tensor of the folder: model.safetensors, its shards (model.safetensors.index.json), or pytorch_model.bin."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return read_tensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = read_json(index).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise UserError(f"{index} has no 'weight_map' naming the shards; fetch the folder again")
        missing = sorted(n for n in set(shards.values()) if not (folder / str(n)).is_file())
        if missing:
            raise UserError(f"{index} names the shard {missing[0]}, which is not in {folder}; fetch it again")
        return {k: v for shard in sorted(set(shards.values())) for k, v in read_tensors(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # as for our own checkpoints: torch raises many kinds for a damaged file
            raise UserError(f"{folder / 'pytorch_model.bin'} cannot be read ({str(e).strip()[:120]}): it is "
                            f"truncated or damaged; fetch it again") from None
    raise UserError(f"{folder} has config.json but no model.safetensors (or its shards) or pytorch_model.bin")


def gpt2_weights(state):
    """GPT-2's weights in our layout (nanoGPT's keys, Linear weights (out, in))."""
    out = {}
    for key, value in state.items():
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key  # GPT2Model saves without
        out[key] = value.t().contiguous() if key.endswith(CONV1D) else value
    return out


# ours <- the Llama family's, within block i (transformer.h.{i}. <- model.layers.{i}.)
LLAMA_KEYS = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
              "attn.c_proj.weight": "self_attn.o_proj.weight", "attn.q_norm.weight": "self_attn.q_norm.weight",
              "attn.k_norm.weight": "self_attn.k_norm.weight", "mlp.c_gate.weight": "mlp.gate_proj.weight",
              "mlp.c_fc.weight": "mlp.up_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def llama_weights(state, n_layer, folder):
    """The Llama family's weights in our layout: Q, K and V stacked into c_attn. A tensor missing
    here is a UserError naming the folder; any other one missing, load_state_dict names."""
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight", *(f"model.layers.{i}.{m}.weight"
                                                                            for i in range(n_layer) for m in QKV))
               if k not in state]
    if missing:
        raise UserError(f"{folder}: the weights lack {missing[0]}, which its config.json's {n_layer} layers need; "
                        f"fetch the folder again")
    out = {"transformer.wte.weight": state["model.embed_tokens.weight"], "transformer.ln_f.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(n_layer):
        theirs, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        out.update({ours + o: state[theirs + t] for o, t in LLAMA_KEYS.items() if theirs + t in state})
        for kind in ("weight", "bias"):
            if f"{theirs}{QKV[0]}.{kind}" in state:
                out[f"{ours}attn.c_attn.{kind}"] = torch.cat([state[f"{theirs}{m}.{kind}"] for m in QKV])
    return out


@dataclass
class Folder:
    """What a Hugging Face folder holds, in our terms: weights (our keys), GPTConfig fields, the
    tokenizer and the chat template's plain data (or None)."""
    weights: dict
    config: dict
    tokenizer: object
    chat: Optional[dict]


def read_folder(folder):
    """A Hugging Face folder's model, config, tokenizer and chat template (model.checkpoint makes it a checkpoint)."""
    config = config_from_hf(folder)
    state = load_state(folder)
    weights = llama_weights(state, config["n_layer"], folder) if config.get("positions") == "rope" else gpt2_weights(state)
    tokenizer = load_tokenizer_files(folder)
    return Folder(weights, config, tokenizer, folder_chat_template(folder, tokenizer))


def folder_chat_template(folder, tokenizer):
    """The folder's chat template (chat_template.jinja, or tokenizer_config.json's chat_template) as
    the plain data of a ChatTemplate, or None. Its end of turn is <|im_end|> for ChatML templates
    (Qwen's), else the tokenizer's eos_token."""
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    try:
        source = ((folder / "chat_template.jinja").read_text(encoding="utf-8") if
                  (folder / "chat_template.jinja").is_file() else config.get("chat_template"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'chat_template.jinja'} cannot be read as text ({e}); fetch the folder again") from None
    if isinstance(source, list):  # several named templates: the default one
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    token = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731  (an AddedToken's fields, or a string)
    eos = token(config.get("eos_token"))
    end = "<|im_end|>" if source and "<|im_end|>" in source else eos
    if not source or not end or tokenizer.special_id(end) is None:  # no turn could ever end
        return None
    return {"end_of_turn": end, "markers": {}, "source": source,
            "variables": {"bos_token": token(config.get("bos_token")) or "", "eos_token": eos or ""}}


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


def llama_hf_config(config, model_type, tokenizer):
    """GPTConfig -> a Llama, Qwen2 or Qwen3 config.json."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    end = tokenizer.tok.token_to_id("<|endoftext|>")
    out = {"architectures": [arch], "model_type": model_type, "vocab_size": config.vocab_size,
           "hidden_size": config.n_embd, "intermediate_size": config.intermediate_size,
           "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
           "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
           "max_position_embeddings": config.block_size, "rms_norm_eps": config.layer_norm_eps,
           "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
           "hidden_act": "silu", "tie_word_embeddings": config.head == "tied", "attention_dropout": 0.0,
           "bos_token_id": end, "eos_token_id": end}
    return out if model_type == "llama" else {**out, "use_sliding_window": False}


def llama_hf_weights(model):
    """Our weights in the Llama family's layout: c_attn split into Q, K and V; a tied LM head left out."""
    c, state = model.config, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"], "model.norm.weight": state["transformer.ln_f.weight"]}
    if c.head == "untied":
        out["lm_head.weight"] = state["lm_head.weight"]
    sizes = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]
    for i in range(c.n_layer):
        theirs, ours = f"model.layers.{i}.", f"transformer.h.{i}."
        out.update({theirs + t: state[ours + o] for o, t in LLAMA_KEYS.items() if ours + o in state})
        for kind in ("weight", "bias"):
            if f"{ours}attn.c_attn.{kind}" in state:
                parts = state[f"{ours}attn.c_attn.{kind}"].split(sizes)
                out.update({f"{theirs}{m}.{kind}": t for m, t in zip(QKV, parts)})
    return {k: v.contiguous() for k, v in out.items()}


def folder_format(config, holder="folder", fix="--to=ours"):
    """The Hugging Face architecture that computes what `config` does: gpt2, llama, qwen2 or qwen3
    (llama.cpp's names too). A model neither holds is refused, naming the field; `holder`
    "llama.cpp" words it for a GGUF file."""
    rope = config.positions == "rope"
    needs = ({"normalization": "rmsnorm", "mlp": "gated", "activation": "silu", "norm": "pre", "bias": False} if rope else
             {"positions": "learned", "norm": "pre", "head": "tied", "normalization": "layernorm", "mlp": "standard",
              "n_kv_head": config.n_head, "head_dim": config.n_embd // config.n_head,
              "intermediate_size": 4 * config.n_embd, "qk_norm": False, "qkv_bias": False})
    name = (f"a {'Llama-family' if rope else 'GPT-2'} folder" if holder == "folder" else
            f"{holder}'s {'Llama family' if rope else 'gpt2 architecture'}")
    for field, value in {**needs, **({"qkv_bias": False} if rope and config.qk_norm else {})}.items():
        if getattr(config, field) != value:
            raise UserError(f"{name} cannot hold {field}={getattr(config, field)!r} (it has {field}={value!r}); "
                            f"keep this model in our format ({fix})")
    return ("qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama") if rope else "gpt2"


FOLDER_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")  # write_folder's
CHAT_FILES = ("chat_template.jinja", "generation_config.json")  # and, for a model with a chat template, these
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")  # write_peft's


def write_folder(model, tokenizer, dest, chat=None):
    """Write DEST as a Hugging Face folder of the architecture that computes what the model does
    (GPT-2, or Llama / Qwen2 / Qwen3 for RoPE models): model.safetensors, config.json,
    tokenizer.json and tokenizer_config.json, which transformers' AutoModelForCausalLM and
    AutoTokenizer load. With `chat` (a model's ChatTemplate), its template goes where transformers
    reads one, its end of turn is the eos and pad token, and generation_config.json says so."""
    kind = folder_format(model.config)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    exported = char_tokenizer_json(tokenizer) if tokenizer.kind == "char" else tokenizer
    weights, config = ((hf_weights(model), hf_config(model.config, exported)) if kind == "gpt2" else
                       (llama_hf_weights(model), llama_hf_config(model.config, kind, exported)))
    safetensors_torch().save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
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


# ---- LoRA adapters as peft writes them ----------------------------------------------------

# our adapted layer -> peft's target module names (the Llama family's, by layer; GPT-2 keeps ours)
LLAMA_LORA = {"attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "attn.c_proj": ("self_attn.o_proj",), "mlp.c_gate": ("mlp.gate_proj",), "mlp.c_fc": ("mlp.up_proj",),
              "mlp.c_proj": ("mlp.down_proj",)}


def peft_tensors(adapters, config, kind):
    """Our adapters ({layer}.lora_A.weight, {layer}.lora_B.weight) under peft's names for the folder
    of `kind`. The Llama family's Q, K and V are three layers where ours is one: each gets our A and
    its rows of our B (B_q A, B_k A, B_v A are exactly the rows of B A)."""
    prefix = "base_model.model."
    if kind == "gpt2":
        return {prefix + k: v for k, v in adapters.items()}
    sizes = [config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.n_kv_head * config.head_dim]
    out = {}
    for key, value in adapters.items():
        layer, part = key.rsplit(".lora_", 1)  # transformer.h.{i}.attn.c_attn, A.weight
        i, ours = layer.split(".")[2], layer.split(".", 3)[3]
        targets = LLAMA_LORA[ours]
        pieces = value.split(sizes) if part.startswith("B") and len(targets) == 3 else [value] * len(targets)
        out.update({f"{prefix}model.layers.{i}.{t}.lora_{part}": piece.clone() for t, piece in zip(targets, pieces)})
    return out


def check_peft(adapters, config):
    """UserError unless the adapters fit a peft folder: only LoRA tensors, on a model a folder can hold."""
    folder_format(config)
    extra = [k for k in adapters if ".lora_" not in k]
    if extra:
        raise UserError(f"these adapters also trained {', '.join(extra)} (the vocabulary grew), which a peft adapter "
                        f"cannot hold; export the merged model with --to=hf instead")


def write_peft(model, adapters, lora, dest):
    """DEST as a peft LoRA folder (adapter_model.safetensors, adapter_config.json) for the
    Hugging Face export of the adapters' base (python -m model.convert BASE FOLDER --to=hf)."""
    check_peft(adapters, model.config)
    kind = folder_format(model.config)
    tensors = peft_tensors(adapters, model.config, kind)
    modules = sorted({k.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for k in tensors})
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    safetensors_torch().save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "target_modules": modules, "bias": "none",
              "fan_in_fan_out": kind == "gpt2", "base_model_name_or_path": lora.base, "inference_mode": True}
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest
