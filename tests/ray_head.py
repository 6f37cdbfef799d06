"""A real `ray start --head` cluster on 127.0.0.1 for tests that go through the Jobs API
(`ray job submit`), the way an operator's cluster is used, and worker nodes that join it
(`start_worker`, each a raylet in a session of its own, so that killing that session is losing the node).

Use it from a test module with ``from ray_head import ray_head, ray_head_address  # noqa: F401``.
The fixtures are session-scoped and backed by one module-level instance, so every module that
imports them shares the same head node (start-up costs ~10 s).

Isolation from any other Ray on the machine (e.g. the in-process `ray_local` fixture):
- its own short ``--temp-dir``, so ``ray_current_cluster`` is written there and a bare
  ``ray.init()`` elsewhere never attaches to this head;
- every port is chosen free on 127.0.0.1 (GCS, dashboard, agents, client server, raylet...);
- teardown does NOT run ``ray stop``: in Ray 2.60 ``ray stop [--force]`` kills every Ray process of
  the machine, whatever cluster it belongs to. ``ray start`` is run as the leader of a new session
  (``start_new_session=True``) and all the daemons and workers it spawns stay in that session (the
  workers get their own process group, but not their own session), so teardown SIGKILLs (what
  ``--force`` does) exactly the processes whose session id is ours, plus their descendants, and
  checks that none survived.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
BIN = Path(sys.executable).parent
RAY_CLI = str(BIN / "ray")
# The de-identification secret of this test cluster (not a real secret).
CLUSTER_SALT = "ray-head-test-salt-not-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayNode:
    """One `ray start` node on this machine: its raylet and every process it started share the session
    `sid` (the head's also holds the GCS and the dashboard), so killing them is losing the machine."""
    temp_dir: Path
    sid: int                     # session id of every process of this node
    env: dict = field(repr=False)  # environment of the node's processes (its workers inherit it)
    ports: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)  # custom resources it was started with
    leader: subprocess.Popen | None = field(default=None, repr=False)  # its `ray start --block`, when blocking

    def processes(self) -> list[psutil.Process]:
        """Live processes of this node: same session id as its `ray start`, plus their descendants."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.sid:
                    found[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
        for proc in list(found.values()):
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.Error:
                continue
        found.pop(os.getpid(), None)  # never this test process
        return [p for p in found.values() if _alive(p)]

    def listening(self) -> list[tuple[str, int, int, str]]:
        """(ip, port, pid, process name) of every TCP/UDP socket this cluster listens on."""
        out = []
        for proc in self.processes():
            try:
                conns = proc.net_connections(kind="inet")
                name = proc.name()
            except psutil.Error:
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                    out.append((c.laddr.ip, c.laddr.port, proc.pid, name))
        return out

    def stop(self, timeout: float = 10.0) -> list[psutil.Process]:
        """Stop only this cluster's processes, the way `ray stop --force` would (SIGKILL: on
        SIGTERM the GCS and raylet linger for >10 s); see the module docstring for why not
        `ray stop` itself. Returns the processes still alive afterwards (expected: none)."""
        deadline = time.monotonic() + timeout
        while (procs := self.processes()) and time.monotonic() < deadline:
            for proc in procs:  # again each round: a dying raylet may still have spawned a worker
                _signal(proc, signal.SIGKILL)
            time.sleep(0.2)
        if self.leader is not None:
            self.leader.poll()  # reap it
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return procs


@dataclass
class RayHead(RayNode):
    address: str = ""            # http://127.0.0.1:<dashboard port>: the Jobs API (`ray job submit --address`)
    gcs_address: str = ""        # 127.0.0.1:<gcs port>: what `ray.init(address=...)` and `ray start --address` join

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def start_head(num_cpus: int = 2, object_store_mb: int = 400, env: dict | None = None,
               timeout: float = 240.0) -> RayHead:
    """`ray start --head` on loopback; returns once the dashboard's Jobs API answers."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Unix socket paths <= 107 chars
    ports = {name: free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "node-manager-port", "object-manager-port")}
    head_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head_env.update({
        # `python` in a job's entrypoint must be this environment's interpreter, as on a real node
        # whose image puts its Python first on PATH.
        "PATH": f"{BIN}{os.pathsep}{head_env.get('PATH', '')}",
        # Loopback only: with this at 0 Ray resolves its own node IP to 127.0.0.1 (never the
        # external interface) and refuses to let other machines join.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        # The de-identification secret lives in the cluster's environment, as an operator sets it
        # (instance profile / SSM on AWS, a Kubernetes Secret on KubeRay): every driver and worker
        # inherits it, and it never travels in a job submission (a runtime env is stored in the
        # job table and shown by the dashboard).
        "CXRRAY_SALT": CLUSTER_SALT,
    })
    head_env.update(env or {})
    cmd = [RAY_CLI, "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--num-cpus={num_cpus}", "--num-gpus=0",
           f"--object-store-memory={object_store_mb * 1024 * 1024}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log = temp_dir / "ray_start.log"  # a file, not a pipe: the daemons must not hold our pipe open
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=head_env, cwd=temp_dir, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    head = RayHead(address=f"http://127.0.0.1:{ports['dashboard-port']}",
                   gcs_address=f"127.0.0.1:{ports['port']}", temp_dir=temp_dir, sid=proc.pid,
                   env=head_env, ports=ports)
    _started(proc, head, log, timeout, lambda deadline: _wait_for_jobs_api(head.address, deadline))
    return head


def start_worker(head: RayHead, num_cpus: int = 1, resources: dict | None = None, object_store_mb: int = 200,
                 timeout: float = 120.0, block: bool = False, env: dict | None = None) -> RayNode:
    """Another raylet on this machine joining `head`, in a session of its own, with its own temp dir and free
    loopback ports (started by ray_node.py: why not `ray start --address` is said there); returns once the
    GCS lists it alive, found by `resources`, which must name a resource no other node has. `block`: its
    starter stays in the foreground as `ray start --block` does (`RayNode.leader`; SIGTERM to it drains the
    node, as a spot reclaim or a pod deletion does); `env`: extra environment of the node's processes."""
    resources = dict(resources or {})
    if not resources:
        raise ValueError("a worker node needs a custom resource of its own, to be found and to pin work to it")
    temp_dir = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    ports = {name: free_port() for name in ("node_manager_port", "object_manager_port", "metrics_export_port",
                                            "metrics_agent_port", "dashboard_agent_listen_port", "runtime_env_agent_port")}
    params = {"num_cpus": num_cpus, "resources": resources, "object_store_memory": object_store_mb * 1024 * 1024, **ports}
    log, node_env = temp_dir / "ray_node.log", {**head.env, **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("ray_node.py")), head.gcs_address,
                                 str(temp_dir), json.dumps(params), *(["block"] if block else [])], env=node_env,
                                cwd=temp_dir, start_new_session=True, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    node = RayNode(temp_dir=temp_dir, sid=proc.pid, env=node_env, ports=ports, resources=resources,
                   leader=proc if block else None)
    _started(proc, node, log, timeout, lambda deadline: wait_for_node(head, resources, "ALIVE", deadline), block)
    return node


def node_state(head: RayHead, resources: dict) -> tuple[str, str] | None:
    """(node id, state) of the newest node whose total resources include `resources`, from the GCS
    through the State API; None when no such node is known."""
    from ray.util.state import list_nodes

    found = [n for n in list_nodes(address=head.address, detail=True, limit=1000, raise_on_missing_output=False)
             if all(n.resources_total.get(k) == v for k, v in resources.items())]
    if not found:
        return None
    newest = max(found, key=lambda n: n.start_time_ms or 0)
    return newest.node_id, newest.state


def wait_for_node(head: RayHead, resources: dict, state: str, deadline: float) -> str:
    """Poll (bounded) until the node holding `resources` is in `state` (ALIVE / DEAD); returns its id."""
    last = None
    while time.monotonic() < deadline:
        try:
            last = node_state(head, resources)
        except Exception as err:  # noqa: BLE001 - the State API may not answer while a node starts
            last = err
        if isinstance(last, tuple) and last[1] == state:
            return last[0]
        time.sleep(0.5)
    raise TimeoutError(f"node with {resources} not {state} in time (last: {last!r})")


def _started(proc: subprocess.Popen, node: RayNode, log: Path, timeout: float, ready, block: bool = False) -> None:
    """Wait for `ray start` to exit 0 (`block`: to be still running) and for `ready(deadline)`; on any failure
    kill what it started."""
    try:
        if not block and proc.wait(timeout=timeout) != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
        ready(time.monotonic() + timeout)
        if block and proc.poll() is not None:
            raise RuntimeError(f"ray start --block exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
    except BaseException:
        proc.kill()
        node.stop()
        raise


def _wait_for_jobs_api(address: str, deadline: float) -> None:
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as resp:
                json.loads(resp.read())
            with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception as err:  # noqa: BLE001 - not up yet
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"Jobs API at {address} did not answer in time (last error: {last!r})")


_HEAD: RayHead | None = None


def shared_head() -> RayHead:
    """The session's head node, started on first use."""
    global _HEAD
    if _HEAD is None:
        _HEAD = start_head()
    return _HEAD


def stop_shared_head() -> list[psutil.Process]:
    global _HEAD
    survivors = _HEAD.stop() if _HEAD is not None else []
    _HEAD = None
    return survivors


@pytest.fixture(scope="session")
def ray_head():
    """The session's `ray start --head` cluster on 127.0.0.1 (a RayHead)."""
    head = shared_head()
    yield head
    survivors = stop_shared_head()
    assert not survivors, f"processes of the test cluster survived teardown: {survivors}"


@pytest.fixture(scope="session")
def ray_head_address(ray_head) -> str:
    """`http://127.0.0.1:<dashboard port>`: pass it to `ray job submit --address`."""
    return ray_head.address

