"""The cluster definitions in cluster/: parsed, validated offline with Ray's own validators, and
checked for the facts an operator relies on (scale from zero, 8 GPUs per node, an idle head,
secrets only from the environment / Kubernetes Secrets, the runtime env shipping no venv or data).

Validation used (all offline, no cloud credentials):
- cluster launcher: `ray.autoscaler._private.util.prepare_config` (merges the AWS defaults, as
  `ray up` does before it talks to AWS) + `validate_config` (Ray's ray-schema.json and its
  cross-field checks); every node_config against botocore's EC2 RunInstances model, which is what
  Ray passes it to;
- KubeRay: `_derive_autoscaling_config_from_ray_cr`, the translation Ray's in-tree autoscaler runs
  on a RayCluster CR (it ends in `validate_config`).
A guard fails the test if anything tries to open a connection beyond loopback.
"""
from __future__ import annotations

import copy
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
AWS = CLUSTER / "aws-autoscaler.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob-pretrain.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
SECRET_VARS = {"CXRRAY_SALT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Fail on any connection or name lookup beyond loopback (validation must stay offline)."""
    def _check(host):
        if host not in ("127.0.0.1", "::1", "localhost", None, ""):
            raise AssertionError(f"network access attempted: {host!r}")

    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _check(address[0])
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        _check(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# ---------------------------------------------------------------- all files

@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_every_cluster_yaml_parses(path):
    doc = load(path)
    assert isinstance(doc, dict) and doc


def test_expected_files_present():
    names = {p.name for p in CLUSTER.glob("*.yaml")}
    assert {AWS.name, RAYCLUSTER.name, RAYJOB.name, RUNTIME_ENV.name} <= names


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_no_literal_credentials(path):
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "AWS access key id in file"
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", text)
    assert "BEGIN RSA PRIVATE KEY" not in text and "BEGIN OPENSSH PRIVATE KEY" not in text


def test_runtime_env_ships_code_only():
    env = load(RUNTIME_ENV)
    assert {".venv", "data_shards"} <= set(env["excludes"])
    assert not SECRET_VARS & set(env.get("env_vars", {})), "secrets never travel in a runtime env"


# ---------------------------------------------------------------- AWS cluster launcher

def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_config_passes_ray_validation():
    prepared = _prepared(load(AWS))
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _unknown_top_level_key(c):
    c["max_worker"] = 4                            # typo of max_workers


def _bad_resource_type(c):
    c["available_node_types"]["gpu-a100x8"]["resources"]["GPU"] = "eight"


def _negative_resource(c):
    c["available_node_types"]["cpu-worker"]["resources"]["CPU"] = -1


def _head_type_missing(c):
    c["head_node_type"] = "no-such-type"


def _min_workers_exceed_max(c):
    c["available_node_types"]["gpu-a100x8"]["min_workers"] = c["max_workers"] + 1


def _unknown_auth_key(c):
    c["auth"]["ssh_password"] = "x"


@pytest.mark.parametrize("breaks, message", [
    (_unknown_top_level_key, "'max_worker' was unexpected"),
    (_bad_resource_type, "'eight' is not of type 'integer'"),
    (_negative_resource, "less than the minimum of 0"),
    (_head_type_missing, "head_node_type` must be one of"),
    (_min_workers_exceed_max, "smaller than the sum of `min_workers`"),
    (_unknown_auth_key, "'ssh_password' was unexpected"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_aws_config_broken_copy_fails_validation(breaks, message):
    import jsonschema

    config = load(AWS)
    breaks(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)) as err:
        _prepared(config)
    assert message in str(err.value)


def _run_instances_shape():
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


def _run_instances_errors(node_config: dict) -> str:
    from botocore.validate import ParamValidator

    params = dict(node_config)
    if "SubnetIds" in params:  # Ray's own key: it picks one and passes SubnetId
        params["SubnetId"] = params.pop("SubnetIds")[0]
    report = ParamValidator().validate({**params, "MinCount": 1, "MaxCount": 1}, _run_instances_shape())
    return report.generate_report() if report.has_errors() else ""


def test_aws_node_configs_are_valid_run_instances_requests():
    shape = _run_instances_shape()
    for name, node_type in load(AWS)["available_node_types"].items():
        assert not _run_instances_errors(node_type["node_config"]), name
        assert node_type["node_config"]["InstanceType"] in shape.members["InstanceType"].enum, name
    assert "Unknown parameter" in _run_instances_errors({"InstanceTyp": "p4d.24xlarge"})


def test_aws_node_groups():
    config = load(AWS)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert all("--num-cpus=0" in cmd for cmd in config["head_start_ray_commands"] if "ray start" in cmd)

    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu) == 1
    (gpu,) = gpu
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert gpu["resources"]["GPU"] == 8 and gpu["resources"]["CPU"] == 96
    assert gpu["min_workers"] == 0 and 1 <= gpu["max_workers"] <= 16

    cpu = [t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(cpu) == 1
    (cpu,) = cpu
    assert re.match(r"(m6i|c6i|m7i|c7i)\.", cpu["node_config"]["InstanceType"])
    assert cpu["min_workers"] == 0 and 4 <= cpu["max_workers"] <= 32
    assert cpu["max_workers"] + gpu["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_aws_setup_follows_readme_install():
    config = load(AWS)
    setup = config["setup_commands"]
    pin = next(i for i, c in enumerate(setup) if "torch.__version__" in c and "/tmp/torch.txt" in c)
    project = next(i for i, c in enumerate(setup) if "pip install" in c and "-e ." in c)
    deepspeed = next(i for i, c in enumerate(setup) if "pip install" in c and "deepspeed" in c)
    assert pin < project < deepspeed, "torch pinned first, then the project, then DeepSpeed"
    assert "PIP_CONSTRAINT=/tmp/torch.txt" in setup[project]
    assert "PIP_CONSTRAINT=/tmp/torch.txt" in setup[deepspeed] and "--no-build-isolation" in setup[deepspeed]
    assert not any(re.search(r"pip install[^|&;]*\btorch\b", c) for c in setup), "never let pip pick torch"
    # the project reaches the nodes, without the venv or local data
    (remote, local), = config["file_mounts"].items()
    assert local == "." and remote.rstrip("/").endswith("/cxrray")
    assert set(load(RUNTIME_ENV)["excludes"]) <= set(config["rsync_exclude"])


def test_aws_commands_are_valid_shell():
    config = load(AWS)
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in config.get(key) or []:
            res = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert res.returncode == 0, (key, cmd, res.stderr)


def test_aws_secrets_come_from_the_environment():
    config = load(AWS)
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    text = AWS.read_text()
    # the salt is only ever set from SSM (fetched with the instance profile), and the fetch must
    # succeed before `ray start` runs (no cluster without its salt)
    assert re.findall(r"CXRRAY_SALT=\S*", text) == ['CXRRAY_SALT="'] * 2
    for cmd in (c for c in starts if "ray start" in c):
        assert 'shlex.quote(get("/cxrray/salt"))' in cmd
        fetch, start = cmd.index("/cxrray/salt"), cmd.index("ray start")
        assert fetch < start and '&& eval "$CXRRAY_ENV"' in cmd[fetch:start]
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)\s*[=:]", text), "AWS access: instance profile"
    assert "ssh_private_key:" not in "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))


# ---------------------------------------------------------------- KubeRay

def _derived(ray_cluster_spec: dict, name: str = "cxrray") -> dict:
    """What Ray's in-tree autoscaler makes of this spec (raises if it cannot read it)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
          "metadata": {"name": name, "namespace": "cxrray"}, "spec": copy.deepcopy(ray_cluster_spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)


def _containers(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]["containers"][0]


def _gpu_group(spec: dict) -> dict:
    (group,) = [g for g in spec["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    return group


def _check_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert str(spec["rayVersion"]) == "2.60.0"
    nodes = _derived(spec)["available_node_types"]
    assert nodes["headgroup"]["resources"]["CPU"] == 0 and "GPU" not in nodes["headgroup"]["resources"]

    gpu = _gpu_group(spec)
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 8
    assert gpu["minReplicas"] == 0 and 1 <= gpu["maxReplicas"] <= 16
    assert gpu["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"] == "p4d.24xlarge"
    derived_gpu = nodes[gpu["groupName"]]
    assert derived_gpu["resources"]["GPU"] == 8 and derived_gpu["min_workers"] == 0

    cpu = [g for g in spec["workerGroupSpecs"] if g is not gpu]
    assert len(cpu) == 1 and cpu[0]["minReplicas"] == 0 and 4 <= cpu[0]["maxReplicas"] <= 32
    assert "GPU" not in nodes[cpu[0]["groupName"]]["resources"]

    images = {c["image"] for _, c in _containers(spec)}
    assert len(images) == 1, "head and workers must run the same image"


def _check_secret_env(spec: dict) -> None:
    for group, container in _containers(spec):
        env = {e["name"]: e for e in container.get("env", [])}
        assert "CXRRAY_SALT" in env, f"{group}: drivers and workers need the salt"
        for name in SECRET_VARS & set(env):
            assert "value" not in env[name], f"{group}: literal {name}"
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"], (group, name)


def test_raycluster():
    doc = load(RAYCLUSTER)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"])
    _check_secret_env(doc["spec"])


def test_raycluster_unreadable_copy_fails_ray_translation():
    spec = copy.deepcopy(load(RAYCLUSTER)["spec"])
    container = _gpu_group(spec)["template"]["spec"]["containers"][0]
    del container["resources"]  # no CPU count anywhere: the autoscaler cannot plan this group
    with pytest.raises(ValueError, match="CPU"):
        _derived(spec)


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_secrets_only_via_secret_key_ref(path):
    for node in _walk(load(path)):
        if "name" in node and ("value" in node or "valueFrom" in node):  # a container env entry
            if node["name"] in SECRET_VARS or re.search(r"SECRET|PASSWORD|TOKEN|SALT", str(node["name"])):
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], node


def test_rayjob_pretrain():
    doc = load(RAYJOB)
    spec = doc["spec"]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/pretrain.py"]
    args = dict(zip(argv[2::2], argv[3::2]))
    assert args["--config"] == "paper" and int(args["--images"]) == 200_000_000
    assert args["--data"].startswith("s3://") and args["--output"].startswith("s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    if "rayClusterSpec" in spec:
        _check_cluster_spec(spec["rayClusterSpec"])
        _check_secret_env(spec["rayClusterSpec"])


def test_rayjob_cluster_matches_raycluster():
    job = load(RAYJOB)["spec"]
    if "rayClusterSpec" in job:
        assert job["rayClusterSpec"] == load(RAYCLUSTER)["spec"], "keep the two cluster specs in step"


def test_rayjob_runtime_env_matches_runtime_env_yaml():
    job_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    env = load(RUNTIME_ENV)
    assert job_env["excludes"] == env["excludes"]
    assert job_env["env_vars"] == env["env_vars"]
    assert Path(job_env["working_dir"]).is_absolute()  # the project copy inside the image
    assert not SECRET_VARS & set(job_env["env_vars"])


def test_rayjob_entrypoint_matches_the_cli():
    """Once `cxrray pretrain` exists, the RayJob's arguments must parse with it."""
    from cxrray.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if "pretrain" not in sub.choices or not (REPO / "jobs" / "pretrain.py").exists():
        pytest.skip("cxrray pretrain / jobs/pretrain.py not there yet")
    argv = shlex.split(load(RAYJOB)["spec"]["entrypoint"])
    args = parser.parse_args(["pretrain", *argv[2:]])
    from cxrray.config import load_config

    load_config(args.config, args.overrides)  # the preset it names exists and validates
