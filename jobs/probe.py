"""`ray job submit --working-dir . -- python jobs/probe.py --encodings URI --output DIR [--fraction F ...]`

Thin entry point: the same arguments as `cxrray probe` (--config, --set too). It runs on the job
driver (scikit-learn on z needs no workers). DIR is a local directory on the driver's node: give an
absolute path, since a relative one resolves inside the job's temporary working directory.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
