"""What a user's mistake or an accident does: a clear message naming the problem and the fix,
and nothing the user had is lost."""

import errno
import io
import json
import os
import pickle
import re
import signal
import subprocess
import time

import pytest
import torch

import sample as sample_cli
import train as train_cli
from conftest import ROOT, command, nanogpt_checkpoint, train_args
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, tokenizer_from_meta
from model.gpt import GPTConfig
from model.errors import UserError
from model.runtime import resolve_device

SMALL = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=8", "--batch_size=4", "--eval_iters=1"]


# ---- data ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    (None, "not found: give a UTF-8 text file or a folder of .txt files"),
    (b"", "the text is empty"),
    (b"abc\xff\xfedef", "is not UTF-8 text: byte 3 (0xff)"),
    ("短文".encode("utf-8"), "the text is too short: its training part has 2 tokens and block_size=8 needs at least 9"),
])
def test_bad_data_through_train_py(in_tmp, capsys, content, message):
    if content is not None:
        (in_tmp / "my.txt").write_bytes(content)
    code = train_cli.main([str(ROOT / "configs" / "chinese.py"), "--data=my.txt", "--out_dir=o", *SMALL])
    assert code == 2
    assert message in capsys.readouterr().err


# ---- checkpoints --------------------------------------------------------------------------

def test_corrupted_truncated_and_foreign_checkpoints(trained_sort, tmp_path, capsys):
    base, _ = trained_sort
    good = (base / "out" / "sort" / "ckpt.pt").read_bytes()
    cases = {"truncated.pt": good[: len(good) // 2], "random.pt": os.urandom(4096),
             "text.pt": b"hello, I am a text file\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert sample_cli.main([f"--ckpt={tmp_path / name}"]) == 2
        err = capsys.readouterr().err
        assert f"{name} is not a readable checkpoint (truncated, corrupted, or another kind of file)" in err, err
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    assert sample_cli.main([f"--ckpt={tmp_path / 'other.pt'}"]) == 2
    assert "other.pt is not a checkpoint: it lacks the 'model' and 'model_args' entries" in capsys.readouterr().err


def test_model_args_that_do_not_fit_the_weights(trained_sort, tmp_path, capsys):
    base, _ = trained_sort
    ckpt = torch.load(base / "out" / "sort" / "ckpt.pt", weights_only=True)
    ckpt["model_args"]["n_embd"] = 96
    torch.save(ckpt, tmp_path / "bad.pt")
    assert sample_cli.main([f"--ckpt={tmp_path / 'bad.pt'}"]) == 2
    err = capsys.readouterr().err
    assert "do not match its weights" in err and "'n_embd': 96" in err and "size mismatch" in err


def test_nanogpt_checkpoint_loads_with_a_notice_and_meta_pkl(tmp_path, capsys):
    path = nanogpt_checkpoint(tmp_path / "ckpt.pt")
    assert sample_cli.main([f"--ckpt={path}", "--max_new_tokens=5", "--num_samples=1"]) == 0
    out = capsys.readouterr()
    assert "has no vocabulary (a nanoGPT checkpoint keeps it in meta.pkl)" in out.err
    assert re.fullmatch(r"0( [0-4]){5}\n", out.out), out.out
    itos = {0: "\n", 1: "a", 2: "b", 3: "c", 4: "d"}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 5, "itos": itos, "stoi": {v: k for k, v in itos.items()}}, f)
    assert sample_cli.main([f"--ckpt={path}", f"--meta={tmp_path / 'meta.pkl'}", "--start=ab",
                            "--max_new_tokens=5", "--num_samples=1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ab") and set(text) <= set("\nabcd")
    assert sample_cli.main([f"--ckpt={path}", "--start=1 7"]) == 2, "ids are checked where they enter"
    assert "error: --start has token ids [7] outside the model's vocabulary [0, 5)" in capsys.readouterr().err


def test_meta_pkl_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"itos": Evil()}, f)
    with pytest.raises(UserError, match="only plain data"):
        tokenizer_from_meta(tmp_path / "meta.pkl")
    assert not (tmp_path / "pwned").exists()


def test_every_torch_load_is_weights_only():
    sources = [p for p in ROOT.rglob("*.py") if "tests" not in p.parts and ".git" not in p.parts]
    calls = [(p, m) for p in sources for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text(encoding="utf-8"))]
    assert calls, "expected torch.load calls in the project"
    for path, match in calls:
        assert "weights_only=True" in match.group(1), f"{path.name}: torch.load without weights_only=True"


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(Checkpoint({"w": torch.ones(4)}, GPTConfig(), iter_num=1), path)

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # stands in for the process being killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Checkpoint({"w": torch.zeros(4)}, GPTConfig(), iter_num=2), path)
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt.iter_num == 1 and torch.equal(ckpt.model["w"], torch.ones(4))


# ---- devices and output -------------------------------------------------------------------

def test_missing_device_lists_what_is_available(capsys, in_tmp):
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU; 'cuda:0' without one
    listed = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())])
    with pytest.raises(UserError, match=rf"device '{missing}' is not available on this machine; available: {listed}"):
        resolve_device(missing)
    assert train_cli.main([str(ROOT / "configs" / "sort.py"), f"--device={missing}"]) == 2
    assert f"device '{missing}' is not available" in capsys.readouterr().err
    if not torch.backends.mps.is_available():
        assert sample_cli.main(["--device=mps"]) == 2
        assert "device 'mps' is not available" in capsys.readouterr().err


def test_unwritable_out_dir_fails_before_training(in_tmp, capsys):
    (in_tmp / "a_file").write_text("not a folder")
    assert train_cli.main([str(ROOT / "configs" / "sort.py"), "--out_dir=a_file/run"]) == 2
    out, err = capsys.readouterr()
    assert "out_dir a_file/run is not writable" in err and "--out_dir" in err
    assert out == "", "it stopped before the run was set up (no config, model or memory printed)"


# ---- training accidents -------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(in_tmp, capsys):
    args = train_args("chinese.py", "run", *SMALL, "--max_iters=4", "--eval_interval=4")
    assert train_cli.main(args) == 0
    before = (in_tmp / "run" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    code = train_cli.main(args + ["--init_from=resume", "--max_iters=200", "--eval_interval=1000",
                                  "--learning_rate=1e30", "--decay_lr=False", "--grad_clip=0"])
    err = capsys.readouterr().err
    assert code == 1 and re.search(r"the loss became (nan|inf) at iteration \d+; training stopped", err), err
    assert "Try a lower --learning_rate" in err
    assert (in_tmp / "run" / "ckpt.pt").read_bytes() == before, "the last good checkpoint is untouched"


class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: a write past them fails as the system's would (ENOSPC)."""

    def __init__(self, path, mode, room):
        super().__init__(path, mode)
        self.room = room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return super().write(b)


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(in_tmp, monkeypatch, capsys):
    """Bug: the disk filling up while a checkpoint is written ends in torch's RuntimeError traceback
    ("unexpected pos ..."), or leaves a half-written ckpt.pt.tmp behind to fill the disk further."""
    import model.checkpoint as checkpoint
    saves = []

    def open_on_a_filling_disk(path, mode="r", *a, **kw):
        if str(path).endswith("ckpt.pt.tmp"):
            saves.append(path)
            if len(saves) == 2:  # the second save (iteration 4) finds the disk nearly full
                return FullDisk(path, mode, room=5000)
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(checkpoint, "open", open_on_a_filling_disk, raising=False)
    code = train_cli.main(train_args("chinese.py", "run", *SMALL, "--max_iters=6", "--eval_interval=2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(saves) == 2, err
    assert re.fullmatch(r"error: cannot write \S*run/ckpt.pt: No space left on device \(saving iteration 4\); "
                        r"\S*run/ckpt.pt still holds iteration 2, intact\. Free some space or choose another "
                        r"--out_dir, then continue with --init_from=resume", err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert load_checkpoint(in_tmp / "run" / "ckpt.pt").iter_num == 2, "the last good checkpoint still loads"
    assert not list((in_tmp / "run").glob("*.tmp")), "no partial file left to fill the disk further"


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(ROOT / "train.py", *train_args(
        "chinese.py", out, *SMALL, "--max_iters=1000000", "--log_interval=1", "--eval_interval=100000")),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: checkpoint saved; continue with --init_from=resume" in err
    ckpt = load_checkpoint(out / "ckpt.pt")
    logged = [json.loads(line)["iter"] for line in metrics.read_text().splitlines()]
    assert ckpt.iter_num == logged[-1] >= 5, "the checkpoint holds the last finished step"


# ---- what is saved, and when --------------------------------------------------------------

def saves_during(monkeypatch, args, interrupt_after=None):
    """Train in this process, recording the iteration of every checkpoint written. With
    interrupt_after=k, a real SIGINT arrives during step k (as Ctrl-C would)."""
    import model.trainer as trainer
    saved, steps = [], []
    real_save, real_step = trainer.save, trainer.train_step

    def recording_save(run):
        saved.append(run.iter_num)
        return real_save(run)

    def step_then_interrupt(*a, **kw):
        loss = real_step(*a, **kw)
        steps.append(1)
        if len(steps) == interrupt_after:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(trainer, "save", recording_save)
    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    code = train_cli.main(args)
    return code, saved


def test_every_state_is_saved_once_when_max_iters_is_not_a_multiple_of_eval_interval(in_tmp, monkeypatch):
    args = train_args("chinese.py", "run", *SMALL, "--max_iters=5", "--eval_interval=2")
    code, saved = saves_during(monkeypatch, args)
    assert code == 0 and saved == [2, 4, 5], f"saved at iterations {saved}; expected 2, 4 and the final 5, once each"
    assert load_checkpoint(in_tmp / "run" / "ckpt.pt").iter_num == 5


@pytest.mark.parametrize("eval_interval,interrupt_after,expected", [
    (1, 3, [1, 2, 3]),  # Ctrl-C during the step that would be evaluated and saved next
    (2, 4, [2, 4]),  # ... on an iteration that is a multiple of eval_interval, after an earlier save
    (2, 3, [2, 3]),  # ... between two evaluations
])
def test_ctrl_c_saves_the_newest_state_once(in_tmp, monkeypatch, capsys, eval_interval, interrupt_after, expected):
    args = train_args("chinese.py", "run", *SMALL, "--max_iters=50", f"--eval_interval={eval_interval}")
    code, saved = saves_during(monkeypatch, args, interrupt_after=interrupt_after)
    assert code == 130 and "interrupted: checkpoint saved" in capsys.readouterr().err
    assert saved == expected, f"saved at iterations {saved}, expected {expected}"
    assert load_checkpoint(in_tmp / "run" / "ckpt.pt").iter_num == interrupt_after, "resume starts after the last step"


def test_resumed_run_does_not_save_the_state_it_started_from(in_tmp, monkeypatch):
    args = train_args("chinese.py", "run", *SMALL, "--max_iters=2", "--eval_interval=2")
    assert train_cli.main(args) == 0
    code, saved = saves_during(monkeypatch, args + ["--init_from=resume"])
    assert code == 0 and saved == [], f"nothing new to save, yet saved at {saved}"
