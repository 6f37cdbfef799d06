"""`ray job submit --working-dir . -- python jobs/pretrain.py --config PRESET --data URI --output URI [--images N]`

Thin entry point: the same arguments as `cxrray pretrain`; joins the cluster named by RAY_ADDRESS.
Re-submitting the same command continues from the output's latest complete checkpoint.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
