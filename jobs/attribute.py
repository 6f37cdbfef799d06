"""`ray job submit --working-dir . -- python jobs/attribute.py --method gradcam --checkpoint DIR --data FILE_OR_URI --finding NAME --output URI`

Thin entry point: the same arguments as `cxrray attribute` (--probe, --split, --limit, --config, --set too). Ray Data
actor pool over groups of images of one shard; GPU actors with `--set attribute.use_gpu=true`.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["attribute", *sys.argv[1:]]))
