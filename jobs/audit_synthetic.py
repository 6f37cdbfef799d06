"""`ray job submit --working-dir . -- python jobs/audit_synthetic.py --synthetic URI --train URI --output URI`

Thin entry point: the same arguments as `cxrray audit-synthetic` (--test, --features-model, --config, --set).
Trains the image-only judge on the real training split, then measures fidelity, FID/KID and memorisation.
"""
import sys

from cxrray.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit-synthetic", *sys.argv[1:]]))
