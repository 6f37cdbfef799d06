"""`ray job submit --working-dir . -- python jobs/reproduce.py cxr_ddpm --preset paper --shards s3://bucket/cxr_ddpm`

Thin entry point: the same arguments as `cxrray reproduce` (--preset, --workdir, --shards, --n, --config, --set).
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", *sys.argv[1:]]))
