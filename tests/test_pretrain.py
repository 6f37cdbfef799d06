"""Pretraining on Ray Train + DeepSpeed: MLflow server, checkpoints, status, resume, worker failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cxrray.cli import main
from cxrray.data.phantom import PhantomConfig, generate
from s3_fixture import free_port

# a 32² model small enough for CPU tests; the schedule is in images shown
TINY32 = ["model.image_size=32", "model.base_channels=16", "model.channel_mult=[1,2]", "model.norm_groups=8",
          "model.z_dim=64", "train.global_batch=8", "train.cpus_per_worker=0.5", "train.log_every=16",
          "train.eval_images=4", "train.sample_steps=4", "train.lr=0.001", "train.ema_decay=0.9"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    generate(96, root / "in", PhantomConfig(size=64, seed=21))
    assert main(["ingest", "--input", str(root / "in"), "--labels", str(root / "in" / "labels.csv"),
                 "--output", str(root / "shards"), "--size", "32", "--set", "ingest.shard_samples=24"]) == 0
    return f"file://{root / 'shards'}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240  # its first start migrates the SQLite schema: slow on a loaded 2-core machine
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            if proc.poll() is not None:  # it exited (e.g. its port was taken): say why, do not wait out the deadline
                pytest.fail(f"mlflow server exited ({proc.returncode}): {(folder / 'server.log').read_text()[-1500:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"mlflow server did not answer /health within 240 s: {(folder / 'server.log').read_text()[-1500:]}")
    yield uri
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine can keep gunicorn's workers busy past 30 s
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    log.close()


def _deepspeed_run(shards: str, out: str, tracking: str) -> list[str]:
    return ["pretrain", "--data", shards, "--output", out, "--images", "96",
            *_sets(TINY32 + ["train.strategy=deepspeed", "train.zero_stage=1", "train.checkpoint_every=32",
                             "train.eval_every=96", f"tracking.uri={tracking}"])]


def test_deepspeed_pretraining_logs_to_mlflow_server(shards, mlflow_server, tmp_path, capfd):
    out = f"file://{tmp_path / 'run'}"
    started = time.time()
    assert main(_deepspeed_run(shards, out, mlflow_server)) == 0
    wall = time.time() - started
    captured = capfd.readouterr()
    logs = captured.out
    assert "[pretrain] 96/96 images" in logs and "recon_ssim" in logs and "ETA 0m00s" in logs
    # each worker line reaches the driver once over both streams (Ray Train's print patch sent it to both)
    both = captured.out + captured.err
    assert both.count("[pretrain] 96/96 images") == 1 and both.count("[pretrain] first step after") == 1, both[-3000:]
    assert "not writable" not in both and "Failed to query Ray Train Controller" not in both

    assert main(["status", "--output", out]) == 0
    status = json.loads(capfd.readouterr().out)
    assert status["images_shown"] == 96 and status["latest_checkpoint"].endswith("checkpoint-000000000096")
    folder = Path(status["latest_checkpoint"][len("file://"):])
    assert {"model.safetensors", "ema.safetensors", "state.json", "COMPLETE", "optimizer-rank0.safetensors",
            "optimizer-rank1.safetensors", "rng-rank1.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl")), "no pickles in checkpoints"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(status["mlflow_run_id"])
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.strategy"] == "deepspeed"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) >= 5 and losses[-1] < losses[0], f"loss must fall on phantoms: {losses}"
    for metric in ("images_per_s", "images_shown", "lr", "recon_ssim", "data_wait_fraction"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    # start-up phases, logged once: the driver's, then rank 0's from fit() to its first optimizer step
    startup = {k: v for k, v in run.data.metrics.items() if k.startswith("startup/")}
    assert set(startup) == {f"startup/{phase}_s" for phase in ("prepare", "ray", "eval_images", "mlflow", "run_setup", "worker_started",
                                                               "model_built", "engine_ready", "first_batch", "first_step")}
    assert all(v >= 0 for v in startup.values()) and 0 < sum(startup.values()) < wall, (startup, wall)
    assert logs.count("[pretrain] driver ready: prepare") == 1 and logs.count("[pretrain] first step after worker_started") == 1
    artifacts = {a.path for folder_ in ("samples", "reconstructions") for a in client.list_artifacts(run.info.run_id, folder_)}
    assert "samples/samples_000000000096.png" in artifacts and "reconstructions/reconstructions_000000000096.png" in artifacts
    versions = client.search_model_versions("name='cxrray-diffae'")
    assert [v.run_id for v in versions] == [run.info.run_id]


@pytest.mark.slow  # ~110 s: resuming is in the default suite through the ddpm family's test below
def test_continuing_with_ddp_carries_the_optimizer_over_and_keeps_the_run(shards, mlflow_server, tmp_path, capfd):
    out = f"file://{tmp_path / 'run'}"
    args = _deepspeed_run(shards, out, mlflow_server)
    assert main(args) == 0
    capfd.readouterr()
    assert main(["status", "--output", out]) == 0
    status = json.loads(capfd.readouterr().out)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)

    # continue the same output to more images with the DDP baseline: weights carry over, the optimizer
    # layout changed (ZeRO partitions -> whole), so its gathered state is spread again; images shown continue
    # from 96, same MLflow run
    assert main([*args[:5], "--images", "128", *_sets(TINY32 + ["train.strategy=ddp", "train.checkpoint_every=32",
                                                   "train.eval_every=1000", f"tracking.uri={mlflow_server}"])]) == 0
    logs = capfd.readouterr().out
    assert "resumed at 96 images shown" in logs
    assert "optimizer state re-partitioned from 2 deepspeed workers (ZeRO 1) to 2 ddp (ZeRO 1): main" in logs
    assert main(["status", "--output", out]) == 0
    status2 = json.loads(capfd.readouterr().out)
    assert status2["images_shown"] == 128 and status2["mlflow_run_id"] == status["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(status["mlflow_run_id"], "images_shown")]
    assert steps == sorted(steps) and steps[-1] == 128


DDPM32 = ["model.family=ddpm", "model.covariates=[age,sex,ivsd,lvidd,lvpwd]", "model.image_size=32",
          "model.base_channels=16", "model.channel_mult=[1,2]", "model.norm_groups=8", "model.layers_per_block=1",
          "train.global_batch=8", "train.cpus_per_worker=0.5", "train.log_every=8", "train.eval_images=4",
          "train.sample_steps=4", "train.lr=0.001", "train.ema_decay=0.9", "train.checkpoint_every=16"]


@pytest.mark.slow  # ~38 s: out of the default suite to keep it under 15 min (fresh clone of a7f8560: 15.2 min); the
# machinery it shares is in the default suite through the deepspeed test above, ddpm's diffusers export through
# test_families, the covariate statistics through test_generate's fixture
def test_second_family_trains_registers_and_exports_through_the_same_machinery(shards, mlflow_server, tmp_path, capfd):
    """The covariate DDPM goes through the same `cxrray pretrain` (Ray Train + DeepSpeed), registers as
    cxrray-ddpm@latest with its card, loads from MLflow and exports to diffusers. (Its resume, with the
    Cheff families', is the slow test below.)"""
    from diffusers import UNet2DModel

    from cxrray.models.loading import load_model

    out = f"file://{tmp_path / 'run'}"
    common = ["pretrain", "--data", shards, "--output", out, *_sets(DDPM32 + [f"tracking.uri={mlflow_server}"])]
    assert main([*common, "--images", "32"]) == 0
    logs = capfd.readouterr().out
    assert "ddpm: deepspeed x2 workers" in logs and "sample_std" in logs
    status = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert status["images_shown"] == 32
    folder = Path(status["latest_checkpoint"][len("file://"):])
    state = json.loads((folder / "state.json").read_text())
    stats = state["model"]["covariate_stats"]  # from the training split, stored with the model
    assert state["model"]["family"] == "ddpm" and set(stats) == {"age", "ivsd", "lvidd", "lvpwd"}
    assert 40 < stats["age"][0] < 80 and 4.0 < stats["lvidd"][0] < 6.0 and state["data"]["samples"] == 96
    corr = state["model"]["covariate_corr"]  # cohorts draw correlated covariates from it
    assert all(corr[a][a] == 1.0 and corr[a][b] == corr[b][a] for a in corr for b in corr)
    assert corr["ivsd"]["lvpwd"] > 0.5  # the phantoms grow both walls from one factor (r ~0.77 without hypertrophy)
    card = (folder / "README.md").read_text()
    assert "cxrray-ddpm" in card and "synthetic" in card and state["data"]["manifest_sha256"] in card

    loaded = load_model("models:/cxrray-ddpm@latest", tracking_uri=mlflow_server)
    assert loaded.family.name == "ddpm" and loaded.identity["name"] == "cxrray-ddpm"
    assert loaded.identity["images_shown"] == 32 and loaded.identity["version"] == "1"
    from mlflow.tracking import MlflowClient

    version = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_model_version("cxrray-ddpm", "1")
    assert version.tags["family"] == "ddpm" and "synthetic" in version.description

    assert main(["export", "--checkpoint", out, "--output", str(tmp_path / "export")]) == 0
    exported = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert exported["family"] == "ddpm" and {"unet", "scheduler"} <= set(exported["folders"])
    unet = UNet2DModel.from_pretrained(tmp_path / "export" / "unet")
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in loaded.model.unet.parameters())


VAE32 = ["model.family=vae", "model.image_size=32", "model.base_channels=16", "model.channel_mult=[1,2,4]",
         "model.norm_groups=8", "model.layers_per_block=1", "model.disc_channels=8", "model.disc_start=2",
         "train.global_batch=8", "train.cpus_per_worker=0.5", "train.log_every=8", "train.eval_images=4",
         "train.lr=0.001", "train.ema_decay=0.9", "train.checkpoint_every=16", "train.strategy=deepspeed",
         "train.zero_stage=1"]


def test_autoencoder_trains_its_discriminator_as_a_second_objective_after_its_warm_up(shards, tmp_path, capfd):
    """Cheff's KL-VAE through the same `cxrray pretrain` (Ray Train + DeepSpeed ZeRO-1, 2 workers): the patch
    discriminator is the task's second objective with its own optimiser (checkpointed per rank), switched on
    at step 2 of 4; the step count and the latent scale live in the weights, so a resumed run (the loop's
    generic path, tested with the other families) keeps its warm-up."""
    import torch
    from safetensors.torch import load_file

    from cxrray.config import load_config
    from cxrray.families import get_family

    out = tmp_path / "run"
    assert main(["pretrain", "--data", shards, "--output", f"file://{out}", "--images", "32",
                 *_sets(VAE32 + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])]) == 0
    logs = capfd.readouterr().out
    assert "vae: deepspeed x2 workers" in logs, logs[-3000:]
    first, last = sorted(out.glob("ray/*/checkpoint-*"))  # at 16 and 32 images (train.checkpoint_every=16)
    weights = {f: load_file(f / "model.safetensors") for f in (first, last)}
    assert float(weights[first]["steps"]) == 2 and float(weights[last]["steps"]) == 4
    assert 0.01 < float(weights[last]["latent_std"]) < 10 and float(weights[last]["latent_std"]) != 1.0
    metrics = json.loads((last / "state.json").read_text())["metrics"]
    assert metrics["loss_discriminator"] > 0 and metrics["reconstruction_psnr"] > 0 and metrics["bicubic_psnr"] > 0
    assert {f"optimizer-discriminator-rank{r}.safetensors" for r in (0, 1)} <= {f.name for f in last.iterdir()}
    # the warm-up: through steps 1-2 the discriminator kept its initial weights; steps 3-4 trained it
    cfg = load_config("tiny", VAE32)
    torch.manual_seed(cfg.train.seed * 1000)  # the seed rank 0 builds the model under (cxrray.train.loop)
    init = get_family("vae").build(cfg.model).state_dict()
    disc = [k for k in init if k.startswith("discriminator.")]
    assert disc and all(torch.equal(weights[first][k], init[k]) for k in disc)
    assert any(not torch.equal(weights[last][k], init[k]) for k in disc)


SR32 = ["model.family=sr", "model.image_size=32", "model.low_size=16", "model.base_channels=16", "model.channel_mult=[1,2]",
        "model.attention_resolutions=[]", "model.norm_groups=8", "model.layers_per_block=1", "train.global_batch=8",
        "train.cpus_per_worker=0.5", "train.log_every=8", "train.eval_images=4", "train.sample_steps=2", "train.lr=0.001",
        "train.ema_decay=0.9", "train.checkpoint_every=16"]


@pytest.mark.slow  # ~60 s per family: two Ray Train runs each
@pytest.mark.parametrize("family, sets", [("ddpm", DDPM32), ("vae", VAE32), ("sr", SR32)], ids=["ddpm", "vae", "sr"])
def test_generative_families_resume_through_the_shared_loop(shards, tmp_path, capfd, family, sets):
    """A second `cxrray pretrain` with more images resumes the first from its checkpoint (weights, EMA, every
    objective's optimiser), whatever the family: the loop's one code path. (ldm: tests/test_latents.py.)"""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    common = ["pretrain", "--data", shards, "--output", f"file://{out}", *_sets(sets + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])]
    assert main([*common, "--images", "16"]) == 0
    first = json.loads((out / "latest.json").read_text())["latest_checkpoint"][len("file://"):]
    assert main([*common, "--images", "32"]) == 0
    logs = capfd.readouterr().out
    assert f"{family}: deepspeed x2 workers" in logs and "resumed at 16 images shown" in logs, logs[-3000:]
    status = json.loads((out / "latest.json").read_text())
    assert status["images_shown"] == 32 and status["mlflow_run_id"] in logs
    last = Path(status["latest_checkpoint"][len("file://"):])
    before, after = load_file(Path(first) / "ema.safetensors"), load_file(last / "ema.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)  # trained on


def _kill_a_worker_after_first_checkpoint(status_file: Path, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if status_file.exists() and (json.loads(status_file.read_text()).get("images_shown") or 0) >= 32:
            break
        time.sleep(0.2)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
            proc.kill()
            killed.append(proc.info["pid"])
            return


@pytest.mark.slow  # 220 s: moved out of the default suite to keep it under 20 min when the ddpm family joined
def test_killed_worker_resumes_from_last_checkpoint_and_partial_checkpoint_is_ignored(shards, tmp_path, capfd):
    run = tmp_path / "run"
    common = ["--data", shards, "--output", f"file://{run}",
              *_sets(TINY32 + ["train.zero_stage=2", "train.checkpoint_every=32", "train.eval_every=100000",
                               "train.max_failures=2"])]
    killed: list = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(run / "latest.json", killed))
    killer.start()
    assert main(["pretrain", "--images", "160", *common]) == 0
    killer.join()
    logs = capfd.readouterr().out
    assert killed, "no Ray Train worker was found to kill"
    resumed = [int(line.split("resumed at ")[1].split()[0].replace(",", "")) for line in logs.splitlines()
               if "resumed at" in line]
    assert resumed and resumed[0] >= 32 and resumed[0] % 32 == 0, logs
    status = json.loads((run / "latest.json").read_text())
    assert status["images_shown"] == 160, "the target is reached exactly once, not overshot"

    # a checkpoint directory that was never completed (no state.json / COMPLETE, not registered by Ray)
    partial = Path(status["latest_checkpoint"][len("file://"):]).parent / "checkpoint-000000999999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"torn write")
    assert main(["pretrain", "--images", "192", *common]) == 0
    logs = capfd.readouterr().out
    assert "resumed at 160 images shown" in logs
    final = json.loads((run / "latest.json").read_text())
    assert final["images_shown"] == 192 and "999999" not in final["latest_checkpoint"]


def test_a_run_is_continued_only_with_the_model_it_started(shards, tmp_path, capsys):
    """Continuing an output whose checkpoint was trained as another model (here v -> eps) is refused before
    Ray starts, naming what changed; the same model passes the check."""
    from conftest import write_checkpoint

    from cxrray.config import load_config
    from cxrray.families import get_family
    from cxrray.errors import InputError
    from cxrray.train.pretrain import LATEST, _refuse_another_model

    cfg = load_config("tiny", TINY32)
    model = get_family("diffae").build(cfg.model)
    checkpoint = write_checkpoint(model, tmp_path / "run" / "checkpoint-000000000032", 32)
    (tmp_path / "run" / LATEST).write_text(json.dumps({"images_shown": 32, "latest_checkpoint": f"file://{checkpoint}"}))
    assert main(["pretrain", "--data", shards, "--output", f"file://{tmp_path / 'run'}", "--images", "64",
                 *_sets(TINY32 + ["model.prediction_type=epsilon"])]) == 2
    err = capsys.readouterr().err
    assert "model.prediction_type: 'v_prediction' -> 'epsilon'" in err and "new --output" in err, err
    # a finished run of another model is not "nothing to do" for this one
    assert main(["pretrain", "--data", shards, "--output", f"file://{tmp_path / 'run'}", "--images", "32",
                 *_sets(TINY32 + ["model.prediction_type=epsilon"])]) == 2
    assert "model.prediction_type" in capsys.readouterr().err
    _refuse_another_model(f"file://{checkpoint}", cfg.model, "file://unused")  # the same model: no error
    # how a run starts and samples may change (the SR fine-tune's init_from, its sampling start); what it trains not
    sr = get_family("sr").config(image_size=32, low_size=16, init_from="file:///a/base", sample_start=0.5)
    (tmp_path / "sr").mkdir()
    (tmp_path / "sr" / "state.json").write_text(json.dumps({"images_shown": 8, "model": sr.model_dump(mode="json")}))
    (tmp_path / "sr" / "COMPLETE").write_text("8")
    _refuse_another_model(f"file://{tmp_path / 'sr'}", sr.model_copy(update={"init_from": "file:///b/base",
                                                                             "sample_start": 1.0}), "file://unused")
    with pytest.raises(InputError, match="model.timesteps"):
        _refuse_another_model(f"file://{tmp_path / 'sr'}", sr.model_copy(update={"timesteps": 1000}), "file://unused")
