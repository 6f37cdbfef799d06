"""`ray job submit --working-dir . -- python jobs/ingest.py --input DIR --output URI [...]`

Thin entry point: the same arguments as `cxrray ingest`; joins the cluster named by RAY_ADDRESS.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
