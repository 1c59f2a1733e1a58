"""Train a GPT: python train.py configs/sort.py [--key=value ...]

Under torchrun it trains on several processes: torchrun --standalone --nproc_per_node=2 train.py configs/sort.py
"""

import sys

from model.config import TrainConfig, load_config, run_command
from model.trainer import TrainingDiverged, train


def train_command(argv):
    summary = train(load_config(TrainConfig, argv))
    if summary["stopped"] == "interrupted":
        print("interrupted: checkpoint saved; continue with --init_from=resume", file=sys.stderr)
        return 130
    return 0


def main(argv):
    return run_command(train_command, argv, failures=TrainingDiverged)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
