"""`ray job submit --working-dir . -- python jobs/generate.py --checkpoint URI --cohort SPEC.yaml --output URI`

Thin entry point: the same arguments as `cxrray generate` (--n, --steps, --sampler, --guidance, --config,
--set too). Ray Data actor pool, one shard per unit, resumable; GPU actors with `--set generate.use_gpu=true`.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
