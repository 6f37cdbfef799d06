"""Ray start-up shared by the CLI, jobs and benchmarks: join a cluster if one is named, else start
a local one bound to loopback with a capped object store."""
from __future__ import annotations

import logging
import os

import ray


def ensure_ray(num_cpus: int | None = None, object_store_mb: int = 1024) -> None:
    """Idempotent. RAY_ADDRESS (set by `ray job submit`) joins that cluster; otherwise local Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = {"logging_level": logging.WARNING, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **common)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        object_store_memory=object_store_mb * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}},
        **common,
    )
