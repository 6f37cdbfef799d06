"""`ray job submit --working-dir . -- python jobs/dreambooth.py --checkpoint LDM --data LATENTS --output URI`

Thin entry point: the same arguments as `cxrray dreambooth` (--config, --set too). Each stage trains on Ray Train
(`train.*`: workers, strategy, GPUs) with the `dreambooth` section's schedule.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["dreambooth", *sys.argv[1:]]))
