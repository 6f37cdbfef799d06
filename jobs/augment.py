"""`ray job submit --working-dir . -- python jobs/augment.py --ddpm CKPT --classifier DIR --data URI --output URI`

Thin entry point: the same arguments as `cxrray augment` (--config, --set too). Ray Data actor pool over shards;
GPU actors with `--set augment.use_gpu=true`.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["augment", *sys.argv[1:]]))
