"""lm-evaluation-harness over our models (model/harness.py): the numbers of lm-eval's own `hf` model
on our Hugging Face export, and a shipped task that tells a trained model from an untrained one."""

import pytest
import torch

from conftest import ROOT, working_dir
from model.checkpoint import open_model
from model.convert import main as convert_main

lm_eval = pytest.importorskip("lm_eval")  # a test extra; CI installs it


def requests(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("<|user|>天行健的下一句是什么?<|end|><|assistant|>", "君子以自强不息。"), ("你好 ", "你好!"), ("", "谢谢"), ("Hello", ", world")]
TEXTS = ["你好!我是一个很小的GPT,有什么可以帮你?" * 8, "天行健,君子以自强不息。"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_our_loglikelihoods_are_lm_evals_hf_model_on_our_export(trained_chat, tmp_path):
    """Bug: the continuation split unlike lm-eval's (trailing spaces, an empty context's prefix token),
    an off-by-one in which logits score it, rolling windows of another length (the texts here are
    longer than block_size), padding that reaches a row."""
    from lm_eval.models.huggingface import HFLM
    from model.harness import SmallGPT
    assert convert_main([str(trained_chat), str(tmp_path / "hf"), "--to=hf"]) == 0
    theirs = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=3, dtype="float32")
    ours = SmallGPT(open_model(trained_chat, quiet=True), batch_size=3)
    for (a, greedy_a), (b, greedy_b) in zip(ours.loglikelihood(requests("loglikelihood", PAIRS)),
                                            theirs.loglikelihood(requests("loglikelihood", PAIRS))):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b
    rolling = [(t,) for t in TEXTS]
    for a, b in zip(ours.loglikelihood_rolling(requests("loglikelihood_rolling", rolling)),
                    theirs.loglikelihood_rolling(requests("loglikelihood_rolling", rolling))):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b) / 100)
    assert ours.loglikelihood(requests("loglikelihood", PAIRS[:1]))[0][1], "markers read as the template's tokens"


def test_the_shipped_numerals_task_tells_a_trained_model_from_an_untrained_one(trained_numerals, tmp_path):
    """Bug: the task's prompt not read as the template (its markers as text), generation not cut at
    the end of turn, or the score not the model's."""
    from model.harness import EvalConfig, evaluate
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.gpt import GPT
    ckpt = load_checkpoint(trained_numerals[0] / "ckpt.pt")
    torch.manual_seed(0)
    ckpt.model = GPT(ckpt.model_config).state_dict()  # the same model before any training
    (tmp_path / "untrained").mkdir()
    save_checkpoint(ckpt, tmp_path / "untrained" / "ckpt.pt")
    with working_dir(ROOT):  # the task's data path is the repository's
        score = {name: evaluate(EvalConfig(out_dir=str(path), tasks="numerals", limit=20))["results"]["numerals"]
                 ["exact_match,none"] for name, path in (("trained", trained_numerals[0]), ("untrained", tmp_path / "untrained"))}
    assert score["trained"] == 1.0 and score["untrained"] == 0.0, score


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_lm_evals_local_completions_through_our_server_gives_the_direct_numbers(trained_chat):
    """Bug: echo's prompt scores one position off, a batch's choices not in their prompts' order, the
    end-of-text token missing from the scored tokens, /tokenize reading markers as text (lm-eval finds
    the remote tokenizer by itself), generation not stopping where the direct class stops."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from model.harness import SmallGPT
    from test_serve import serving
    opened = open_model(trained_chat, quiet=True)
    ours = SmallGPT(opened, batch_size=3)
    short = [("天行健,君子以自强不息。",), ("你好!我是一个很小的GPT,有什么可以帮你?",)]  # one window in both
    ask = [("<|user|>天行健的下一句是什么?<|end|><|assistant|>", {"until": ["<|end|>"], "max_gen_toks": 32}),
           ("<|user|>你好<|end|><|assistant|>", {"until": ["GPT"], "max_gen_toks": 40})]
    with serving(trained_chat) as running:  # max_length: lm-eval keeps one token of it for the one it asks
        theirs = LocalCompletionsAPI(base_url=running.url + "/v1/completions", model=running.name,
                                     max_length=opened.model.config.block_size + 1, batch_size=3)
        assert theirs.tokenizer_backend == "remote"
        pairs = (theirs.loglikelihood(requests("loglikelihood", PAIRS)),
                 ours.loglikelihood(requests("loglikelihood", PAIRS)))
        rolling = (theirs.loglikelihood_rolling(requests("loglikelihood_rolling", short)),
                   ours.loglikelihood_rolling(requests("loglikelihood_rolling", short)))
        replies = (theirs.generate_until(requests("generate_until", ask)), ours.generate_until(requests("generate_until", ask)))
    for (a, greedy_a), (b, greedy_b) in zip(*pairs):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b
    assert pairs[0][0][1], "the trained answer is the greedy one"
    for a, b in zip(*rolling):
        assert abs(a - b) < 1e-4
    assert replies[0] == replies[1] == ["君子以自强不息。", "你好!我是一个很小的"]
