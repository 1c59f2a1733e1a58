"""Shared by the benchmarks: the machine's description, per-case subprocesses (so peak
memory is each case's own), this machine's measured matmul peak, and the result files."""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def run_case(script, case, *args):
    """Run `python script --case CASE [args]` and return the JSON object it prints last."""
    out = subprocess.run([sys.executable, str(script), "--case", case, *args], cwd=ROOT, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} --case {case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_peak_gflops(device="cpu", n=1024, seconds=1.0):
    """Dense float32 matmul throughput measured now, on this machine: the MFU denominator."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * count / (time.perf_counter() - start) / 1e9


def write_results(name, rows, columns, notes=""):
    """Print a table and write bench/results/NAME.json and NAME.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows, "notes": notes}, indent=2))
    fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    table = "\n".join(lines)
    md = f"# {name}\n\nMachine: {info}\n\n{table}\n\n{notes}\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(f"\n{name}\n{table}\n{notes}")
