"""Run timm's own ``train.py`` from a checkout, unchanged but for the Pillow-13 posterize guard.

    python -m fastvit_reduce.bench.timm_train PATH/TO/timm/train.py [train.py's arguments ...]

``bench parity`` runs its path (a) this way. ``train.py`` is not in timm's wheel or sdist, so the
user names a checkout of it (e.g. timm v1.0.22's, which is the seed's ``train.py`` minus its
reduction hooks); this repository never copies it. The file runs in this process as
``__main__`` (``runpy``), with the installed timm library, after ``guard_posterize`` (why: with
``rand-m9-mstd0.5-inc1`` timm's PIL RandAugment asks Pillow 13 for ``posterize(bits=0)``, which
now raises and kills a loader worker a few batches in; DataLoader workers are forked from this
process, so they inherit the guard).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run ``argv[0]`` (timm's ``train.py``) with ``argv[1:]`` as its command line."""
    if not argv or not Path(argv[0]).is_file():
        print(f"usage: python -m fastvit_reduce.bench.timm_train PATH/train.py [ARGS...] (got {argv[:1]})",
              file=sys.stderr)
        return 2
    from fastvit_reduce.bench.timm_path import guard_posterize

    train_py = Path(argv[0]).resolve()
    guard_posterize()
    sys.argv = [str(train_py), *argv[1:]]
    sys.path.insert(0, str(train_py.parent))  # as `python train.py` would
    runpy.run_path(str(train_py), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
