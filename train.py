"""Train a (parameter-reduced) ViT with FFCV + timm — a thin door to ``fastvit_reduce.trainer``.

    python train.py --config rn_configs/thin.yaml [--section.key=value ...]
    torchrun --standalone --nproc-per-node=2 train.py --config rn_configs/thin.yaml

See ``fastvit_reduce/trainer.py`` for the two-node command, resuming and exit codes.
"""
import sys

from fastvit_reduce.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
