"""Config files and command-line overrides, shared by train.py and sample.py."""

import pytest

from model.config import SampleConfig, TrainConfig, load_config
from model.errors import UserError


def write(tmp_path, text):
    p = tmp_path / "cfg.py"
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_file_then_both_override_forms(tmp_path):
    path = write(tmp_path, "n_layer = 3\nlearning_rate = 1e-3\nout_dir = 'out/x'\n")
    cfg = load_config(TrainConfig, [path, "--max_iters=2000", "--n_layer", "5", "--learning_rate=1", "--bias", "False"])
    assert (cfg.n_layer, cfg.max_iters, cfg.out_dir, cfg.bias) == (5, 2000, "out/x", False)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float), "an int is fine where a float is expected"


def test_strings_are_taken_as_typed_and_bare_bool_flags_mean_true():
    cfg = load_config(SampleConfig, ["--start=1.50", "--eval", "--top_k", "None"])
    assert cfg.start == "1.50" and cfg.eval is True and cfg.top_k is None


def test_unknown_key_names_the_closest_keys():
    with pytest.raises(UserError, match=r"unknown config key 'learning_rat'; did you mean learning_rate"):
        load_config(TrainConfig, ["--learning_rat=1e-3"])


@pytest.mark.parametrize("arg,message", [
    ("--max_iters=abc", "max_iters='abc' has the wrong type: expected int, got str"),
    ("--max_iters=2.5", "max_iters=2.5 has the wrong type: expected int, got float"),
    ("--learning_rate=fast", "learning_rate='fast' has the wrong type: expected float, got str"),
    ("--bias=3", "bias=3 has the wrong type: expected bool, got int"),
])
def test_wrong_type_names_key_value_and_type(arg, message):
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, [arg])
    assert message in str(e.value)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(UserError, match="config file nope.py not found"):
        load_config(TrainConfig, ["nope.py"])
    path = write(tmp_path, "n_layer = 3\nn_head = = 4\n")
    with pytest.raises(UserError, match=r"syntax error in config file .*cfg.py, line 2"):
        load_config(TrainConfig, [path])


@pytest.mark.parametrize("arg,message", [
    ("--n_embd=50", "n_embd=50 is not divisible by n_head=4"),
    ("--block_size=0", "block_size must be at least 1, got 0"),
    ("--batch_size=0", "batch_size must be at least 1, got 0"),
    ("--learning_rate=0", "learning_rate must be greater than 0, got 0.0"),
    ("--learning_rate=-1e-3", "learning_rate must be greater than 0, got -0.001"),
    ("--eval_interval=0", "eval_interval must be at least 1, got 0"),
    ("--dropout=1.5", "dropout must be in [0, 1), got 1.5"),
    ("--task=poems", "task must be one of text, sort, chat; got 'poems'"),
])
def test_impossible_values(arg, message):
    with pytest.raises(UserError) as e:
        load_config(TrainConfig, [arg])
    assert message in str(e.value)


def test_a_flag_without_value_is_an_error():
    with pytest.raises(UserError, match="--max_iters needs a value"):
        load_config(TrainConfig, ["--max_iters"])


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from model.config import run_command

    def user_mistake(argv):
        raise UserError("bad flag; use another")

    def bug(argv):
        raise ValueError("an internal shape check failed")

    assert run_command(user_mistake, []) == 2
    assert capsys.readouterr().err == "error: bad flag; use another\n"
    with pytest.raises(ValueError, match="an internal shape check failed"):
        run_command(bug, [])
