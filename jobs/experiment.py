"""`ray job submit --working-dir . -- python jobs/experiment.py --real URI --synthetic URI --output URI`

Thin entry point: the same arguments as `cxrray experiment cohorts` (--arms, --seeds, --config, --set too).
One Ray Train run per (arm, seed), the grid on Ray Tune (every fit the cluster has room for at once; GPU
workers with `--set experiment.use_gpu=true`); finished fits are not rerun.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "cohorts", *sys.argv[1:]]))
