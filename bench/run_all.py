"""Every benchmark but the nanoGPT comparison (which needs a nanoGPT checkout), one after the
other (about 20 minutes on a 2-core CPU, 15 of them the llama.cpp comparison, which also writes
about 7 GB of model files into bench/out/vs_llamacpp/ the first time):

    python bench/run_all.py

Tables are printed; JSON and Markdown land in bench/results/.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["train_speed.py", "loop_overhead.py", "sample_speed.py", "sort_time.py", "thread_forward.py", "serve.py",
           "vs_llamacpp.py"]


def main():
    failed = [s for s in SCRIPTS if subprocess.run([sys.executable, str(HERE / s)]).returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
