"""Train a GPT: python train.py configs/sort.py [--key=value ...]

Under torchrun it trains on several processes: torchrun --standalone --nproc_per_node=2 train.py configs/sort.py
"""

import sys

from model.config import TrainConfig, load_config
from model.trainer import TrainingDiverged, train


def main(argv):
    try:
        cfg = load_config(TrainConfig, argv)
        summary = train(cfg)
    except ValueError as e:  # UserError and the model's own checks: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["stopped"] == "interrupted":
        print("interrupted: checkpoint saved; continue with --init_from=resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
