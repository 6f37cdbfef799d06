"""Start one Ray worker node that joins a head on 127.0.0.1: `python ray_node.py GCS_ADDRESS TEMP_DIR
'{json of RayParams fields}' [block]`. Without `block` it exits once the node is up (its daemons stay up in
this process's session, as after `ray start`); with it, it stays in the foreground as `ray start --block` does
(PID 1 of a Kubernetes pod) and answers SIGTERM as Ray's own node does: drain the node with reason PREEMPTION
for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, then stop every process it started.

Why not `ray start --address`: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps Ray on loopback) the
CLI refuses to start a worker node, and with it at 1 Ray replaces 127.0.0.1 by the machine's address and
binds every interface (measured here with Ray 2.60: the GCS on ::, the dashboard on the external IP). This
is what the CLI then does, as Ray's own `ray.cluster_utils.Cluster.add_node` does it: a
`ray._private.node.Node(head=False)` with the node's parameters, everything on 127.0.0.1."""
from __future__ import annotations

import json
import signal
import sys


def main(gcs_address: str, temp_dir: str, params: str, mode: str = "") -> int:
    import ray._private.node
    from ray._private.parameter import RayParams

    ray_params = RayParams(gcs_address=gcs_address, node_ip_address="127.0.0.1", temp_dir=temp_dir, num_gpus=0,
                           **json.loads(params))
    block = mode == "block"  # shutdown_at_exit installs Ray's SIGTERM handler (drain, then stop)
    node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=block, spawn_reaper=False)
    print(f"node {node.node_id} up at {node.node_ip_address}", flush=True)
    while block:
        signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
