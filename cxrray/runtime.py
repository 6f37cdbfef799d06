"""Ray start-up shared by the CLI, jobs and benchmarks: join a cluster if one is named, else start
a local one bound to loopback with a capped object store."""
from __future__ import annotations

import logging
import os

import ray
import ray.data


def configure_data() -> None:
    """Ray Data settings for this driver. Per-operator resource reservation is off: on small nodes it
    holds back half the CPUs, so a read -> map pipeline ran one task at a time (8 one-second tasks on
    2 CPUs: 7.5 s with it, 4.1 s without; bench/stream.py: 0.35x -> >1x of a plain webdataset loop)."""
    ctx = ray.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = os.environ.get("CXRRAY_PROGRESS_BARS", "0") == "1"


def ensure_ray(num_cpus: int | None = None, object_store_mb: int = 1024) -> None:
    """Idempotent. RAY_ADDRESS (set by `ray job submit`) joins that cluster; otherwise a new local Ray
    (address="local": never attach to whatever /tmp/ray/ray_current_cluster names, which an earlier
    `ray start` leaves behind even after that cluster died)."""
    configure_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = {"logging_level": logging.WARNING, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
        return
    _loopback_only()
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=object_store_mb * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                     "worker_process_setup_hook": "cxrray.worker_setup.quiet_local_workers"},
        **common,
    )


def _loopback_only() -> None:
    """Make a local Ray bind to 127.0.0.1. `_node_ip_address="127.0.0.1"` alone is not enough: Ray
    resolves localhost to the machine's address while multi-node clusters are enabled, and the GCS,
    raylet and agents listened on every interface (measured: "::", "0.0.0.0", the external address).
    With clusters disabled (the environment variable for the processes Ray starts, the constant for
    this already-imported driver: Ray reads it at import) it binds to loopback, as `ray start
    --node-ip-address=127.0.0.1` with the variable at 0 does. Only a new local Ray is affected;
    tests/test_runtime.py fails if a Ray upgrade changes this."""
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
