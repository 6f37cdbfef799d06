"""`ray job submit --working-dir . -- python jobs/explain.py --checkpoint URI --probe DIR --input FILE_OR_URI --finding NAME --output URI`

Thin entry point: the same arguments as `cxrray explain` (--config, --set too). Ray Data actor pool over groups of images of one shard; GPU actors with `--set explain.use_gpu=true`.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["explain", *sys.argv[1:]]))
