"""Shared fixtures: loopback-only local Ray, a de-identification salt, DICOM construction."""
from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["CXRRAY_SALT"] = "test-salt-not-secret"

# S3 endpoint for every process of the session (Ray workers inherit it): the fault proxy in front
# of moto, both on loopback; started lazily by the `s3` fixture.
from s3_fixture import FaultProxy, free_port  # noqa: E402

MOTO_PORT, PROXY_PORT = free_port(), free_port()
os.environ.update({
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{PROXY_PORT}", "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    "CXRRAY_S3_MAX_ATTEMPTS": "6",
})
for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(var, None)


@pytest.fixture(scope="session")
def s3():
    """moto S3 server + fault proxy on 127.0.0.1; yields the proxy (set `fail_next_puts`)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=MOTO_PORT, verbose=False)
    server.start()
    proxy = FaultProxy(PROXY_PORT, MOTO_PORT).start()
    yield proxy
    proxy.stop()
    server.stop()


def make_bucket(name: str) -> None:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, 2 CPUs, bound to 127.0.0.1."""
    import ray

    from cxrray.runtime import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2, object_store_mb=512)
    yield ray
    ray.shutdown()


def make_dicom(pixels: np.ndarray, path=None, *, photometric="MONOCHROME2", bits_stored=12, **attrs) -> bytes:
    """A minimal valid DICOM (Explicit VR LE) holding `pixels` (uint16 [rows, cols] or [frames, rows, cols])."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "ID0001"
    ds.StudyInstanceUID = generate_uid()
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    import io

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if path is not None:
        with open(path, "wb") as f:
            f.write(data)
    return data


def write_checkpoint(model, folder, images_shown: int):
    """A complete cxrray checkpoint directory (EMA = raw weights) for a model built in a test."""
    import json

    from cxrray.io.checkpoint import save_weights

    folder.mkdir(parents=True)
    save_weights(model, folder / "ema.safetensors")
    save_weights(model, folder / "model.safetensors")
    (folder / "state.json").write_text(json.dumps({"images_shown": images_shown,
                                                   "model": model.cfg.model_dump(mode="json")}))
    (folder / "COMPLETE").write_text(str(images_shown))
    return folder


def kill_cli_when(args: list[str], env: dict, ready, timeout: float, waiting_for: str) -> None:
    """Run `python -m cxrray.cli ARGS` in its own session and SIGKILL its whole process group as soon as
    `ready()` is true; fails if it exits first or `ready()` stays false for `timeout` seconds."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "cxrray.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"{args[0]} exited ({proc.returncode}) before it could be killed"
            assert time.monotonic() < deadline, f"{waiting_for} within {timeout:.0f} s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def cluster():
    """The multi-node test cluster (not the `ray_head` one), defined here so that every module shares one:
    a head (1 CPU) and worker nodes a and b (1 CPU each; custom resources node_a / node_b, and one "trainer"
    slot each, so an elastic training run puts one worker on each). Tests add and kill nodes of their own."""
    from types import SimpleNamespace

    from ray_head import start_head, start_worker

    head = start_head(num_cpus=1, object_store_mb=200)
    nodes = {}
    try:
        for name in ("a", "b"):
            nodes[name] = start_worker(head, num_cpus=1, resources={f"node_{name}": 1, "trainer": 1})
        yield SimpleNamespace(head=head, nodes=nodes)
    finally:
        survivors = [p for node in [*nodes.values(), head] for p in node.stop()]
        assert not survivors, f"processes of the test cluster survived teardown: {survivors}"
