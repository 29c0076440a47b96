"""``python -m fastvit_reduce.write --cfg.KEY=VALUE ...``: the same as ``fastvit-reduce write``."""
import sys

from fastvit_reduce.data.write import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
