"""`ray job submit --working-dir . -- python jobs/encode.py --checkpoint URI --data URI --output URI [--invert]`

Thin entry point: the same arguments as `cxrray encode` (--config, --set too). Ray Data actor pool over (shard, chunk) units; GPU actors with `--set encode.use_gpu=true`.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["encode", *sys.argv[1:]]))
