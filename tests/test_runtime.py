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


LISTENING = """
import json, socket, psutil, ray
from cxrray.runtime import ensure_ray
ensure_ray(1, 80)
out = []
for proc in psutil.Process().children(recursive=True):
    try:
        out += [(c.laddr.ip, c.laddr.port, proc.name()) for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)]
    except psutil.Error:
        pass
print(json.dumps({"sockets": out, "node_ip": ray.util.get_node_ip_address()}))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only():
    """The Ray a CLI command starts for itself (no RAY_ADDRESS) binds every socket to loopback."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    done = subprocess.run([sys.executable, "-c", LISTENING], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in found["sockets"]}
    assert {"gcs_server", "raylet"} <= names, found  # not vacuous
    exposed = [s for s in found["sockets"] if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed and found["node_ip"] == "127.0.0.1", found


def test_a_local_rays_workers_silence_the_placement_group_cleaner_it_cannot_serve(ray_local):
    """Ray Train's cleaner polls the State API, which a local Ray (no dashboard) lacks, and warned every few
    seconds of every run; the local Ray's worker setup hook raises that one logger to ERROR."""
    import importlib
    import inspect
    import logging

    from cxrray.worker_setup import CLEANER_LOGGER

    module = importlib.import_module(CLEANER_LOGGER)  # fails if a Ray upgrade moves the cleaner
    assert "Failed to query Ray Train Controller actor state" in inspect.getsource(module)

    @ray_local.remote
    def levels() -> tuple[int, int]:
        return logging.getLogger(CLEANER_LOGGER).getEffectiveLevel(), logging.getLogger("ray.train").getEffectiveLevel()

    cleaner, train = ray_local.get(levels.remote())
    assert cleaner == logging.ERROR and train < logging.ERROR  # only the cleaner is quieted
