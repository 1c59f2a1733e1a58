"""The 3D LLM visualisation's files and minGPT's state_dicts, read as checkpoints and written.

The visualisation (github.com/bbycroft/llm-viz) loads a minGPT model as JSON: "config" (minGPT's
names: model_type, n_layer, n_head, n_embd, vocab_size, block_size, dropout fields) and one entry
per state_dict tensor, {"shape": [...], "dtype": "torch.float32", "data": base64 of the tensor's
raw float32 bytes, C order, little-endian}. minGPT's keys are nanoGPT's, plus the causal-mask
buffers transformer.h.{i}.attn.bias, and its LM head is untied; its GELU is the tanh form.
It shows one forward pass from a second file of "partials": the activations of a few inputs.
"""

import base64
import json
import sys
from pathlib import Path

import numpy as np
import torch

from model import reference as ref
from model.checkpoint import Checkpoint, clean_state_dict
from model.engine import complete
from model.errors import UserError
from model.gpt import GPTConfig, causal_mask

SORT_SHAPE = {"vocab_size": 3, "block_size": 11}  # the visualisation's sorter: 6 letters from A, B, C
MODEL_FILE, PARTIALS_FILE = "gpt-nano-sort-model.json", "gpt-nano-sort-t0-partials.json"


def encode_tensor(t):
    array = np.ascontiguousarray(np.asarray(t, dtype="<f4"))
    return {"shape": list(array.shape), "dtype": "torch.float32", "data": base64.b64encode(array.tobytes()).decode()}


def decode_tensor(name, entry, path):
    try:
        shape, raw = [int(n) for n in entry["shape"]], base64.b64decode(entry["data"], validate=True)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: entry {name!r} is not a tensor (shape, dtype, base64 data): {e}") from None
    if entry.get("dtype", "torch.float32") != "torch.float32":
        raise UserError(f"{path}: entry {name!r} has dtype {entry['dtype']}; only torch.float32 is read")
    if len(raw) != 4 * int(np.prod(shape)):
        raise UserError(f"{path}: entry {name!r} holds {len(raw)} bytes, but shape {shape} needs "
                        f"{4 * int(np.prod(shape))} (4 per float32)")
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32))


def checkpoint_from_state(state, n_head, source, extra_config=None):
    """A minGPT state_dict -> a checkpoint of ours (tanh GELU; the head untied when it differs
    from the token embedding); a sorter's shape becomes the sort task, its split unknown."""
    state = clean_state_dict(state)
    try:
        wte, wpe = state["transformer.wte.weight"], state["transformer.wpe.weight"]
        n_layer = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.h."))
    except (KeyError, ValueError) as e:
        raise UserError(f"{source} is not a minGPT model: no {e} among its tensors") from None
    tied = "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], wte)
    config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=wte.shape[1], vocab_size=wte.shape[0],
                       block_size=wpe.shape[0], bias="transformer.h.0.attn.c_attn.bias" in state,
                       activation="gelu_tanh", head="tied" if tied else "untied")
    sorter = {"vocab_size": config.vocab_size, "block_size": config.block_size} == SORT_SHAPE
    task = {"type": "sort", "length": 6, "alphabet": "ABC", "heldout": None} if sorter else {"type": "text"}
    tokenizer = {"type": "char", "itos": list("ABC")} if sorter else None
    return Checkpoint(state, config, tokenizer, task, config={"converted_from": str(source), **(extra_config or {})})


def read_model_json(path):
    """The visualisation's model JSON -> a checkpoint of ours."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON: {e}") from None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict) or not all(k in config for k in ("n_layer", "n_head", "n_embd")):
        raise UserError(f"{path} is not a visualisation model file: it needs a 'config' with minGPT's n_layer, "
                        f"n_head and n_embd, and one entry per tensor")
    state = {k: decode_tensor(k, v, path) for k, v in data.items() if k != "config"}
    ckpt = checkpoint_from_state(state, int(config["n_head"]), Path(path).resolve(), {"mingpt": config})
    found = ckpt.model_config
    if int(config["n_layer"]) != found.n_layer or int(config["n_embd"]) != found.n_embd:
        raise UserError(f"{path}: its config says n_layer={config['n_layer']}, n_embd={config['n_embd']}, but its "
                        f"tensors have {found.n_layer} layers of {found.n_embd}")
    return ckpt


def read_state_dict(path, n_head):
    """A minGPT state_dict saved with torch.save (read weights_only) -> a checkpoint of ours."""
    if not n_head:
        raise UserError(f"{path} is a bare state_dict, which does not record the number of heads; give it with "
                        f"--n_head (minGPT's gpt-nano has 3)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint_from_state(state, n_head, Path(path).resolve())


# ---- writing the visualisation's files ----------------------------------------------------

def mingpt_state(model):
    """Our weights under minGPT's keys and in its state_dict's order: each block's causal-mask
    buffer attn.bias before that attention's weights, and the LM head last, written out even
    when it is tied."""
    T = model.config.block_size
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        if ".attn." in key:
            out.setdefault(key[:key.index(".attn.")] + ".attn.bias", causal_mask(T, T).float().view(1, 1, T, T))
        out[key] = value.detach().cpu()
    out["lm_head.weight"] = model.lm_head.weight.detach().cpu()
    return out


def write_model_json(model, dest):
    c = model.config
    config = {"model_type": "gpt-nano" if (c.n_layer, c.n_head, c.n_embd) == (3, 3, 48) else None,
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
              "block_size": c.block_size, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0}
    data = {"config": config, **{k: encode_tensor(v.numpy()) for k, v in mingpt_state(model).items()}}
    path = Path(dest) / MODEL_FILE
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def partials(model, idx):
    """The activations the visualisation shows for inputs idx (B, T), by its names: embeddings,
    the first block's internals, each block's output, the final LayerNorm, logits, probabilities.
    Computed by the NumPy reference (float64), written as float32."""
    params = ref.params_from_state_dict(model.state_dict())
    _, _, acts = ref.forward(params, model.config, idx)
    a = acts["layer0"]
    out = {"idx": idx.astype(np.float32), "tok_emb": acts["tok_emb"], "pos_emb": acts["pos_emb"][None],
           "x": acts["x0"], "ln1": a["ln_1"], "qkv": a["qkv"], "q": a["q"], "k": a["k"], "v": a["v"],
           "att": a["masked"], "attSm": a["att"], "y": a["y"], "yProj": a["attn_out"], "attnResid": a["sum_1"],
           "ln2": a["ln_2"], "fc": a["fc"], "gelu": a["act"], "mlp": a["mlp_out"], "mlpResid": a["sum_2"]}
    out.update({f"block{i}": acts[f"layer{i}"]["x_out"] for i in range(model.config.n_layer)})
    out.update(ln_f=acts["ln_f"], lm_head=acts["logits"], probs=ref.softmax(acts["logits"]))
    return out


def write_partials(model, task, starts, dest):
    """gpt-nano-sort-t0-partials.json for the sort inputs `starts` (each row: the input letters,
    then the model's greedy answer, block_size tokens in all)."""
    letters = [task.encode_prompt(s) for s in starts]
    answers = complete(model, letters, task.rules)
    idx = np.array([(p + a)[:model.config.block_size] for p, a in zip(letters, answers)])
    c = model.config
    config = {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
              "block_size": c.block_size, "B": len(starts)}
    data = {"config": config, **{k: encode_tensor(v) for k, v in partials(model, idx).items()}}
    path = Path(dest) / PARTIALS_FILE
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_llmviz(model, task, dest, start=""):
    """Both files into DEST for a sorter (a SortTask). A model the visualisation computes
    differently is written, with a note on stderr of what differs."""
    differs = {"activation": "gelu_tanh", "positions": "learned", "norm": "pre"}
    for field, theirs in differs.items():
        if getattr(model.config, field) != theirs:
            print(f"note: this model has {field}={getattr(model.config, field)!r}; the visualisation computes "
                  f"{field}={theirs!r}, so the numbers it shows will differ from this model's", file=sys.stderr)
    Path(dest).mkdir(parents=True, exist_ok=True)
    starts = start.split(",") if start else [task.tokenizer.decode(x.tolist()) for x in task.inputs(task.splits["val"][:3])]
    return [write_model_json(model, dest), write_partials(model, task, starts, dest)]
