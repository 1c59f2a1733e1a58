"""GGUF, the file llama.cpp, ollama and LM Studio run, written with llama.cpp's own `gguf` package
(python -m model.convert SRC OUT.gguf --to=gguf).

GPT-2-layout models become llama.cpp's `gpt2` architecture, RoPE models `llama`, `qwen2` or
`qwen3` (hf.folder_format decides which, as for a Hugging Face folder, and refuses what none
computes). Tokenizers: byte-level BPE as llama.cpp's `gpt2` tokenizer (the tokens, merges and
pre-tokenizer), a character vocabulary as its SentencePiece-style `llama` tokenizer with one piece
per character and no merges (llama.cpp splits a text into characters and looks each one up, so
every character gets our id; a space is written as SentencePiece's "▁"). Special tokens are
control tokens; the chat template, its end of turn (eos and eot) go in the metadata, and beside
the file an ollama Modelfile.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from model.errors import UserError
from model.hf import folder_format, llama_hf_weights

SPACE = "\u2581"  # SentencePiece's visible space
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_lib():
    try:
        import gguf
    except ImportError:
        raise UserError("--to=gguf needs llama.cpp's gguf package: pip install gguf") from None
    return gguf


def gguf_arch(config):
    """llama.cpp's architecture for the model, or UserError naming what it does not compute."""
    kind = folder_format(config, "llama.cpp", "--to=ours, or a Hugging Face folder with --to=hf where it fits")
    if kind == "gpt2" and config.activation not in ("gelu", "gelu_tanh"):
        raise UserError(f"llama.cpp's gpt2 architecture computes a GELU feed-forward, not activation="
                        f"{config.activation!r}; keep this model in our format")
    return kind


def check_gguf(config, tokenizer, outtype):
    """Every refusal before anything is written."""
    gguf_lib()
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    gguf_arch(config)
    vocab_tokens(tokenizer, config.vocab_size)


# ---- the vocabulary -----------------------------------------------------------------------

def vocab_tokens(tokenizer, vocab_size):
    """(tokenizer model, tokens, token types, merges, pre-tokenizer) for llama.cpp, one token per model id
    (ids past the tokenizer's, padding, as unused tokens)."""
    gguf = gguf_lib()
    T = gguf.TokenType
    specials = set(tokenizer.special_tokens())
    if tokenizer.kind == "char":
        if SPACE in tokenizer.itos:
            raise UserError(f"the vocabulary holds {SPACE!r}, which llama.cpp's character tokenizer reads as a space")
        tokens = [SPACE if t == " " else t for t in tokenizer.itos]
        types = [T.CONTROL if t in specials else T.NORMAL for t in tokenizer.itos]
        model, merges, pre = "llama", [], None
    elif (state := byte_level_bpe(tokenizer)) is not None:
        vocab = {**state["model"]["vocab"], **{a["content"]: a["id"] for a in state["added_tokens"]}}
        tokens = [None] * len(vocab)
        for text, i in vocab.items():
            tokens[i] = text
        types = [T.CONTROL if t in specials else T.NORMAL for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
        model, pre = "gpt2", pre_tokenizer(state["pre_tokenizer"])
    else:
        raise UserError("llama.cpp's GGUF takes byte-level BPE and character vocabularies; this model's is "
                        "neither (a WordPiece or SentencePiece file?); keep it in a Hugging Face folder (--to=hf)")
    pad = vocab_size - len(tokens)
    return model, tokens + [f"[PAD{i}]" for i in range(pad)], types + [T.UNUSED] * pad, merges, pre


def byte_level_bpe(tokenizer):
    """A byte-level BPE tokenizer's tokenizer.json as a dict (ours, or a folder's of that kind); None
    for any other."""
    if getattr(tokenizer, "tok", None) is None:
        return None
    state = json.loads(tokenizer.tok.to_str())
    return state if state["model"]["type"] == "BPE" and "ByteLevel" in json.dumps(state.get("pre_tokenizer")) else None


def pre_tokenizer(state):
    """llama.cpp's name for a byte-level pre-tokenizer: "gpt-2" (GPT-2's regex: ours, GPT-2's), "qwen2"."""
    kinds = [state] if state.get("type") != "Sequence" else state["pretokenizers"]
    if len(kinds) == 1 and kinds[0]["type"] == "ByteLevel" and kinds[0].get("use_regex", True):
        return "gpt-2"
    pattern = next((k["pattern"].get("Regex", "") for k in kinds if k["type"] == "Split"), "")
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+" in pattern:
        return "qwen2"
    raise UserError("llama.cpp needs to know this tokenizer's pre-tokenizer, which is neither GPT-2's nor Qwen2's; "
                    "keep this model in a Hugging Face folder (--to=hf)")


def add_vocabulary(writer, tokenizer, config, chat):
    model, tokens, types, merges, pre = vocab_tokens(tokenizer, config.vocab_size)
    writer.add_tokenizer_model(model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_add_space_prefix(False)
    if merges:
        writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    if chat is not None:
        end = tokenizer.special_id(chat.template.end_of_turn)
        writer.add_chat_template(chat.template.jinja())
        writer.add_eos_token_id(end)
        writer.add_eot_token_id(end)
        writer.add_pad_token_id(end)
    elif tokenizer.special_id("<|endoftext|>") is not None:
        writer.add_eos_token_id(tokenizer.special_id("<|endoftext|>"))


# ---- the weights --------------------------------------------------------------------------

def gpt2_tensors(model):
    """llama.cpp's gpt2 names for our weights (nn.Linear's (out, in), as ggml reads them); zero
    biases where ours has none, since llama.cpp's gpt2 reads them."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    get = lambda k, like: state.get(k, torch.zeros(state[like].shape[0]))  # noqa: E731
    out = {"token_embd.weight": state["transformer.wte.weight"], "position_embd.weight": state["transformer.wpe.weight"],
           "output_norm.weight": state["transformer.ln_f.weight"],
           "output_norm.bias": get("transformer.ln_f.bias", "transformer.ln_f.weight"),
           "output.weight": state["lm_head.weight"]}
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(model.config.n_layer):
        for ours, theirs in names.items():
            w = f"transformer.h.{i}.{ours}.weight"
            out[f"blk.{i}.{theirs}.weight"] = state[w]
            out[f"blk.{i}.{theirs}.bias"] = get(f"transformer.h.{i}.{ours}.bias", w)
    return out


def llama_tensors(model, arch):
    """The Llama family's weights under llama.cpp's names (the gguf package's own map from
    transformers' names). Its `llama` rotates interleaved pairs where we (and transformers) rotate
    halves: Q and K rows are permuted as llama.cpp's converter does; qwen2 and qwen3 rotate halves."""
    gguf = gguf_lib()
    c = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.n_layer)
    out = {}
    for name, t in llama_hf_weights(model).items():
        t = t.float()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.n_head if "q_proj" in name else c.n_kv_head
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = t
    return out


def add_hyperparameters(writer, config, arch):
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if arch == "gpt2":
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        return
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_layer_norm_rms_eps(config.layer_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)


def stored(gguf, t, outtype):
    """(the array, its GGML type): matrices in outtype (q8_0 needs rows a multiple of 32 long, else
    f16), norms and biases in float32, as llama.cpp's converter keeps them."""
    data = t.numpy().astype(np.float32)
    Q = gguf.GGMLQuantizationType
    if data.ndim == 1 or outtype == "f32":
        return data, Q.F32
    kind = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    if kind == Q.Q8_0 and data.shape[-1] % 32:
        kind = Q.F16
    if kind == Q.F16:
        return data.astype(np.float16), kind
    return gguf.quants.quantize(data, kind), kind


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model, tokenizer, dest, outtype, chat, name):
    """Write DEST (a .gguf file, atomically: a temporary file renamed) and DEST's Modelfile; returns both paths."""
    gguf = gguf_lib()
    arch = gguf_arch(model.config)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(name)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[outtype]))
    add_hyperparameters(writer, model.config, arch)
    add_vocabulary(writer, tokenizer, model.config, chat)
    tensors = gpt2_tensors(model) if arch == "gpt2" else llama_tensors(model, arch)
    for tensor_name, t in tensors.items():
        data, kind = stored(gguf, t, outtype)
        writer.add_tensor(tensor_name, data, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from None
    modelfile = modelfile_path(dest)
    modelfile.write_text(modelfile_text(dest, tokenizer, chat), encoding="utf-8")
    return [dest, modelfile]


def modelfile_path(dest):
    return Path(dest).with_suffix(".Modelfile")


def modelfile_text(dest, tokenizer, chat):
    """ollama's Modelfile: FROM the file; for a chat model its template in Go's template language
    (ollama does not read Jinja) and its end of turn as the stop."""
    lines = [f"FROM ./{Path(dest).name}", "PARAMETER temperature 0.8"]
    if chat is not None:
        t = chat.template
        if t.source:  # a folder's own Jinja template: ollama's TEMPLATE cannot be derived from it here
            lines.append("# the chat template is in the GGUF file (Jinja); ollama needs it as a Go template here")
        else:
            m = t.markers
            turn = ("{{- range .Messages }}{{ if eq .Role \"system\" }}" + m["system"] + "{{ .Content }}" + t.end_of_turn +
                    "{{ else if eq .Role \"user\" }}" + m["user"] + "{{ .Content }}" + t.end_of_turn +
                    "{{ else if eq .Role \"assistant\" }}" + m["assistant"] + "{{ .Content }}" + t.end_of_turn +
                    "{{ end }}{{ end }}" + m["assistant"])
            lines.append(f'TEMPLATE """{turn}"""')
        lines.append(f"PARAMETER stop {json.dumps(t.end_of_turn)}")
    return "\n".join(lines) + "\n"
