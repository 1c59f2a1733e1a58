"""Started by tests/test_distributed.py under torchrun: runs train.py's main() as it is, then
writes this rank's parameters to out_dir/rank{RANK}.pt so the test can compare the ranks."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import model.trainer as trainer  # noqa: E402
import train  # noqa: E402

runs = []
train_loop = trainer.train_loop


def keep_run(run):
    runs.append(run)
    return train_loop(run)


trainer.train_loop = keep_run
code = train.main(sys.argv[1:])
if runs:
    torch.save(runs[0].model.state_dict(), Path(runs[0].cfg.out_dir) / f"rank{os.environ['RANK']}.pt")
sys.exit(code)
