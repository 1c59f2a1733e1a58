"""The run report (always written) and the plots (an optional extra: skipped without matplotlib)."""

import builtins
import json
import shutil
import struct

import pytest

from model.plots import main as plots_main
from model.plots import pyplot
from model.errors import UserError


def png_size(path):
    """(width, height) of a PNG file, after checking its signature and header chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path.name} has no PNG header chunk"
    assert data[-8:-4] == b"IEND", f"{path.name} is cut short"
    return struct.unpack(">II", data[16:24])


def test_sort_report(trained_sort):
    base, summary = trained_sort
    report = (base / "out" / "sort" / "report.md").read_text(encoding="utf-8")
    assert summary["report"].endswith("report.md")
    assert "| model | 85,584 parameters: n_layer 3, n_head 3, n_embd 48, block_size 11 |" in report
    run = json.loads((base / "out" / "sort" / "run.json").read_text(encoding="utf-8"))
    assert f"| device | {run['device']}, {run['dtype']}, 1 process |" in report, "device as the run used it"
    assert run["device"] in ("cpu", "cuda", "mps") and run["processes"] == 1
    assert f"| iterations | {summary['iter_num']} (stopped: heldout_acc 100%) |" in report
    assert f"| peak memory | {run['peak_memory_mb']:,.0f} MB (" in report and 100 < run["peak_memory_mb"] < 20_000
    assert "| held-out exact match | 100.0% of 146 inputs |" in report
    assert "| training exact match | 100.0% of 583 inputs |" in report
    assert f"| final val loss | {summary['val_loss']:.4f} |" in report
    answers = report.split("```text\n")[1].split("```")[0].splitlines()
    assert len(answers) == 3 and all(a.split(" -> ")[1] == "".join(sorted(a.split(" -> ")[0])) for a in answers)
    assert "sort_length = 6" in report and "learning_rate = " in report, "the config is in the report"


def test_text_report(trained_chinese):
    base, summary = trained_chinese
    report = (base / "out" / "chinese" / "report.md").read_text(encoding="utf-8")
    assert "| task | text from " in report and "(39 characters)" in report
    assert "exact match" not in report
    samples = report.split("```text\n")[1].split("```")[0]
    assert samples.count("-" * 40) == 2 and "天行健" in samples, "three samples of the learned text"


def test_plots_need_matplotlib_and_say_how_to_get_it(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(UserError, match=r'plots need matplotlib: pip install -e "\.\[plots\]"'):
        pyplot()


def copy_of_run(trained, name, tmp_path):
    """A copy of a trained run's folder, so plotting into it leaves the shared fixture as it was."""
    pytest.importorskip("matplotlib")
    base, _ = trained
    shutil.copytree(base / "out" / name, tmp_path / name)
    return tmp_path / name


def test_sort_plots_and_report_links(trained_sort, tmp_path, capsys):
    run = copy_of_run(trained_sort, "sort", tmp_path)
    assert plots_main([f"--out_dir={run}", "--start=CBABBC"]) == 0
    assert capsys.readouterr().out.split() == [str(run / n) for n in ("loss.png", "attention.png", "report.md")]
    width, height = png_size(run / "loss.png")
    assert width >= 600 and height >= 300 and (run / "loss.png").stat().st_size > 10_000
    width, height = png_size(run / "attention.png")
    assert width >= 600 and height >= 600, "3 layers x 3 heads of 11 x 11 maps"
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "![loss curves](loss.png)" in report and "![attention maps](attention.png)" in report


def test_text_plots_and_bad_prompt(trained_chinese, tmp_path, capsys):
    run = copy_of_run(trained_chinese, "chinese", tmp_path)
    assert plots_main([f"--out_dir={run}", "--start=天行健,君子"]) == 0
    assert png_size(run / "attention.png")[0] >= 400
    assert plots_main([f"--out_dir={run}", "--start=hello"]) == 2
    assert "--start has characters the model does not know: 'helo'" in capsys.readouterr().err


def test_a_converted_checkpoint_without_metrics_gets_attention_maps_only(tmp_path, capsys):
    """Bug: a checkpoint converted from nanoGPT, minGPT or the visualisation (no metrics.jsonl) stops
    with 'metrics.jsonl not found' instead of drawing its attention maps."""
    pytest.importorskip("matplotlib")
    from conftest import ROOT
    from model.convert import main as convert_main
    assert convert_main([str(ROOT / "tests" / "data" / "llm-viz" / "gpt-nano-sort-model.json"),
                         str(tmp_path / "viz")]) == 0
    capsys.readouterr()
    assert plots_main([f"--out_dir={tmp_path / 'viz'}", "--start=CBABBC"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "viz" / "attention.png")], "no metrics, no loss curves"
    assert png_size(tmp_path / "viz" / "attention.png")[0] >= 600
