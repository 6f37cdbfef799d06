"""`ray job submit --working-dir . -- python jobs/audit.py --checkpoint URI --probe DIR --data URI --finding NAME --output DIR`

Thin entry point: the same arguments as `cxrray audit` (--config, --set too). Counterfactuals on the explain actor pool; DIR is local to the driver: give an absolute path.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
