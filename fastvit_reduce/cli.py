"""``fastvit-reduce`` command line: one subcommand per module, imported only when used.

    fastvit-reduce info     [--model M] [--strategy S ...] [--json]   parameter/FLOP table
    fastvit-reduce write    --cfg.data_dir=... --cfg.write_path=...     ImageFolder -> .beton
    fastvit-reduce inspect  FILE.beton                                  what a .beton holds
    fastvit-reduce sample   --out DIR                                   embedded sample ImageNet
    fastvit-reduce bench    loader|strategies ...                       loader / strategy step tables
    fastvit-reduce train    --config rn_configs/thin.yaml ...           same as train.py
    fastvit-reduce sweep    CONFIG... [--gpus 0,1] [--out DIR]          run many configs
    fastvit-reduce sweep    --paired CONFIG...                          K variants, one process, same batches
    fastvit-reduce report   RUN_DIR...                                  sweep summary table/plot
    fastvit-reduce compare  RUN_A RUN_B                                 same weights? first differing epoch
    fastvit-reduce export   RUN OUT [--untie]                           weights + config.json stock timm loads
    fastvit-reduce bench    e2e|threads ...                             vs timm's pipeline / OpenMP
    fastvit-reduce bench    gpu --out DIR [--device cpu] [--table]      the GPU check (JSON lines per section)
    fastvit-reduce bench    eval RUN_DIR... --val-dir D                 same weights, our vs timm's val pipeline
    fastvit-reduce bench    parity --train-dir D/train --val-dir D/val  top-1 vs timm's train.py, per seed
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": "fastvit_reduce.info",
    "write": "fastvit_reduce.data.write",
    "inspect": "fastvit_reduce.data.inspect",
    "sample": "fastvit_reduce.sample",
    "bench loader": "fastvit_reduce.bench.loader",
    "bench strategies": "fastvit_reduce.bench.strategies",
    "bench e2e": "fastvit_reduce.bench.e2e",
    "bench gpu": "fastvit_reduce.bench.gpu_check",
    "bench threads": "fastvit_reduce.bench.threads",
    "bench eval": "fastvit_reduce.bench.evalpaths",
    "bench parity": "fastvit_reduce.bench.parity",
    "train": "fastvit_reduce.train",
    "sweep": "fastvit_reduce.sweep",
    "report": "fastvit_reduce.report",
    "compare": "fastvit_reduce.runs",
    "export": "fastvit_reduce.export",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` to the subcommand module's ``main(argv) -> int``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            module = importlib.import_module(COMMANDS[name])
            return int(module.main(argv[words:]) or 0)
    if argv and argv[0] not in ("-h", "--help"):
        print(f"fastvit-reduce: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
    print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if argv and argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
