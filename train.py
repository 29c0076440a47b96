"""Train a (parameter-reduced) ViT with FFCV + timm — a thin door to ``fastvit_reduce.train``.

    python train.py --config rn_configs/thin.yaml [--section.key=value ...]
    torchrun --standalone --nproc-per-node=2 train.py --config rn_configs/thin.yaml

``python train.py --help`` lists every key; docs/training.md has the two-node command, resuming
and the exit codes.
"""
import sys

from fastvit_reduce.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
