"""`ray job submit` of the jobs/ entry points against a real `ray start --head` cluster on loopback,
the way an operator runs them (README: "Jobs are submitted with `ray job submit --runtime-env
cluster/runtime_env.yaml --working-dir . -- python jobs/<stage>.py ...`")."""
from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from ray_head import LOOPBACK, RAY_CLI, ray_head, ray_head_address  # noqa: F401 (session fixtures)

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
JOB_TIMEOUT_S = 90


def ray_cli(*args: str, head, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in head.env.items() if k not in ("RAY_ADDRESS", "CXRRAY_SALT")}
    return subprocess.run([RAY_CLI, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def submit(head, *entrypoint: str) -> str:
    """`ray job submit --no-wait` as in the README; returns the submission id."""
    job_id = f"test-{uuid.uuid4().hex[:10]}"
    res = ray_cli("job", "submit", "--address", head.address, "--submission-id", job_id,
                  "--working-dir", str(REPO), "--runtime-env", str(RUNTIME_ENV), "--no-wait",
                  "--", *entrypoint, head=head)
    assert res.returncode == 0, res.stdout + res.stderr
    return job_id


def wait_for(head, job_id: str, timeout: float = JOB_TIMEOUT_S, sockets: set | None = None) -> str:
    """Poll the job's status (bounded) until it is terminal; returns it. With `sockets`, also
    collects what the cluster listens on meanwhile (driver, job supervisor, workers)."""
    from ray.job_submission import JobStatus

    client = head.job_client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status.value
        if sockets is not None:
            sockets.update(head.listening())
        time.sleep(0.5)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} still {status} after {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")
    return JobStatus.PENDING.value  # unreachable


def job_logs(head, job_id: str) -> str:
    res = ray_cli("job", "logs", "--address", head.address, job_id, head=head)
    assert res.returncode == 0, res.stderr
    return res.stdout


def assert_loopback_only(sockets) -> None:
    exposed = sorted(s for s in sockets if s[0] not in LOOPBACK)
    assert not exposed, f"Ray sockets bound beyond loopback (ip, port, pid, process): {exposed}"


def test_head_listens_on_loopback_only(ray_head):
    sockets = ray_head.listening()
    ports = {port for _, port, _, _ in sockets}
    # not vacuous: the GCS and the dashboard (Jobs API) are among the sockets inspected
    assert ray_head.ports["port"] in ports and ray_head.ports["dashboard-port"] in ports, sockets
    assert_loopback_only(sockets)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from cxrray.data.phantom import PhantomConfig, generate

    root = tmp_path_factory.mktemp("phantoms")
    generate(20, root, PhantomConfig(size=64))
    return root


@pytest.fixture(scope="module")
def ingest_job(ray_head, phantoms, tmp_path_factory):
    """One ingest job, shared: its test checks it, the pretraining job trains on its shards."""
    shards = tmp_path_factory.mktemp("job-shards") / "shards"
    job_id = submit(ray_head, "python", "jobs/ingest.py", "--input", str(phantoms),
                    "--labels", str(phantoms / "labels.csv"), "--output", f"file://{shards}", "--size", "32")
    sockets: set = set()
    status = wait_for(ray_head, job_id, sockets=sockets)
    return SimpleNamespace(job_id=job_id, shards=shards, status=status, sockets=sockets,
                           logs=job_logs(ray_head, job_id))


def test_ingest_job_succeeds(ray_head, ingest_job):
    job_id, shards, sockets, logs = ingest_job.job_id, ingest_job.shards, ingest_job.sockets, ingest_job.logs
    assert ingest_job.status == "SUCCEEDED", logs[-3000:]
    # while the job ran, its driver and workers stayed on loopback too
    assert any("JobSupervisor" in name for *_, name in sockets), sockets  # the job's processes were seen
    assert_loopback_only(sockets)
    assert "[ingest]" in logs
    summaries = [json.loads(line) for line in logs.splitlines()
                 if line.startswith("{") and '"samples"' in line]
    assert summaries and summaries[-1]["samples"] == 20, logs[-3000:]
    assert summaries[-1]["output"] == f"file://{shards}"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["samples"] == 20
    info = ray_head.job_client().get_job_info(job_id)
    assert info.driver_exit_code == 0
    # cluster/runtime_env.yaml was applied, and the salt did not travel with the job (cluster env)
    assert {".venv", "data_shards"} <= set(info.runtime_env["excludes"])
    assert "CXRRAY_SALT" not in info.runtime_env.get("env_vars", {})
    # the shards were built by this cluster's workers (the driver joined RAY_ADDRESS, set by the
    # job supervisor), not by a private local Ray
    from ray.util.state import list_tasks

    tasks = list_tasks(address=ray_head.address, filters=[("job_id", "=", info.job_id)], limit=1000)
    assert any(t.name == "Map(build_shard)" and t.state == "FINISHED" for t in tasks), tasks


def test_failing_job_reports_cli_error(ray_head, phantoms, tmp_path):
    job_id = submit(ray_head, "python", "jobs/ingest.py", "--input", "/nonexistent",
                    "--labels", str(phantoms / "labels.csv"), "--output", f"file://{tmp_path}/shards")
    status = wait_for(ray_head, job_id)
    logs = job_logs(ray_head, job_id)
    assert status == "FAILED", logs
    assert "cxrray ingest: error:" in logs and "/nonexistent" in logs, logs
    assert "Traceback" not in logs  # a clear message, not a crash
    assert "exit code 2" in (ray_head.job_client().get_job_info(job_id).message or "")
    assert not (tmp_path / "shards" / "manifest.json").exists()


def _pretrain_jobs(ray_head, ingest_job, tmp_path, targets: tuple[int, ...]) -> tuple[str, dict]:
    """One pretraining job per target on the ingest job's shards (each continues the same output); last logs."""
    shards, run = ingest_job.shards, tmp_path / "run"
    assert ingest_job.status == "SUCCEEDED", ingest_job.logs[-3000:]
    sets = ["model.image_size=32", "model.base_channels=16", "model.channel_mult=[1,2]", "model.norm_groups=8",
            "model.z_dim=64", "train.global_batch=4", "train.log_every=8", "train.checkpoint_every=8",
            "train.eval_split=null", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    command = ["python", "jobs/pretrain.py", "--data", f"file://{shards}", "--output", f"file://{run}",
               *[a for s in sets for a in ("--set", s)]]
    for images in targets:
        job_id = submit(ray_head, *command, "--images", str(images))
        status = wait_for(ray_head, job_id, timeout=240)
        logs = job_logs(ray_head, job_id)
        assert status == "SUCCEEDED", logs[-3000:]
        assert f"[pretrain] {images}/{images} images" in logs, logs[-3000:]
    return logs, json.loads((run / "latest.json").read_text())


@pytest.mark.slow  # 171-188 s; the default suite was 20:30 on a fresh clone with it. Pretraining on Ray Train +
# DeepSpeed stays in the default suite (tests/test_pretrain.py), and so does `ray job submit` (the ingest job)
def test_pretrain_job_succeeds(ray_head, ingest_job, tmp_path):
    _, latest = _pretrain_jobs(ray_head, ingest_job, tmp_path, (16,))
    assert latest["images_shown"] == 16 and latest["latest_checkpoint"].endswith("checkpoint-000000000016")


@pytest.mark.slow  # ~100 s more; the same continuation path (latest.json) is in the default suite via test_pretrain
def test_pretrain_job_resubmission_continues(ray_head, ingest_job, tmp_path):
    logs, latest = _pretrain_jobs(ray_head, ingest_job, tmp_path, (16, 24))
    assert "resumed at 16 images shown" in logs
    assert latest["images_shown"] == 24 and latest["latest_checkpoint"].endswith("checkpoint-000000000024")


@pytest.mark.slow  # 39 s; keeps the default suite under 20 min (fresh clone: 20:16 with it). The same generation
# runs in the default suite through the CLI on local Ray (tests/test_generate.py, kill-and-rerun included)
def test_generate_job_writes_a_cohort_on_the_cluster(ray_head, tmp_path):
    import torch

    from cxrray.families import get_family
    from cxrray.families.ddpm.config import DDPMConfig
    from conftest import write_checkpoint

    cfg = DDPMConfig(image_size=16, base_channels=8, channel_mult=(1, 2), layers_per_block=1, attention_resolutions=(),
                     norm_groups=8, covariates=("age", "sex", "lvidd"), covariate_stats={"age": (60, 15), "lvidd": (5, 0.5)})
    torch.manual_seed(0)
    ckpt = write_checkpoint(get_family("ddpm").build(cfg), tmp_path / "ckpt", 8)
    spec = tmp_path / "cohort.yaml"
    spec.write_text("n: 6\nseed: 3\ncovariates: {lvidd: {normal: [7.0, 0.2]}}\n")
    out = tmp_path / "synthetic"
    job_id = submit(ray_head, "python", "jobs/generate.py", "--checkpoint", f"file://{ckpt}", "--cohort", str(spec),
                    "--output", f"file://{out}", "--steps", "2", "--set", "generate.shard_samples=2")
    status, logs = wait_for(ray_head, job_id), job_logs(ray_head, job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "[generate] 3/3 units" in logs and "images/s" in logs and "ETA" in logs, logs[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 6 and manifest["splits"]["synthetic"]["images"] == 6
    assert manifest["positives"]["dlv"] == 6  # LVIDd 7.0 +- 0.2 cm: above both sexes' thresholds (5.9 / 5.3)
    from ray.util.state import list_tasks

    info = ray_head.job_client().get_job_info(job_id)
    tasks = list_tasks(address=ray_head.address, filters=[("job_id", "=", info.job_id)], limit=1000)
    assert any("ShardGenerator" in t.name and t.state == "FINISHED" for t in tasks), [t.name for t in tasks]


@pytest.mark.slow  # ~90 s: the same experiment runs in the default suite on local Ray (tests/test_experiment.py)
def test_experiment_job_fits_arms_on_the_cluster(ray_head, tmp_path):
    from test_experiment import write_echo_shards

    real = write_echo_shards(tmp_path / "real", 240, 1, splits=["train", "train", "val", "test", "test"])
    gen = write_echo_shards(tmp_path / "gen", 100, 2, skew=1.0, dataset="synthetic")
    job_id = submit(ray_head, "python", "jobs/experiment.py", "--real", real, "--synthetic", gen,
                    "--output", f"file://{tmp_path}/out", "--arms", "base,base+gen(pos)", "--seeds", "1",
                    "--set", "experiment.epochs=3", "--set", "experiment.width=8", "--set", "experiment.bootstrap=100",
                    "--set", "experiment.paired_bootstrap=100", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    status, logs = wait_for(ray_head, job_id, timeout=240), job_logs(ray_head, job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "[experiment] fits 2/2" in logs and "ETA" in logs, logs[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["fits"]) == {"base/seed0", "base+gen(pos)/seed0"}
    assert metrics["overall"]["findings"]["composite_slvh_dlv"]["base+gen(pos)"]["auroc"]["p_value"] is not None


@pytest.mark.slow  # the same audit runs in the default suite on local Ray (tests/test_synthetic_audit.py)
def test_audit_synthetic_job_flags_copies_on_the_cluster(ray_head, tmp_path):
    from test_experiment import write_echo_shards
    from test_synthetic_audit import training_copies

    real = write_echo_shards(tmp_path / "real", 240, 1, splits=["train", "train", "val", "test", "test"])
    leaky = write_echo_shards(tmp_path / "leaky", 80, 2, skew=1.0, dataset="synthetic", extra=training_copies(real, 10))
    job_id = submit(ray_head, "python", "jobs/audit_synthetic.py", "--synthetic", leaky, "--train", real,
                    "--output", f"file://{tmp_path}/out", "--set", "synthetic_audit.epochs=4",
                    "--set", "synthetic_audit.width=8", "--set", "synthetic_audit.kid_subset=40",
                    "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    status, logs = wait_for(ray_head, job_id, timeout=240), job_logs(ray_head, job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert audit["images"]["synthetic"] == 90 and audit["memorisation"]["pixels"]["flagged"] >= 10
    assert all(p["synthetic"].startswith("copy-") for p in audit["closest_pairs"][:8])
