"""`ray job submit --working-dir . -- python jobs/latents.py --vae URI --data URI --output URI`

Thin entry point: the same arguments as `cxrray latents` (--config, --set too). Ray Data actor pool, one input
shard per unit; GPU actors with `--set latents.use_gpu=true`.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["latents", *sys.argv[1:]]))
