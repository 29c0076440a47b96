"""Train a (parameter-reduced) ViT with FFCV + timm — a thin door to ``fastvit_reduce.trainer``.

    python train.py --config rn_configs/thin.yaml [--section.key=value ...]
    torchrun --standalone --nproc-per-node=2 train.py --config rn_configs/thin.yaml

See ``fastvit_reduce/trainer.py`` for the two-node command, resuming and exit codes.
"""
import os
import sys

# why: ffcv's Loader calls torch.set_num_threads(num_workers) beside its own decode threads, and
# spinning OpenMP workers then slow small torch ops badly on CPU; must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastvit_reduce.trainer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
