"""Configuration for every command line (train.py, sample.py, the walkthrough, the plots, serving):
dataclasses of plain fields, filled from a config file (a Python file of plain assignments)
and then from `--key=value` / `--key value` flags."""

import ast
import difflib
import os
import sys
import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Optional

from model.checkpoint import ModelSource
from model.data import DataSettings
from model.errors import UserError
from model.gpt import GPTConfig
from model.lora import LoRAConfig
from model.quantize import DECODE_DTYPES
from model.runtime import DTYPES
from model.tasks import NAMED

# TrainConfig takes every GPTConfig field as a flag of the same name (their meanings are written in
# gpt.py), except these two, which the task and tokenizer decide and DataSettings declares.
TASK_DECIDES = ("block_size", "vocab_size")
MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name not in TASK_DECIDES)
SMALL_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128}  # train.py's defaults: trains on a laptop CPU in minutes
ModelOptions = make_dataclass("ModelOptions", [(f.name, f.type, field(default=SMALL_MODEL.get(f.name, f.default)))
                                               for f in fields(GPTConfig) if f.name in MODEL_FIELDS])


def run_command(body, argv, failures=()):
    """What every command line does around its work: body(argv) gives the exit code; a
    UserError prints 'error: ...' and exits 2; the exceptions in `failures` (a diverged run,
    a failed check) print the same way and exit 1; Ctrl-C ends it with the shell's code for it,
    130, and no traceback, and so does a reader that closed the output (141). Anything else is a
    bug: its traceback shows."""
    try:
        return body(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except failures as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)  # the line the interrupted output was on ends
        return 130
    except BrokenPipeError:  # whoever read the output stopped (| head): quietly, as the shell's code for it says
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail again
        return 141


@dataclass
class TrainConfig(ModelOptions, DataSettings):
    """train.py's settings: the model's fields (ModelOptions, from GPTConfig), the data's
    (DataSettings: task, data, out_dir, block_size, tokenizer, ...), then these."""
    # output and evaluation
    eval_interval: int = 250  # evaluate, log and save a checkpoint every this many iterations
    eval_iters: int = 20  # batches averaged for each train/val loss estimate
    log_interval: int = 10
    always_save_checkpoint: bool = True  # False: save only when the val loss improves
    init_from: str = "scratch"  # 'scratch', 'resume' (out_dir's checkpoint), or a checkpoint/out_dir to fine-tune
    stop_at_full_accuracy: bool = True  # sort, chat pairs: stop once every held-out answer (none held out: every
    # training answer) is exactly right
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    # LoRA (fine-tuning only): the base frozen, low-rank adapters on the target layers learn
    lora_rank: int = 0  # r; 0: off (every weight trains)
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = "attention"  # 'attention', 'mlp', 'all', or layer names like 'c_attn,c_fc'
    allow_changed_base: bool = False  # resuming adapters whose base's weights changed since: go on anyway
    # preference tuning (DPO: a .jsonl of chosen/rejected pairs picks it) and reinforcement learning from
    # rewards (GRPO: --reward picks it), from a model that answers; the names are TRL's
    beta: float = 0.1  # DPO: how far the policy may move from the reference; GRPO: the KL penalty's weight (0: none)
    loss_type: str = "sigmoid"  # DPO: 'sigmoid' (the paper's loss) or 'ipo'
    label_smoothing: float = 0.0  # DPO: the share of pairs taken to be mislabelled (conservative DPO)
    reward: str = ""  # GRPO: reward functions, comma-separated: exact_match, sort, or path/to/file.py:function
    reward_weights: str = ""  # GRPO: one weight per reward, comma-separated (default: 1 each)
    num_generations: int = 8  # GRPO: samples of each prompt (a group); a step has batch_size prompts
    max_completion_length: int = 64  # GRPO: new tokens of a sample at most
    temperature: float = 1.0  # GRPO: the samples' temperature
    epsilon: float = 0.2  # GRPO: the importance ratio is clipped to [1 - epsilon, 1 + epsilon]
    num_iterations: int = 1  # GRPO: optimizer steps on each batch of samples
    # AdamW and the learning-rate schedule (linear warmup, then cosine decay to min_lr)
    learning_rate: float = 1e-3
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    min_lr: float = 1e-4
    # system
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"  # 'auto', 'float32', 'bfloat16', 'float16', 'float64'
    compile: bool = False

    def data_settings(self):
        return DataSettings(**{f.name: getattr(self, f.name) for f in fields(DataSettings)})

    def lora(self):
        """The --lora_* flags as one LoRAConfig (None when lora_rank is 0)."""
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets) if self.lora_rank else None

    def with_lora(self, lora):
        """These settings with an adapter checkpoint's LoRA as the --lora_* flags (resuming: the checkpoint decides)."""
        lora = lora or LoRAConfig(0, self.lora_alpha, self.lora_dropout, self.lora_targets)
        return replace(self, lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                       lora_targets=lora.targets)

    def validate_alignment(self):
        if self.beta < 0 or self.loss_type not in ("sigmoid", "ipo") or not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"DPO needs beta >= 0, loss_type 'sigmoid' or 'ipo' and label_smoothing in [0, 0.5); got "
                            f"{self.beta}, {self.loss_type!r}, {self.label_smoothing}")
        if self.loss_type == "ipo" and self.beta == 0:
            raise UserError("loss_type='ipo' divides by beta: give beta > 0")
        if self.num_generations < 2:
            raise UserError(f"num_generations must be at least 2 (a sample's advantage is against its group's), "
                            f"got {self.num_generations}")
        for name in ("max_completion_length", "num_iterations"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0 or self.epsilon <= 0:
            raise UserError(f"GRPO needs temperature > 0 and epsilon > 0, got {self.temperature} and {self.epsilon}")

    def validate(self):
        positive = ("eval_interval", "eval_iters", "log_interval", "batch_size",
                    "gradient_accumulation_steps", "sort_length")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.block_size < 0 or (self.block_size == 0 and self.init_from == "scratch" and self.task == "text"):
            raise UserError(f"block_size must be at least 1, got {self.block_size}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be greater than 0, got {self.learning_rate}")
        for name in ("max_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip", "vocab_size"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"LoRA needs lora_rank >= 0, lora_alpha > 0 and lora_dropout in [0, 1); got "
                            f"{self.lora_rank}, {self.lora_alpha}, {self.lora_dropout}")
        if self.lora_rank and self.init_from == "scratch":
            raise UserError("LoRA adapts a trained model: give the base with --init_from=out_dir, ckpt.pt or a "
                            "Hugging Face folder (or leave --lora_rank=0 to train from scratch)")
        self.validate_alignment()
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name, allowed in {"task": NAMED, "dtype": ("auto", *DTYPES)}.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        GPTConfig(block_size=max(1, self.block_size), vocab_size=1,
                  **{k: getattr(self, k) for k in MODEL_FIELDS})  # the model's own checks


@dataclass
class Decoding(ModelSource):
    """The flags of the commands that decode with a model (sample.py, the server, evaluation)."""
    device: str = "auto"  # 'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "float32"  # the weights' type: 'float32', 'bfloat16' or 'int8' (8-bit, CPU: model/quantize.py)

    def validate(self):
        if self.dtype not in DECODE_DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DECODE_DTYPES)}; got {self.dtype!r}")


@dataclass
class SampleConfig(Decoding):
    start: str = ""  # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0: always the most likely token (greedy)
    top_k: Optional[int] = None  # sample only among the k most likely tokens
    top_p: float = 1.0  # sample only among the most likely tokens whose probabilities reach p
    seed: int = 1337  # sample i draws with seed + i (the server's "seed" draws as sample 0 does)
    drop_unknown: bool = False  # drop prompt characters the vocabulary lacks instead of stopping
    eval: bool = False  # sort checkpoints: exact-match accuracy over every input
    kv_cache: bool = True
    chat: bool = False  # models trained on .jsonl: a conversation in the terminal
    system: str = ""  # models trained on .jsonl: a system message before the conversation

    def validate(self):
        super().validate()
        if self.temperature < 0:
            raise UserError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be at least 1 (or left unset), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must not be negative, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise UserError(f"num_samples must be at least 1, got {self.num_samples}")

    def rules(self, task):
        """The decoding rules these flags ask for, on top of the model's own (task.rules)."""
        return replace(task.rules, max_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p, seed=self.seed)


@dataclass
class WalkthroughConfig(ModelSource):
    start: str = ""  # the input to walk through, e.g. CBABBC or 天行健 (a model trained to answer: the question)
    reply: str = ""  # a model trained to answer: its answer after --start, to see which tokens the loss counts
    layers: str = "all"  # which blocks to show: 'all' or numbers like '0' or '0,2'
    heads: str = "all"  # which attention heads to show: 'all' or numbers like '1'
    decimals: int = 3
    max_cols: int = 8  # wider matrices show their first columns, '...', and the last one
    format: str = "text"  # 'text', 'md' (Markdown), 'json' or 'html' (one page to open in a browser)
    output: str = ""  # --format=html: the page's path (default: walkthrough.html beside the checkpoint)
    temperature: float = 1.0  # the next-token probabilities are shown at this and at 0.5, 1, 2

    def validate(self):
        if self.format not in ("text", "md", "json", "html"):
            raise UserError(f"format must be one of text, md, json, html; got {self.format!r}")
        if not 0 <= self.decimals <= 12:
            raise UserError(f"decimals must be between 0 and 12, got {self.decimals}")
        if self.max_cols < 2:
            raise UserError(f"max_cols must be at least 2, got {self.max_cols}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be greater than 0, got {self.temperature}")


@dataclass
class ServeConfig(Decoding):
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 serves the network (set an api_key then)
    port: int = 8000
    model_name: str = ""  # the name clients ask for; empty: the checkpoint's folder name
    api_key: str = ""  # required as 'Authorization: Bearer KEY' when set (or from $SMALLGPT_API_KEY)
    max_batch: int = 16  # sequences decoded together at most; more requests wait their turn
    max_queue: int = 64  # requests waiting at most; more are answered 429 (busy)
    max_body: int = 1_000_000  # bytes a request body may have

    def validate(self):
        super().validate()
        for name in ("max_batch", "max_queue", "max_body"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be between 0 and 65535, got {self.port}")


@dataclass
class PlotConfig(ModelSource):
    start: str = ""  # the prompt for the attention maps (sort: the input letters); empty: one is chosen

    def validate(self):
        pass


def load_config(cls, argv):
    """Build a `cls` config from argv: an optional config file first, then --key=value or
    --key value overrides. Unknown keys and values of the wrong type raise UserError."""
    rest = list(argv)
    values = read_config_file(rest.pop(0)) if rest and not rest[0].startswith("--") else {}
    hints = typing.get_type_hints(cls)
    flags = {k for k, t in hints.items() if t is bool}
    for key, raw in parse_overrides(rest, flags).items():
        # a str field takes the text as typed (--start=1.50 stays '1.50')
        values[key] = raw if hints.get(key) is str else parse_literal(raw)
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, sorted(hints), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown config key {key!r}{hint}")
        values[key] = check_type(key, value, hints[key])
    cfg = cls(**values)
    cfg.validate()
    return cfg


def read_config_file(path):
    """Run a config file of plain assignments and return its names and values."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} not found (the built-in ones are in configs/)")
    source = p.read_text(encoding="utf-8")
    try:
        code = compile(source, str(p), "exec")
    except SyntaxError as e:
        raise UserError(f"syntax error in config file {path}, line {e.lineno}: {e.msg}") from None
    namespace = {}
    exec(code, namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_")}


def parse_overrides(args, flags=()):
    """['--a=1', '--b', 'x', '--c'] -> {'a': '1', 'b': 'x', 'c': 'True'}, the values as typed;
    a key in `flags` (the bool fields) given alone means True."""
    out = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise UserError(f"expected --key=value or --key value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq and key in flags and (i + 1 >= len(args) or args[i + 1].startswith("--")):
            raw = "True"
        elif not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise UserError(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            raw = args[i + 1]
            i += 1
        out[key] = raw
        i += 1
    return out


def parse_literal(raw):
    """A Python literal (3, 1e-3, None, 'x') where the text is one, else the text itself."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def check_type(key, value, expected):
    """Return `value` as `expected` (int is fine where a float is wanted) or raise UserError."""
    if typing.get_origin(expected) is typing.Union:  # Optional[X]
        if value is None:
            return None
        expected = next(t for t in typing.get_args(expected) if t is not type(None))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise UserError(f"{key}={value!r} has the wrong type: expected {expected.__name__}, "
                    f"got {type(value).__name__}")


def format_config(cfg):
    return "\n".join(f"  {k} = {v!r}" for k, v in asdict(cfg).items())
