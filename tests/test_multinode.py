"""A real multi-node Ray cluster on this machine (issue 28 §1): a `ray start --head` and worker nodes that
join it (tests/ray_node.py), each a raylet of its own with its own object store, temp dir, loopback ports
and process session. Work reaches it through `ray job submit`, as users send it. Marked `cluster`
(`make test-cluster`): three raylets are too heavy for the default suite on 2 cores.

What a single local Ray cannot show, asserted here: a task on one node reads an object another node made
(real object transfer, checked by checksum) with every socket of every node on loopback, and a node
killed whole (its raylet and every process on it, as when a machine is lost) is declared dead by the GCS
while the task it was running is retried elsewhere and the job still succeeds."""
from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

from ray_head import LOOPBACK, RAY_CLI, node_state, start_head, start_worker, wait_for_node

pytestmark = pytest.mark.cluster
JOB_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU) and worker nodes a and b (1 CPU each, custom resources node_a / node_b)."""
    head = start_head(num_cpus=1, object_store_mb=200)
    nodes = {}
    try:
        for name in ("a", "b"):
            nodes[name] = start_worker(head, num_cpus=1, resources={f"node_{name}": 1})
        yield SimpleNamespace(head=head, nodes=nodes)
    finally:
        survivors = [p for node in [*nodes.values(), head] for p in node.stop()]
        assert not survivors, f"processes of the test cluster survived teardown: {survivors}"


def run_job(head, folder, script: str, timeout: float = JOB_TIMEOUT_S, while_running=None) -> dict:
    """Write `script` to folder/job.py, `ray job submit` it (working dir `folder`), wait (bounded, calling
    `while_running(elapsed)` meanwhile) for it to succeed; returns the JSON of its last log line."""
    from ray.job_submission import JobStatus

    (folder / "job.py").write_text(textwrap.dedent(script))
    job_id = f"test-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in head.env.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([RAY_CLI, "job", "submit", "--address", head.address, "--submission-id", job_id,
                          "--working-dir", str(folder), "--no-wait", "--", "python", "job.py"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    client, start = head.job_client(), time.monotonic()
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() - start > timeout:
            client.stop_job(job_id)
            pytest.fail(f"job still {status} after {timeout} s:\n{client.get_job_logs(job_id)[-3000:]}")
        if while_running is not None:
            while_running(time.monotonic() - start)
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])


def test_a_task_on_one_node_reads_an_object_made_on_another(cluster, tmp_path):
    ids = {name: node_state(cluster.head, node.resources)[0] for name, node in cluster.nodes.items()}
    out = run_job(cluster.head, tmp_path, """
        import hashlib, json
        import numpy as np, ray

        ray.init()

        @ray.remote(num_cpus=0, resources={"node_a": 0.01})
        def produce():
            return np.random.default_rng(7).integers(0, 256, 20_000_000, dtype=np.uint8)  # 20 MB: object store

        @ray.remote(num_cpus=0, resources={"node_a": 0.01})
        def where():
            return ray.get_runtime_context().get_node_id()

        @ray.remote(num_cpus=0, resources={"node_b": 0.01})
        def consume(array):
            return hashlib.sha256(array.tobytes()).hexdigest(), ray.get_runtime_context().get_node_id()

        digest, consumer = ray.get(consume.remote(produce.remote()))
        print(json.dumps({"producer": ray.get(where.remote()), "consumer": consumer, "sha256": digest,
                          "driver": ray.get_runtime_context().get_node_id()}))
    """)
    expected = hashlib.sha256(np.random.default_rng(7).integers(0, 256, 20_000_000, dtype=np.uint8).tobytes()).hexdigest()
    assert out["sha256"] == expected
    assert (out["producer"], out["consumer"]) == (ids["a"], ids["b"])
    assert out["driver"] not in ids.values()  # the job's driver runs on the head
    sockets = [s for node in [cluster.head, *cluster.nodes.values()] for s in node.listening()]
    assert {port for _, port, _, _ in sockets} >= {cluster.nodes["a"].ports["node_manager_port"], cluster.head.ports["port"]}
    assert not [s for s in sockets if s[0] not in LOOPBACK], sockets


def test_a_killed_node_is_declared_dead_and_its_task_runs_elsewhere(cluster, tmp_path):
    doomed = start_worker(cluster.head, num_cpus=1, resources={"node_c": 1})
    try:
        doomed_id = node_state(cluster.head, doomed.resources)[0]
        marker = tmp_path / "started_on_c"
        killed = {}

        def kill_once_started(elapsed: float) -> None:
            if marker.exists() and not killed:
                killed["processes"] = len(doomed.processes())
                killed["survivors"] = doomed.stop()  # SIGKILL its raylet and every process on it

        out = run_job(cluster.head, tmp_path, f"""
            import json, time
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            ray.init()

            @ray.remote(num_cpus=1, max_retries=3)
            def work(doomed):
                me = ray.get_runtime_context().get_node_id()
                if me == doomed:
                    open({str(marker)!r}, "w").write(me)
                    time.sleep(600)  # killed with its node long before this ends
                return me

            on = NodeAffinitySchedulingStrategy({doomed_id!r}, soft=True)
            print(json.dumps({{"ran_on": ray.get(work.options(scheduling_strategy=on).remote({doomed_id!r}))}}))
        """, while_running=kill_once_started)
        assert marker.read_text() == doomed_id  # the first attempt really ran on the node that was killed
        assert killed["processes"] >= 2 and not killed["survivors"], killed  # raylet + the task's worker, at least
        assert out["ran_on"] != doomed_id
        assert wait_for_node(cluster.head, doomed.resources, "DEAD", time.monotonic() + 60) == doomed_id
    finally:
        doomed.stop()
