"""Local mode starts its own Ray even when an earlier `ray start` left a stale cluster address behind."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STALE = Path("/tmp/ray/ray_current_cluster")


@pytest.mark.skipif(STALE.exists(), reason="a real ray_current_cluster exists on this machine; not overwriting it")
def test_local_mode_ignores_a_stale_current_cluster_file():
    STALE.parent.mkdir(parents=True, exist_ok=True)
    STALE.write_text("127.0.0.1:1")  # what a dead `ray start` head leaves behind
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        code = ("from cxrray.runtime import ensure_ray; import ray; ensure_ray(1, 80); "
                "print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        STALE.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cpus 1.0" in done.stdout
