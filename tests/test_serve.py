"""The Ray Serve application (cxrray.serve) over HTTP: every endpoint and error class with status and
body, the service healthy after each error, classify equal to model + head called directly on the
ingest-preprocessed image, provenance of synthetic PNG/DICOM outputs, API-key auth on (Serve) and
off (the same FastAPI app in process), no patient identifier in any response or Serve/Ray log, a
bounded mixed concurrent load with zero 5xx, an MLflow registry URI, and the serve/RayService YAML
validated by Ray's own schema.

Serve runs on the session's local Ray (`ray_local`) with its HTTP proxy on 127.0.0.1:<free port>; the
model is a seeded random-init 32² DiffAE and explain/generate run 3-4 DDIM steps.
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import requests
import torch
import yaml
from PIL import Image

from conftest import make_dicom, write_checkpoint
from test_cluster import _walk
from s3_fixture import free_port

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "cluster" / "serve-config.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay-rayservice.yaml"
KEY_ENV = "CXRRAY_TEST_SERVE_KEY"
API_KEY = "serve-test-key-" + os.urandom(8).hex()
# Set at import (collection), before the session's Ray starts: Ray's processes, so the ingress
# replica, inherit it, as pods inherit it from a Kubernetes Secret.
os.environ[KEY_ENV] = API_KEY
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SECRETS = ("ZZQXSERVE^SECRETNAME", "ZZQXSERVE", "SECRETNAME", "PIDZZQX7781", "ZZQXFILE7781")
FILENAME = "ZZQXFILE7781.dcm"
FINDINGS = ["effusion", "cardiomegaly", "nodule", "rare"]  # "rare": not fitted (NaN bias)
UPLOAD_LIMIT, PIXEL_LIMIT = 200_000, 1_000_000
SETS = [f"serve.max_upload_bytes={UPLOAD_LIMIT}", f"serve.max_pixels={PIXEL_LIMIT}", "serve.max_steps=4",
        "serve.max_invert_steps=4", "serve.max_generate=2", f"serve.api_key_env={KEY_ENV}", "explain.steps=3",
        "explain.invert_steps=3", "serve.deployments.ingress.num_cpus=0.1", "serve.deployments.classifier.num_cpus=0.25",
        "serve.deployments.explainer.num_cpus=0.25", "serve.deployments.ingress.replicas=[1,1]",
        "serve.deployments.classifier.replicas=[1,1]",
        "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.01"]
RESPONSES: list[str] = []  # every response body of the module, checked for identifiers at the end


# ---------------------------------------------------------------- artifacts

def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("serve"))


def make_artifacts(root) -> SimpleNamespace:
    """A tiny DiffAE checkpoint, a probe head on its codes and three uploads (DICOM with identifiers, PNG, JPEG)
    under `root`."""
    from cxrray.families.diffae.network import DiffAE, DiffAEConfig
    from cxrray.pipelines.diffchest.head import LinearHead

    mcfg = DiffAEConfig(image_size=32, base_channels=32, channel_mult=(1, 2), layers_per_block=1,
                        attention_resolutions=(16,), z_dim=64)
    torch.manual_seed(0)
    model = DiffAE(mcfg).eval()
    ckpt = write_checkpoint(model, root / "ckpt", 1234)
    with torch.no_grad():
        z = model.encode(torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).numpy()
    rng = np.random.default_rng(0)
    weight = (rng.normal(size=(4, 64)) / 8).astype(np.float32)
    head = LinearHead(FINDINGS, weight, np.array([0.1, -0.3, 0.2, np.nan], np.float32), z.mean(0), z.std(0) + 1e-3,
                      pattern=weight)  # pattern = weight: the pattern of a probe on whitened codes
    head.save(root / "probe")

    yy, xx = np.mgrid[0:80, 0:64]
    dicom = make_dicom(((xx * 37 + yy * 11) % 4096).astype(np.uint16), PatientName=SECRETS[0], PatientID=SECRETS[3],
                       OtherPatientIDs=SECRETS[4])
    yy, xx = np.mgrid[0:48, 0:40]
    png = _png(((np.sin(xx / 5.0) + np.cos(yy / 7.0)) * 60 + 128).astype(np.uint8))
    jpeg_buf = io.BytesIO()
    Image.fromarray(((xx * 5 + yy * 3) % 256).astype(np.uint8)).save(jpeg_buf, format="JPEG", quality=95)
    return SimpleNamespace(ckpt=ckpt, probe=root / "probe", model=model, head=head, root=root,
                           images={"dicom": dicom, "png": png, "jpeg": jpeg_buf.getvalue()})


def preprocess(data: bytes) -> np.ndarray:
    """What ingest + training do to a file: decode, fit to the model's square, PNG-16, [-1, 1]."""
    from cxrray.config import DecodeConfig
    from cxrray.data.dicom import decode_file
    from cxrray.data.imaging import decode_png16, encode_png16, fit_square, png16_to_model

    return png16_to_model(decode_png16(encode_png16(fit_square(decode_file(data, DecodeConfig()).pixels, 32, "pad"))))


def direct_probabilities(art, data: bytes) -> dict[str, float]:
    with torch.no_grad():
        p = art.head.probabilities(art.model.encode(torch.from_numpy(preprocess(data))[None, None]).float())[0]
    return {f: float(p[i]) for i, f in enumerate(FINDINGS) if f != "rare"}


# ---------------------------------------------------------------- server

@pytest.fixture(scope="module")
def server(ray_local, artifacts):
    from ray import serve

    from cxrray.config import load_config
    from cxrray.serve.app import make_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(str(artifacts.ckpt), str(artifacts.probe), load_config("tiny", SETS)),
              name="cxrray", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(base + "/healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("Serve app did not answer /healthz within 60 s")
    yield SimpleNamespace(base=base, port=port)
    serve.shutdown()


def call(srv, method: str, path: str, auth: bool = True, **kwargs) -> requests.Response:
    headers = {**(AUTH if auth else {}), **kwargs.pop("headers", {})}
    r = requests.request(method, srv.base + path, headers=headers, timeout=120, **kwargs)
    RESPONSES.append(r.text)
    return r


def upload(data: bytes, ctype: str = "application/octet-stream") -> dict:
    return {"file": (FILENAME, data, ctype)}


def assert_healthy(srv, art) -> None:
    assert call(srv, "GET", "/healthz", auth=False).status_code == 200
    r = call(srv, "POST", "/v1/classify", files=upload(art.images["png"], "image/png"))
    assert r.status_code == 200, r.text


def png_provenance(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return img.text["cxrray:provenance"]


def assert_synthetic(text: str) -> None:
    assert text.startswith("SYNTHETIC") and "not an acquired radiograph" in text
    assert "cxrray-diffae" in text and "1234-images" in text


# ---------------------------------------------------------------- endpoints

def test_proxy_listens_on_loopback_only(server):
    import psutil

    bound = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port}
    assert bound == {"127.0.0.1"}, bound


def test_healthz_and_models(server):
    r = call(server, "GET", "/healthz", auth=False)
    assert r.status_code == 200 and r.json() == {"status": "ok", "model": {"name": "cxrray-diffae", "version": "1234-images"}}
    body = call(server, "GET", "/v1/models").json()
    assert body["models"][0] | {"cxrray": None} == {"name": "cxrray-diffae", "family": "diffae", "version": "1234-images",
                                                   "images_shown": 1234, "z_dim": 64, "image_size": 32, "cxrray": None,
                                                   "capabilities": ["counterfactual", "encode", "invert", "sample"]}
    assert body["findings"] == FINDINGS[:3] and body["unfitted"] == ["rare"]
    assert body["limits"]["max_steps"] == 4 and body["limits"]["max_upload_bytes"] == UPLOAD_LIMIT
    assert body["explain_defaults"] == {"eps": 1.0, "steps": 3, "invert_steps": 3, "mode": "linear",  # tiny preset
                                        "axis": "pattern"}


@pytest.mark.parametrize("kind,ctype", [("dicom", "application/dicom"), ("png", "image/png"), ("jpeg", "image/jpeg")])
def test_classify_equals_model_and_head_called_directly(server, artifacts, kind, ctype):
    r = call(server, "POST", "/v1/classify", files=upload(artifacts.images[kind], ctype))
    assert r.status_code == 200, r.text
    body = r.json()
    expected = direct_probabilities(artifacts, artifacts.images[kind])
    assert body["findings"] == list(expected) and body["model"] == {"name": "cxrray-diffae", "version": "1234-images"}
    for finding, p in expected.items():
        assert abs(body["probabilities"][finding] - p) <= 1e-5, (finding, body["probabilities"][finding], p)


def test_a_refused_upload_in_a_classify_batch_costs_only_its_own_answer(artifacts):
    """The batched replica decodes uploads itself: a batch [good, garbage, good, too large] answers each in
    order, the good ones exactly as called directly, the bad ones with the status and code the ingress returns."""
    from cxrray.config import DecodeConfig
    from cxrray.serve.models import ModelService

    service = ModelService(str(artifacts.ckpt), str(artifacts.probe))
    big = _png(np.zeros((300, 300), np.uint8))
    answers = service.classify_uploads([artifacts.images["dicom"], b"not an image" * 9, artifacts.images["png"], big],
                                       "pad", DecodeConfig(), max_pixels=200 * 200)
    assert [a.get("status") for a in answers] == [None, 422, None, 413]
    assert answers[1]["error"]["error"] == "invalid_image" and answers[3]["error"]["error"] == "too_many_pixels"
    for answer, kind in ((answers[0], "dicom"), (answers[2], "png")):
        expected = direct_probabilities(artifacts, artifacts.images[kind])
        assert max(abs(answer["probabilities"][f] - p) for f, p in expected.items()) <= 1e-5


def test_an_unexpected_decoder_failure_is_a_422_naming_only_its_type(monkeypatch, artifacts):
    from cxrray.config import DecodeConfig
    from cxrray.serve import uploads

    def fails(*args):
        raise ValueError("PatientName=SECRET header text")

    monkeypatch.setattr(uploads, "prepare_image", fails)
    (err,) = uploads.prepare_uploads([artifacts.images["png"]], 32, "pad", DecodeConfig(), 10**6)
    assert (err.status, err.code) == (422, "invalid_image") and "SECRET" not in err.detail and "ValueError" in err.detail


def test_a_dicom_without_its_preamble_still_has_its_identifiers_found_for_scrubbing(artifacts):
    from cxrray.serve.uploads import _header_facts

    raw = artifacts.images["dicom"]
    assert raw[128:132] == b"DICM"
    pixels, scrub = _header_facts(raw[132:])  # the decoder reads such a file (force=True): so must the scrubber
    assert pixels == 80 * 64 and SECRETS[0] in scrub.names and ("ID", SECRETS[3]) in scrub.other


def test_explain_png_counterfactual_with_provenance(server, artifacts):
    from cxrray.config import ExplainConfig
    from cxrray.data.imaging import decode_png16
    from cxrray.pipelines.diffchest.counterfactual import counterfactuals

    data = artifacts.images["dicom"]
    r = call(server, "POST", "/v1/explain", files=upload(data, "application/dicom"),
             data={"finding": "effusion", "eps": "0.5", "steps": "3", "invert_steps": "2", "direction": "away"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["finding"], body["direction"], body["eps"], body["steps"], body["invert_steps"], body["format"]) == (
        "effusion", "away", 0.5, 3, 2, "png")
    cf = base64.b64decode(body["counterfactual"]["data"])
    assert body["counterfactual"]["media_type"] == "image/png"
    assert_synthetic(png_provenance(cf)) and assert_synthetic(body["provenance"])
    assert "away from 'effusion'" in png_provenance(cf)
    diff = base64.b64decode(body["difference_map"]["data"])
    assert_synthetic(png_provenance(diff))
    with Image.open(io.BytesIO(diff)) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
    assert body["difference_map"]["scale"] > 0
    # the same counterfactual as the pipeline function on the same preprocessed image (PNG-16 quantisation)
    ref = counterfactuals(artifacts.model, artifacts.head, torch.from_numpy(preprocess(data))[None, None], "effusion",
                          ExplainConfig(eps=0.5, steps=3, invert_steps=2), toward=-1)
    got = decode_png16(cf).astype(np.float64) / 65535 * 2 - 1
    assert np.abs(got - ref["counterfactual"][0, 0].numpy()).max() < 1e-4
    before = direct_probabilities(artifacts, data)
    assert all(abs(body["probabilities"]["before"][f] - p) <= 1e-5 for f, p in before.items())
    assert set(body["probabilities"]["after"]) == set(before)


def test_attribute_counterfactual_map_equals_the_attribute_job_and_carries_provenance(server, artifacts):
    """/v1/attribute answers the same map as `cxrray attribute`'s Mapper on the same preprocessed image."""
    from cxrray.attribute.methods import Mapper
    from cxrray.config import Config, ExplainConfig, load_config

    data = artifacts.images["dicom"]
    r = call(server, "POST", "/v1/attribute", files=upload(data, "application/dicom"),
             data={"method": "counterfactual", "finding": "effusion", "steps": "3", "invert_steps": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["method"], body["finding"], body["steps"], body["invert_steps"], body["format"]) == (
        "counterfactual", "effusion", 3, 2, "png")
    raw = base64.b64decode(body["map"]["data"])
    assert_synthetic(png_provenance(raw)) and assert_synthetic(png_provenance(base64.b64decode(body["overlay"]["data"])))
    with Image.open(io.BytesIO(raw)) as img:
        got = np.asarray(img, np.float64) / 65535 * body["map"]["scale"]
    cfg = Config(explain=ExplainConfig(**{**load_config("tiny").explain.model_dump(), "steps": 3, "invert_steps": 2}))
    ref = Mapper("counterfactual", cfg, diffchest=(artifacts.model, artifacts.head)).maps(
        preprocess(data)[None, None], "effusion")[0]
    assert np.abs(got - ref).max() < 1e-3 * max(ref.max(), 1e-6) + 1e-6
    assert 0 <= body["probability"] <= 1 and len(body["peak"]) == 2


@pytest.mark.parametrize("fields,code", [
    ({"method": "gradcam", "finding": "effusion"}, "invalid_field"),  # not this model's: refused, named
    ({"finding": "rare"}, "unknown_finding"),
    ({"method": "reconstruction"}, "missing_field"),
    ({"finding": "effusion", "strength": "0.5"}, "unsupported_field"),
    ({"finding": "effusion", "steps": "999"}, "out_of_range"),
    ({"method": "reconstruction", "finding": "effusion", "invert_steps": "2"}, "unsupported_field"),
])
def test_attribute_refuses_bad_requests_with_a_reason(server, artifacts, fields, code):
    r = call(server, "POST", "/v1/attribute", files=upload(artifacts.images["png"], "image/png"), data=fields)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == code, r.json()


def test_attribute_dicom_overlay_is_derived_rgb_without_the_uploads_identifiers(server, artifacts):
    import pydicom

    data = artifacts.images["dicom"]
    r = call(server, "POST", "/v1/attribute", files=upload(data, "application/dicom"),
             data={"method": "reconstruction", "finding": "effusion", "steps": "2", "format": "dicom"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["overlay"]["media_type"] == "application/dicom" and body["probability"] is not None
    blob = base64.b64decode(body["overlay"]["data"])
    ds = pydicom.dcmread(io.BytesIO(blob))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.PhotometricInterpretation == "RGB"
    source = pydicom.dcmread(io.BytesIO(data))
    for value in (str(source.PatientName), str(source.PatientID), str(source.StudyInstanceUID)):
        assert value.encode() not in blob and value not in r.text


def test_explain_dicom_is_a_derived_synthetic_secondary_capture(server, artifacts):
    from cxrray.config import DecodeConfig
    from cxrray.data.dicom import decode_file

    source = pydicom.dcmread(io.BytesIO(artifacts.images["dicom"]))
    r = call(server, "POST", "/v1/explain", files=upload(artifacts.images["dicom"]),
             data={"finding": "cardiomegaly", "format": "dicom"})
    assert r.status_code == 200, r.text
    assert r.json()["counterfactual"]["media_type"] == "application/dicom"
    raw = base64.b64decode(r.json()["counterfactual"]["data"])
    ds = pydicom.dcmread(io.BytesIO(raw))
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert "SYNTHETIC" in ds.SeriesDescription and "1234-images" in ds.SeriesDescription
    assert_synthetic(ds.DerivationDescription)
    assert str(ds.PatientName) == "" and ds.PatientID == "" and ds.PatientIdentityRemoved == "YES"
    for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert ds.get(uid) and ds.get(uid) != source.get(uid)
    assert not any(s.encode() in raw for s in SECRETS)
    assert decode_file(raw, DecodeConfig()).pixels.shape == (32, 32)  # readable by our own decoder


def test_generate_is_seeded_and_marked_synthetic(server):
    a = call(server, "POST", "/v1/generate", json={"seed": 7, "n": 2, "steps": 3})
    assert a.status_code == 200, a.text
    images = [base64.b64decode(i["data"]) for i in a.json()["images"]]
    assert len(images) == 2 and all(i["media_type"] == "image/png" for i in a.json()["images"])
    for data in images:
        assert_synthetic(png_provenance(data))
        assert "seed 7" in png_provenance(data)
    again = call(server, "POST", "/v1/generate", json={"seed": 7, "n": 2, "steps": 3}).json()
    assert [i["data"] for i in again["images"]] == [i["data"] for i in a.json()["images"]]
    other = call(server, "POST", "/v1/generate", json={"seed": 8, "n": 2, "steps": 3}).json()
    assert other["images"][0]["data"] != a.json()["images"][0]["data"]
    default = call(server, "POST", "/v1/generate", json={"seed": 1}).json()
    assert (default["n"], default["steps"], len(default["images"])) == (1, 3, 1)


# ---------------------------------------------------------------- a generative family (ddpm), no probe

@pytest.fixture(scope="module")
def ddpm_server(server, artifacts):
    """The same application for a covariate-conditioned DDPM checkpoint, served without a probe at /ddpm."""
    from ray import serve

    from cxrray.families.ddpm.network import CovariateDDPM, DDPMConfig

    cfg = DDPMConfig(image_size=32, base_channels=32, channel_mult=(1, 2), layers_per_block=1,
                     attention_resolutions=(16,), covariates=("age", "sex", "ivsd"),
                     covariate_stats={"age": (60.0, 15.0), "ivsd": (1.0, 0.2)})
    torch.manual_seed(0)
    model = CovariateDDPM(cfg).eval()
    ckpt = write_checkpoint(model, artifacts.root / "ddpm-ckpt", 321)
    guide = noisy_classifier(artifacts.root / "noisy-classifier", ["no_finding", "cardiac", "pleural"])
    yield deploy_beside(server, ckpt, "ddpm", guide=guide, model=model)
    serve.delete("cxrray-ddpm")


def noisy_classifier(folder, names: list[str]) -> str:
    """A random-init noise-aware classifier saved as `cxrray evaluate noisy-classifier` saves one."""
    from safetensors.torch import save_file

    from cxrray.pipelines.daug.noisy_classifier import NoisyClassifier

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    net = NoisyClassifier(len(names), width=8)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "noisy_classifier.safetensors"))
    (folder / "noisy_classifier.json").write_text(json.dumps({"super_classes": names, "config": {"width": 8}}))
    return str(folder)


def deploy_beside(server, ckpt, name: str, guide: str | None = None, **extra) -> SimpleNamespace:
    """The application for `ckpt`, without a probe (with a noise-aware classifier to guide a DDPM, if given), on
    the same Serve instance at /<name>, once healthy."""
    from ray import serve

    from cxrray.config import load_config
    from cxrray.serve.app import make_app

    serve.run(make_app(str(ckpt), None, load_config("tiny", SETS), guide), name=f"cxrray-{name}", route_prefix=f"/{name}")
    srv = SimpleNamespace(base=f"{server.base}/{name}", guide=guide, **extra)
    deadline = time.monotonic() + 60
    while call(srv, "GET", "/healthz", auth=False).status_code != 200:
        assert time.monotonic() < deadline, f"the {name} app did not become healthy within 60 s"
        time.sleep(0.2)
    return srv


def test_ddpm_generates_under_validated_covariates(ddpm_server):
    models = call(ddpm_server, "GET", "/v1/models").json()
    assert models["models"][0]["family"] == "ddpm" and models["endpoints"] == ["attribute", "generate"]
    assert models["attribute_methods"] == ["guided"] and {"effusion", "pleural", "cardiomegaly"} <= set(models["findings"])
    assert models["conditions"]["age"] == {"type": "number", "minimum": 0.0, "maximum": 120.0, "unit": "years"}
    assert models["conditions"]["sex"]["enum"] == ["M", "F"]
    body = {"seed": 3, "n": 2, "steps": 3, "conditions": {"age": 71, "sex": "F", "ivsd": 1.4}, "guidance": 2.0}
    a = call(ddpm_server, "POST", "/v1/generate", json=body)
    assert a.status_code == 200, a.text
    assert a.json()["conditions"] == {"age": 71.0, "sex": "F", "ivsd": 1.4} and len(a.json()["images"]) == 2
    text = png_provenance(base64.b64decode(a.json()["images"][0]["data"]))
    assert text.startswith("SYNTHETIC") and "not an acquired radiograph" in text
    assert "cxrray-ddpm" in text and "321-images" in text
    assert "age=71.0" in text and "sex=F" in text and "guidance 2" in text
    again = call(ddpm_server, "POST", "/v1/generate", json=body).json()
    assert [i["data"] for i in again["images"]] == [i["data"] for i in a.json()["images"]]
    older = call(ddpm_server, "POST", "/v1/generate", json={**body, "conditions": {"age": 30, "sex": "F", "ivsd": 1.4}})
    assert older.json()["images"][0]["data"] != a.json()["images"][0]["data"]  # the covariates reach the network
    partial = call(ddpm_server, "POST", "/v1/generate", json={"seed": 3, "conditions": {"sex": "M"}})
    assert partial.status_code == 200 and partial.json()["conditions"] == {"sex": "M"}  # the rest: unobserved


@pytest.mark.parametrize("body, status, code, fragment", [
    ({"seed": 1, "conditions": {"bmi": 30}}, 422, "unknown_condition", "age, sex, ivsd"),
    ({"seed": 1, "conditions": {"age": 130}}, 422, "out_of_range", "age must be in 0..120"),
    ({"seed": 1, "conditions": {"ivsd": "thick"}}, 422, "invalid_field", "ivsd must be a finite number"),
    ({"seed": 1, "conditions": {"sex": "X"}}, 422, "out_of_range", "sex must be one of"),
    ({"seed": 1, "conditions": [71]}, 422, "invalid_field", "JSON object"),
], ids=["unknown", "age-range", "ivsd-type", "sex-enum", "not-object"])
def test_ddpm_generate_rejects_bad_covariates(ddpm_server, body, status, code, fragment):
    r = call(ddpm_server, "POST", "/v1/generate", json=body)
    assert r.status_code == status and r.json()["error"] == code and fragment in r.json()["detail"], r.text


def test_ddpm_service_refuses_what_its_family_cannot_do(ddpm_server, artifacts):
    for path in ("/v1/classify", "/v1/explain"):
        r = call(ddpm_server, "POST", path, files=upload(artifacts.images["png"], "image/png"), data={"finding": "effusion"})
        assert r.status_code == 422 and r.json()["error"] == "not_supported", r.text
        assert "family ddpm" in r.json()["detail"] and "generate, sample" in r.json()["detail"]


def test_a_guided_ddpm_attributes_with_dAugs_translation_as_the_attribute_job_does(ddpm_server, artifacts):
    """/v1/attribute on a DDPM served with a noise-aware classifier: DAug's guided map, the same as the Mapper of
    `cxrray attribute --method guided` on the same preprocessed image and seed, marked derived; what the method
    does not take is refused with a reason."""
    from cxrray.attribute.methods import Mapper
    from cxrray.config import AugmentConfig, Config, load_config
    from cxrray.pipelines.daug.noisy_classifier import load_noisy_classifier

    data = artifacts.images["dicom"]
    r = call(ddpm_server, "POST", "/v1/attribute", files=upload(data, "application/dicom"),
             data={"finding": "effusion", "steps": "4"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["method"], body["finding"], body["steps"], body["invert_steps"]) == ("guided", "effusion", 4, None)
    raw = base64.b64decode(body["map"]["data"])
    text = png_provenance(raw)
    assert text.startswith("SYNTHETIC") and "guided attribution map of 'effusion'" in text and "cxrray-ddpm" in text
    with Image.open(io.BytesIO(raw)) as img:
        got = np.asarray(img, np.float64) / 65535 * body["map"]["scale"]
    cfg = Config(augment=AugmentConfig(**{**load_config("tiny").augment.model_dump(), "steps": 4}))
    ref = Mapper("guided", cfg, guided=(ddpm_server.model, *load_noisy_classifier(ddpm_server.guide))).maps(
        preprocess(data)[None, None], "effusion")[0]
    assert np.abs(got - ref).max() < 2e-3 and abs(ref.max() - 1) < 1e-6
    for fields, code in [({"finding": "effusion", "method": "counterfactual"}, "not_supported"),
                         ({"finding": "pneumothorax"}, "unknown_finding"),
                         ({"finding": "effusion", "invert_steps": "2"}, "unsupported_field"),
                         ({"finding": "effusion", "guidance": "4"}, "unsupported_field")]:
        bad = call(ddpm_server, "POST", "/v1/attribute", files=upload(artifacts.images["png"], "image/png"), data=fields)
        assert bad.status_code == 422 and bad.json()["error"] == code, (fields, bad.text)


# ---------------------------------------------------------------- a report-conditioned latent diffusion model (Cheff)

PROMPT = "Large pleural effusion in the right lower lung. A pacemaker in the left upper chest."


@pytest.fixture(scope="module")
def ldm_server(server, artifacts):
    """The application for a tiny report-conditioned latent diffusion checkpoint, without a probe, at /ldm."""
    from ray import serve

    from cxrray.families import get_family
    from test_families import tiny

    torch.manual_seed(0)
    model = get_family("ldm").build(tiny("ldm")).eval()
    ckpt = write_checkpoint(model, artifacts.root / "ldm-ckpt", 77)
    yield deploy_beside(server, ckpt, "ldm", model=model)
    serve.delete("cxrray-ldm")


def decoded(item: dict) -> torch.Tensor:
    from cxrray.data.imaging import decode_png16, png16_to_model

    return torch.from_numpy(png16_to_model(decode_png16(base64.b64decode(item["data"]))))


def test_latent_diffusion_generates_from_a_report_prompt(ldm_server):
    """/v1/generate {"conditions": {"prompt": ...}}: the family's own images (to PNG-16 precision), seeded."""
    from cxrray.families import GenerateRequest, get_family

    models = call(ldm_server, "GET", "/v1/models").json()
    assert models["endpoints"] == ["attribute", "generate", "inpaint", "outpaint"]
    assert models["conditions"]["prompt"]["type"] == "string" and models["conditions"]["prompt"]["maxLength"] == 2000
    body = {"seed": 5, "n": 2, "steps": 3, "guidance": 2.0, "conditions": {"prompt": PROMPT}}
    r = call(ldm_server, "POST", "/v1/generate", json=body)
    assert r.status_code == 200, r.text
    direct = get_family("ldm").generate(ldm_server.model, GenerateRequest(
        n=2, steps=3, generator=torch.Generator().manual_seed(5), conditions={"prompt": PROMPT}, guidance=2.0))
    got = torch.stack([decoded(i) for i in r.json()["images"]])
    assert torch.allclose(got, direct.images[:, 0].clamp(-1, 1), atol=1e-4)
    assert "report-conditioned latent diffusion" in r.json()["provenance"] and "cxrray-ldm" in r.json()["provenance"]
    other = call(ldm_server, "POST", "/v1/generate", json={**body, "conditions": {"prompt": "No acute findings."}})
    assert other.json()["images"][0]["data"] != r.json()["images"][0]["data"]  # the report reaches the network
    too_long = call(ldm_server, "POST", "/v1/generate", json={**body, "conditions": {"prompt": "x" * 2001}})
    assert too_long.status_code == 422 and too_long.json()["error"] == "out_of_range", too_long.text
    not_text = call(ldm_server, "POST", "/v1/generate", json={**body, "conditions": {"prompt": 5}})
    assert not_text.status_code == 422 and "prompt must be a string" in not_text.json()["detail"]


def test_latent_diffusion_attributes_by_img2img_as_the_attribute_job_does(ldm_server, artifacts):
    """/v1/attribute on a report-conditioned latent diffusion model: the attribution paper's map |image - its
    img2img counterpart toward the healthy prompt| (and the empty-prompt baseline) with the request's strength,
    guidance and steps, the same as `cxrray attribute`'s Mapper on the same preprocessed image and seed, marked
    derived; out-of-range settings and what the method does not take are refused with a reason."""
    from cxrray.attribute.methods import Mapper
    from cxrray.config import AttributionConfig, Config, load_config

    models = call(ldm_server, "GET", "/v1/models").json()
    assert models["attribute_methods"] == ["attribution", "empty_prompt"]
    data = artifacts.images["dicom"]
    maps = {}
    for method in ("attribution", "empty_prompt"):
        r = call(ldm_server, "POST", "/v1/attribute", files=upload(data, "application/dicom"),
                 data={"method": method, "finding": "effusion", "steps": "4", "strength": "0.5", "guidance": "3"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["method"], body["steps"], body["strength"], body["guidance"]) == (method, 4, 0.5, 3.0)
        assert body["prompt"] == load_config("tiny").attribution.prompt and body["probability"] is None
        raw = base64.b64decode(body["map"]["data"])
        text = png_provenance(raw)
        assert text.startswith("SYNTHETIC") and f"{method} attribution map of 'effusion'" in text and "cxrray-ldm" in text
        with Image.open(io.BytesIO(raw)) as img:
            maps[method] = np.asarray(img, np.float64) / 65535 * body["map"]["scale"]
        cfg = Config(attribution=AttributionConfig(**{**load_config("tiny").attribution.model_dump(), "steps": 4,
                                                      "strength": 0.5, "guidance": 3.0}))
        ref = Mapper(method, cfg, ldm=ldm_server.model).maps(preprocess(data)[None, None], "effusion")[0]
        assert np.abs(maps[method] - ref).max() <= 1e-4 * max(ref.max(), 1e-6) + 1e-6
    assert np.abs(maps["attribution"] - maps["empty_prompt"]).max() > 1e-4  # the prompt reaches the counterpart
    default = call(ldm_server, "POST", "/v1/attribute", files=upload(data, "application/dicom"), data={"finding": "effusion"})
    assert default.status_code == 200 and default.json()["method"] == "attribution"
    assert default.json()["strength"] == load_config("tiny").attribution.strength
    for fields, code in [({"finding": "effusion", "strength": "1.5"}, "out_of_range"),
                         ({"finding": "effusion", "guidance": "lots"}, "invalid_field"),
                         ({"finding": "effusion", "invert_steps": "2"}, "unsupported_field"),
                         ({"finding": "Effusion!"}, "invalid_field"),
                         ({"finding": "effusion", "method": "guided"}, "not_supported"),
                         ({"finding": "effusion", "steps": "0"}, "out_of_range")]:
        bad = call(ldm_server, "POST", "/v1/attribute", files=upload(artifacts.images["png"], "image/png"), data=fields)
        assert bad.status_code == 422 and bad.json()["error"] == code, (fields, bad.text)


def paint_upload(art, mask: np.ndarray, **fields) -> dict:
    return {"files": {"file": (FILENAME, art.images["png"], "image/png"), "mask": ("mask.png", _png(mask), "image/png")},
            "data": {"seed": "4", "steps": "3", **fields}}


def test_inpaint_and_outpaint_answer_the_familys_own_images(ldm_server, artifacts):
    """Image + mask upload: the mask follows the image's geometry; inpainting is the family's, outpainting the
    inverted mask; both marked synthetic with what was done."""
    from cxrray.config import load_config
    from cxrray.families import GenerateRequest, get_family
    from cxrray.serve.uploads import prepare_image_and_mask

    mask = np.zeros((48, 40), np.uint8)
    mask[10:30, 5:25] = 255
    cfg = load_config("tiny", SETS)
    image, prepared = prepare_image_and_mask(artifacts.images["png"], _png(mask), 32, cfg.ingest.fit, cfg.ingest.decode,
                                             PIXEL_LIMIT)
    assert 0.1 < prepared.mean() < 0.5 and set(np.unique(prepared)) == {0.0, 1.0}
    x, m = torch.from_numpy(image)[None, None], torch.from_numpy(prepared)[None, None]
    for path, region in (("/v1/inpaint", m), ("/v1/outpaint", 1 - m)):
        r = call(ldm_server, "POST", path, **paint_upload(artifacts, mask, prompt=PROMPT, guidance="2"))
        assert r.status_code == 200, r.text
        assert r.json()["masked"] == pytest.approx(float(prepared.mean()))
        direct = get_family("ldm").inpaint(ldm_server.model, x, region, GenerateRequest(
            n=1, steps=3, generator=torch.Generator().manual_seed(4), conditions={"prompt": PROMPT}, guidance=2.0))
        assert torch.allclose(decoded(r.json()["image"]), direct.images[0, 0].clamp(-1, 1), atol=1e-4), path
        text = png_provenance(base64.b64decode(r.json()["image"]["data"]))
        assert text.startswith("SYNTHETIC") and path.split("/")[-1] + "ed" in text and "cxrray-ldm" in text


@pytest.mark.parametrize("change, status, code, fragment", [
    ({"mask": None}, 422, "missing_file", "`mask`"),
    ({"mask": np.zeros((40, 48), np.uint8)}, 422, "mask_shape", "the mask is 40x48; the image is 48x40"),
    ({"mask_bytes": b"not a png"}, 422, "invalid_mask", "must be a PNG"),
    ({"seed": None}, 422, "missing_field", "seed"),
    ({"steps": "9"}, 422, "out_of_range", "steps must be in 1..4"),
    ({"guidance": "50"}, 422, "out_of_range", "guidance must be in 1..20"),
    ({"prompt": "x" * 2001}, 422, "out_of_range", "prompt is 2001 characters"),
    ({"strength": "0.5"}, 422, "unknown_field", "strength"),
], ids=["no-mask", "mask-shape", "mask-not-png", "no-seed", "steps", "guidance", "prompt-length", "unknown-field"])
def test_inpaint_rejects_bad_requests(ldm_server, artifacts, change, status, code, fragment):
    request = paint_upload(artifacts, np.zeros((48, 40), np.uint8))
    for key, value in change.items():
        if key == "mask":
            request["files"].pop("mask") if value is None else request["files"].update(
                mask=("mask.png", _png(value), "image/png"))
        elif key == "mask_bytes":
            request["files"]["mask"] = ("mask.png", value, "image/png")
        elif value is None:
            request["data"].pop(key)
        else:
            request["data"][key] = value
    r = call(ldm_server, "POST", "/v1/inpaint", **request)
    assert r.status_code == status and r.json()["error"] == code and fragment in r.json()["detail"], r.text
    assert call(ldm_server, "GET", "/healthz", auth=False).status_code == 200


def test_a_model_that_cannot_inpaint_says_so(server, artifacts):
    r = call(server, "POST", "/v1/inpaint", **paint_upload(artifacts, np.zeros((48, 40), np.uint8)))
    assert r.status_code == 422 and r.json()["error"] == "not_supported" and "cannot inpaint" in r.json()["detail"]


# ---------------------------------------------------------------- the cascade's other stages: SR3 and the autoencoder

def test_sr_upscales_and_the_autoencoder_reconstructs_an_upload_as_the_family_does(server, artifacts):
    """/v1/upscale (an SR model: the upload read at its low side, seeded DDIM) and /v1/reconstruct (a VAE:
    D(E(x))) answer the family's own images to PNG-16 precision, marked derived; each refuses what it cannot."""
    from ray import serve

    from cxrray.config import load_config
    from cxrray.families import get_family
    from cxrray.serve.uploads import prepare_image
    from test_families import tiny

    cfg = load_config("tiny", SETS)
    torch.manual_seed(0)
    models = {name: get_family(name).build(tiny(name)).eval() for name in ("sr", "vae")}
    srv = {name: deploy_beside(server, write_checkpoint(m, artifacts.root / f"{name}-ckpt", 55), name)
           for name, m in models.items()}
    try:
        sr_info, vae_info = (call(srv[n], "GET", "/v1/models").json() for n in ("sr", "vae"))
        assert sr_info["endpoints"] == ["upscale"] and vae_info["endpoints"] == ["reconstruct"]
        low = prepare_image(artifacts.images["png"], 16, cfg.ingest.fit, cfg.ingest.decode, PIXEL_LIMIT)
        form = {"files": upload(artifacts.images["png"], "image/png"), "data": {"seed": "6", "steps": "3"}}
        r = call(srv["sr"], "POST", "/v1/upscale", **form)
        assert r.status_code == 200, r.text
        direct = get_family("sr").upscale(models["sr"], torch.from_numpy(low)[None, None], steps=3,
                                          generator=torch.Generator().manual_seed(6))
        assert r.json()["size"] == 32 and torch.allclose(decoded(r.json()["image"]), direct[0, 0].clamp(-1, 1), atol=1e-4)
        assert call(srv["sr"], "POST", "/v1/upscale", **form).json()["image"] == r.json()["image"]  # seeded
        text = png_provenance(base64.b64decode(r.json()["image"]["data"]))
        assert text.startswith("SYNTHETIC") and "upscaled from 16² to 32²" in text and "cxrray-sr" in text
        for data, code, fragment in (({"steps": "3"}, "missing_field", "seed"), ({"seed": "1", "steps": "9"}, "out_of_range",
                                     "steps must be in 1..4"), ({"seed": "1", "prompt": "x"}, "unknown_field", "prompt")):
            bad = call(srv["sr"], "POST", "/v1/upscale", files=upload(artifacts.images["png"], "image/png"), data=data)
            assert bad.status_code == 422 and bad.json()["error"] == code and fragment in bad.json()["detail"], bad.text

        r = call(srv["vae"], "POST", "/v1/reconstruct", files=upload(artifacts.images["dicom"], "application/dicom"))
        assert r.status_code == 200, r.text
        x = torch.from_numpy(preprocess(artifacts.images["dicom"]))[None, None]
        with torch.no_grad():
            assert torch.allclose(decoded(r.json()["image"]), models["vae"](x)[0, 0], atol=1e-4)
        assert "D(E(x))" in r.json()["provenance"] and "cxrray-vae" in r.json()["provenance"]
        for target, path in ((srv["vae"], "/v1/upscale"), (srv["sr"], "/v1/reconstruct"), (server, "/v1/upscale"),
                             (srv["vae"], "/v1/generate")):
            kwargs = {"json": {"seed": 1}} if path == "/v1/generate" else {"files": upload(artifacts.images["png"], "image/png"),
                                                                          "data": {"seed": "1"}}
            no = call(target, "POST", path, **kwargs)
            assert no.status_code == 422 and no.json()["error"] == "not_supported", (path, no.text)
    finally:
        for name in srv:
            serve.delete(f"cxrray-{name}")


# ---------------------------------------------------------------- errors

def _multipart_stream(size: int):
    """A chunked (no Content-Length) multipart body whose file part is `size` bytes."""
    yield b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="x.dcm"\r\n\r\n'
    for _ in range(size // 50_000):
        yield b"\0" * 50_000
    yield b"\r\n--bnd--\r\n"


def _error_request(name: str, art) -> tuple[str, str, dict]:
    dicom, png = art.images["dicom"], art.images["png"]
    big_dicom = make_dicom(np.zeros((8, 8), np.uint16), Rows=1100, Columns=1100)  # header claims 1.21 Mpx
    explain = lambda **fields: ("POST", "/v1/explain", {"files": upload(png), "data": {"finding": "effusion", **fields}})
    generate = lambda body, **kw: ("POST", "/v1/generate", {"json": body, **kw})
    classify = lambda data, ctype="application/octet-stream": ("POST", "/v1/classify", {"files": upload(data, ctype)})
    return {
        "upload_over_content_length": classify(os.urandom(UPLOAD_LIMIT + 70_000)),
        "upload_over_limit_chunked": ("POST", "/v1/classify", {
            "data": _multipart_stream(UPLOAD_LIMIT + 100_000),
            "headers": {"content-type": "multipart/form-data; boundary=bnd"}}),
        "file_over_limit": classify(os.urandom(UPLOAD_LIMIT + 10_000)),
        "png_too_many_pixels": classify(_png(np.zeros((1100, 1000), np.uint8)), "image/png"),
        "dicom_too_many_pixels": classify(big_dicom, "application/dicom"),
        "request_not_multipart": ("POST", "/v1/classify", {"data": b"abc", "headers": {"content-type": "text/plain"}}),
        "file_type_gif": classify(b"GIF89a" + b"\0" * 64, "image/gif"),
        "garbage_bytes": classify(b"this is not an image" * 20),
        "truncated_png": classify(png[:120], "image/png"),
        "blank_png": classify(_png(np.full((40, 40), 7, np.uint8)), "image/png"),
        "colour_png": classify(_png(np.dstack([np.full((40, 40), v, np.uint8) for v in (10, 200, 90)]), "RGB")),
        "tiny_png": classify(_png(np.arange(64, dtype=np.uint8).reshape(8, 8)), "image/png"),
        "truncated_dicom": classify(dicom[: len(dicom) // 2], "application/dicom"),
        "empty_file": classify(b""),
        "missing_file": ("POST", "/v1/explain", {"files": {"finding": (None, "effusion")}}),
        "unknown_form_field": ("POST", "/v1/classify", {"files": {**upload(png), "patient": (None, "x")}}),
        "unknown_finding": explain(finding="pneumothorax"),
        "unfitted_finding": explain(finding="rare"),
        "missing_finding": ("POST", "/v1/explain", {"files": upload(png)}),
        "eps_zero": explain(eps="0"),
        "eps_too_large": explain(eps="10.5"),
        "eps_nan": explain(eps="nan"),
        "eps_not_a_number": explain(eps="lots"),
        "steps_over_max": explain(steps="5"),
        "steps_not_int": explain(steps="2.5"),
        "invert_steps_zero": explain(invert_steps="0"),
        "direction_bad": explain(direction="sideways"),
        "format_bad": explain(format="jpeg"),
        "n_over_max": generate({"seed": 1, "n": 3}),
        "n_zero": generate({"seed": 1, "n": 0}),
        "seed_negative": generate({"seed": -1}),
        "seed_too_large": generate({"seed": 2**63}),
        "seed_float": generate({"seed": 1.5}),
        "seed_bool": generate({"seed": True}),
        "seed_missing": generate({"n": 1}),
        "generate_steps_over_max": generate({"seed": 1, "steps": 9}),
        "generate_unknown_field": generate({"seed": 1, "temperature": 3}),
        "generate_condition_on_diffae": generate({"seed": 1, "conditions": {"age": 50}}),
        "generate_guidance_below_one": generate({"seed": 1, "guidance": 0.5}),
        "generate_not_json": ("POST", "/v1/generate", {"data": b"seed=1", "headers": {"content-type": "text/plain"}}),
        "generate_bad_json": ("POST", "/v1/generate", {"data": b"{seed: 1", "headers": {"content-type": "application/json"}}),
        "generate_json_list": generate([1, 2]),
        "unknown_route": ("GET", "/v1/nothing", {}),
        "wrong_method": ("GET", "/v1/classify", {}),
    }[name]


ERRORS = {  # name: (status, error code, fragment of the detail)
    "upload_over_content_length": (413, "payload_too_large", "limit"),
    "upload_over_limit_chunked": (413, "payload_too_large", "exceeds the limit"),
    "file_over_limit": (413, "payload_too_large", f"limit is {UPLOAD_LIMIT}"),
    "png_too_many_pixels": (413, "too_many_pixels", f"limit is {PIXEL_LIMIT}"),
    "dicom_too_many_pixels": (413, "too_many_pixels", "1210000 pixels"),
    "request_not_multipart": (415, "unsupported_media_type", "multipart/form-data"),
    "file_type_gif": (415, "unsupported_media_type", "image/gif"),
    "garbage_bytes": (422, "invalid_image", "not_dicom"),
    "truncated_png": (422, "invalid_image", "raster_decode_failed"),
    "blank_png": (422, "invalid_image", "blank_image"),
    "colour_png": (422, "invalid_image", "colour_image"),
    "tiny_png": (422, "invalid_image", "absurd_dimensions"),
    "truncated_dicom": (422, "invalid_image", ""),
    "empty_file": (422, "empty_file", "0 bytes"),
    "missing_file": (422, "missing_file", "`file`"),
    "unknown_form_field": (422, "unknown_field", "patient"),
    "unknown_finding": (422, "unknown_finding", "'pneumothorax' is unknown"),
    "unfitted_finding": (422, "unknown_finding", "no fitted probe"),
    "missing_finding": (422, "missing_field", "finding"),
    "eps_zero": (422, "out_of_range", "eps"),
    "eps_too_large": (422, "out_of_range", "eps"),
    "eps_nan": (422, "out_of_range", "eps"),
    "eps_not_a_number": (422, "invalid_field", "eps"),
    "steps_over_max": (422, "out_of_range", "steps must be in 1..4"),
    "steps_not_int": (422, "invalid_field", "steps"),
    "invert_steps_zero": (422, "out_of_range", "invert_steps"),
    "direction_bad": (422, "invalid_field", "toward, away"),
    "format_bad": (422, "invalid_field", "png, dicom"),
    "n_over_max": (422, "out_of_range", "n must be in 1..2"),
    "n_zero": (422, "out_of_range", "n must be in 1..2"),
    "seed_negative": (422, "out_of_range", "seed"),
    "seed_too_large": (422, "out_of_range", "seed"),
    "seed_float": (422, "invalid_field", "seed must be an integer"),
    "seed_bool": (422, "invalid_field", "seed must be an integer"),
    "seed_missing": (422, "missing_field", "seed"),
    "generate_steps_over_max": (422, "out_of_range", "steps"),
    "generate_unknown_field": (422, "unknown_field", "temperature"),
    "generate_condition_on_diffae": (422, "unknown_condition", "unconditional"),
    "generate_guidance_below_one": (422, "out_of_range", "guidance"),
    "generate_not_json": (415, "unsupported_media_type", "JSON"),
    "generate_bad_json": (422, "invalid_json", "not valid JSON"),
    "generate_json_list": (422, "invalid_json", "object"),
    "unknown_route": (404, "not_found", ""),
    "wrong_method": (405, "method_not_allowed", ""),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_are_specific_json_and_leave_the_service_healthy(server, artifacts, name):
    status, code, fragment = ERRORS[name]
    method, path, kwargs = _error_request(name, artifacts)
    r = call(server, method, path, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert body["error"] == code and fragment in body["detail"], (name, body)
    if code == "invalid_image":
        assert body["reason"] and body["detail"].startswith(body["reason"])
    assert_healthy(server, artifacts)


# ---------------------------------------------------------------- auth

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                                     {"Authorization": API_KEY}, {"Authorization": f"Bearer {API_KEY}x"}],
                         ids=["none", "wrong", "basic", "no-scheme", "longer"])
def test_auth_required_on_v1_when_key_set(server, artifacts, headers):
    for method, path, kwargs in [("GET", "/v1/models", {}),
                                 ("POST", "/v1/classify", {"files": upload(artifacts.images["png"])}),
                                 ("POST", "/v1/generate", {"json": {"seed": 1}})]:
        r = call(server, method, path, auth=False, headers=headers, **kwargs)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
    assert call(server, "GET", "/healthz", auth=False, headers=headers).status_code == 200
    assert call(server, "GET", "/v1/openapi.json", auth=False, headers=headers).status_code == 200  # the schema is public
    assert call(server, "GET", "/v1/models").status_code == 200


def test_openapi_schema_describes_the_request_bodies_and_docs_page_is_open(server):
    schema = call(server, "GET", "/v1/openapi.json", auth=False).json()
    explain = schema["paths"]["/v1/explain"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert explain["required"] == ["file", "finding"] and explain["properties"]["file"]["format"] == "binary"
    assert explain["properties"]["direction"]["enum"] == ["toward", "away"]
    classify = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert classify["required"] == ["file"]
    generate = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert generate["required"] == ["seed"] and {"seed", "n", "steps", "conditions", "guidance"} <= set(generate["properties"])
    docs = call(server, "GET", "/docs", auth=False)
    assert docs.status_code == 200 and "/v1/openapi.json" in docs.text


@pytest.fixture
def in_process(artifacts):
    """The same FastAPI app over a local ModelService, on uvicorn at 127.0.0.1 in a thread (no Serve)."""
    import uvicorn

    from cxrray.config import load_config
    from cxrray.serve.api import LocalBackend, create_api
    from cxrray.serve.app import settings_from
    from cxrray.serve.models import ModelService

    service = ModelService(str(artifacts.ckpt), str(artifacts.probe))
    servers = []

    def start(key_env: str):
        settings = settings_from(load_config("tiny", SETS + [f"serve.api_key_env={key_env}"]))
        port = free_port()
        srv = uvicorn.Server(uvicorn.Config(create_api(settings, LocalBackend(service, settings)), host="127.0.0.1", port=port,
                                            log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        servers.append((srv, thread))
        return SimpleNamespace(base=f"http://127.0.0.1:{port}")

    yield start
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(timeout=10)


def test_auth_off_when_key_env_unset_and_on_when_set(in_process, artifacts, monkeypatch):
    monkeypatch.delenv("CXRRAY_TEST_UNSET_KEY", raising=False)
    open_srv = in_process("CXRRAY_TEST_UNSET_KEY")
    r = call(open_srv, "POST", "/v1/classify", auth=False, files=upload(artifacts.images["dicom"]))
    assert r.status_code == 200
    assert r.json()["probabilities"] == pytest.approx(direct_probabilities(artifacts, artifacts.images["dicom"]), abs=1e-5)
    monkeypatch.setenv("CXRRAY_TEST_LOCAL_KEY", "local-key")
    closed = in_process("CXRRAY_TEST_LOCAL_KEY")
    assert call(closed, "GET", "/v1/models", auth=False).status_code == 401
    assert call(closed, "GET", "/v1/models", auth=False, headers={"Authorization": "Bearer local-key"}).status_code == 200
    assert call(closed, "GET", "/healthz", auth=False).status_code == 200


# ---------------------------------------------------------------- load

def test_bounded_concurrent_mixed_load_has_no_5xx(server, artifacts):
    """200 requests, 16 at a time: valid classify (DICOM/PNG), invalid uploads, unauthenticated calls,
    unknown findings and a few real explains; every answer as expected, valid ones exact."""
    from ray import serve

    expected = {k: direct_probabilities(artifacts, artifacts.images[k]) for k in ("dicom", "png")}
    local = threading.local()

    def one(i: int):
        s = getattr(local, "session", None) or requests.Session()
        local.session = s
        kind = ("dicom", "png")[i % 2]
        if i % 50 == 7:
            req, want = ("POST", "/v1/explain", {"files": upload(artifacts.images["png"]),
                                                  "data": {"finding": "nodule", "steps": "2", "invert_steps": "2"}}), 200
        elif i % 10 < 6:
            req, want = ("POST", "/v1/classify", {"files": upload(artifacts.images[kind])}), 200
        elif i % 10 == 6:
            req, want = ("POST", "/v1/classify", {"files": upload(b"\x89PNG\r\n\x1a\n" + os.urandom(200))}), 422
        elif i % 10 == 7:
            req, want = ("POST", "/v1/classify", {"files": upload(b"x" * 10, "text/plain")}), 415
        elif i % 10 == 8:
            req, want = ("GET", "/v1/models", {"headers": {"Authorization": "Bearer nope"}}), 401
        else:
            req, want = ("POST", "/v1/explain", {"files": upload(artifacts.images["png"]), "data": {"finding": "x"}}), 422
        method, path, kwargs = req
        headers = {**AUTH, **kwargs.pop("headers", {})}
        r = s.request(method, server.base + path, headers=headers, timeout=120, **kwargs)
        return i, kind, path, want, r.status_code, r.text

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    elapsed = time.monotonic() - start
    RESPONSES.extend(text for *_, text in results)
    assert not [r for r in results if r[4] >= 500], [r[:5] for r in results if r[4] >= 500]
    wrong = [r[:5] for r in results if r[4] != r[3]]
    assert not wrong, wrong
    for i, kind, path, _, status, text in results:
        if path == "/v1/classify" and status == 200:
            got = json.loads(text)["probabilities"]
            assert all(abs(got[f] - p) <= 1e-5 for f, p in expected[kind].items()), (i, got, expected[kind])
    sizes = serve.get_deployment_handle("Classifier", app_name="cxrray").stats.remote().result()["batch_sizes"]
    assert max(int(k) for k in sizes) > 1, sizes  # dynamic batching happened under concurrency
    assert elapsed < 60
    assert_healthy(server, artifacts)


# ---------------------------------------------------------------- privacy

def test_no_identifier_in_any_response_or_serve_log(server, artifacts):
    """After everything above (DICOM uploads carrying distinctive PatientName / PatientID / OtherPatientIDs,
    file name FILENAME): none of them in any response body (base64 payloads decoded) or any log file."""
    import ray

    def decoded(text: str):
        yield text
        try:
            body = json.loads(text)
        except ValueError:
            return
        for node in _walk(body):
            if isinstance(node, dict) and isinstance(node.get("data"), str):
                yield base64.b64decode(node["data"]).decode("latin-1")

    dicom = artifacts.images["dicom"]
    for method, path, kwargs in [  # the DICOM through every path here too, so the test stands alone
            ("POST", "/v1/classify", {"files": upload(dicom, "application/dicom")}),
            ("POST", "/v1/explain", {"files": upload(dicom), "data": {"finding": "nodule", "format": "dicom"}}),
            ("POST", "/v1/classify", {"files": upload(dicom[:-300])}),  # truncated pixel data: a 422
            ("POST", "/v1/explain", {"files": upload(dicom), "data": {"finding": "nope"}})]:
        assert call(server, method, path, **kwargs).status_code in (200, 422)
    for text in RESPONSES:
        for part in decoded(text):
            assert not any(s in part for s in SECRETS), part[:300]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("serve" in p.parts for p in files), "no Serve logs found to check"
    for path in files:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in SECRETS), path


# ---------------------------------------------------------------- MLflow

def test_mlflow_registry_uri_loads_the_registered_ema(artifacts, tmp_path, monkeypatch):
    """`models:/NAME/VERSION` and `runs:/ID/model` give the same weights as the checkpoint (local sqlite registry)."""
    from mlflow.tracking import MlflowClient

    from cxrray.config import load_config
    from cxrray.serve.models import ModelService
    from cxrray.train.registry import register_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    cfg = load_config("tiny", ["tracking.registered_model=cxrray-serve-test"])
    version = register_model(cfg, str(artifacts.ckpt), SimpleNamespace(uri=uri, run_id=run_id))
    assert version == "1"
    reference = artifacts.model.state_dict()
    for model_uri, name, ver in [("models:/cxrray-serve-test/1", "cxrray-serve-test", "1"),
                                 (f"runs:/{run_id}/model", "cxrray-diffae", f"run-{run_id}")]:
        service = ModelService(model_uri, str(artifacts.probe), tracking_uri=uri, device="cpu")
        model, identity = service.model, service.identity
        assert (identity["name"], identity["version"], identity["images_shown"], identity["image_size"]) == (
            name, ver, 1234, 32)
        state = model.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


# ---------------------------------------------------------------- deployment files

def test_serve_config_passes_rays_schema_and_builds(tmp_path):
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    from cxrray.serve.app import build_app

    doc = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "cxrray.serve.app:build_app" and app.route_prefix == "/"
    assert schema.http_options.port == 8000
    built = build_app(app.args)  # the builder accepts the file's args (config + overrides validate)
    names = {d["name"] for d in doc["applications"][0]["deployments"]}
    bound = set()
    node = built._bound_deployment
    bound.add(node.name)
    bound.update(a._bound_deployment.name for a in node.init_args if hasattr(a, "_bound_deployment"))
    assert names == bound == {"Ingress", "Classifier", "Explainer"}
    for dep in doc["applications"][0]["deployments"]:
        assert set(dep) <= set(DeploymentSchema.model_fields), dep  # the schema allows extras: catch typos
        auto = dep["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"] and auto["target_ongoing_requests"] > 0
        assert dep["ray_actor_options"]["num_cpus"] > 0
        if dep["name"] != "Ingress":
            assert 0 < dep["ray_actor_options"]["num_gpus"] < 1  # fractional: replicas share a GPU
    assert "api_key" not in SERVE_CONFIG.read_text().lower().replace("cxrray_api_key", "")


def test_rayservice_embeds_the_serve_config_and_keeps_secrets_in_secrets():
    from test_cluster import _derived

    doc = yaml.safe_load(RAYSERVICE.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    spec = doc["spec"]
    assert yaml.safe_load(spec["serveConfigV2"]) == yaml.safe_load(SERVE_CONFIG.read_text())
    cluster = spec["rayClusterConfig"]
    assert str(cluster["rayVersion"]) == "2.60.0"
    nodes = _derived(cluster, "cxrray-serve")["available_node_types"]  # Ray's own reading of the spec
    assert nodes["headgroup"]["resources"]["CPU"] == 0
    assert [n for n, t in nodes.items() if t["resources"].get("GPU") == 1]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]
    containers = [head] + [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    assert len({c["image"] for c in containers}) == 1 and "REPLACE_ME" in head["image"]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["CXRRAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "cxrray-secrets"
        for name, entry in env.items():
            if any(word in name for word in ("KEY", "SECRET", "TOKEN", "PASSWORD", "URI")):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], name


# ---------------------------------------------------------------- units

def test_overload_is_a_json_503_and_replica_ranges_are_checked():
    import asyncio

    from ray.serve.exceptions import BackPressureError

    from cxrray.config import ConfigError, load_config
    from cxrray.serve.api import _call
    from cxrray.serve.uploads import ApiError

    async def overloaded():
        raise BackPressureError(num_queued_requests=33, max_queued_requests=32)

    with pytest.raises(ApiError) as err:
        asyncio.run(_call(overloaded))
    assert err.value.status == 503 and err.value.body()["error"] == "overloaded"
    # a replica lost with its node: retried once on another; lost twice, a 503 that says so
    from ray.exceptions import ActorDiedError

    calls = []

    async def lost_then_answered():
        calls.append(1)
        if len(calls) == 1:
            raise ActorDiedError()
        return {"ok": 1}

    assert asyncio.run(_call(lost_then_answered)) == {"ok": 1} and len(calls) == 2

    async def lost():
        calls.append(1)
        raise ActorDiedError()

    calls.clear()
    with pytest.raises(ApiError) as err:
        asyncio.run(_call(lost))
    assert err.value.status == 503 and err.value.body()["error"] == "unavailable" and len(calls) == 2
    # custom resources and the autoscaler's pace reach Serve's options
    from cxrray.serve.app import _options

    cfg = load_config("tiny", ['serve.deployments.classifier.resources={"serve_node": 1}',
                               "serve.deployments.classifier.upscale_delay_s=1", "serve.proxy_location=HeadOnly"])
    options = _options(cfg.serve.deployments["classifier"])
    assert options["ray_actor_options"]["resources"] == {"serve_node": 1.0}
    assert options["autoscaling_config"]["upscale_delay_s"] == 1 and options["autoscaling_config"]["downscale_delay_s"] == 600
    assert cfg.serve.proxy_location == "HeadOnly"
    with pytest.raises(ConfigError, match="replicas must be"):
        load_config("tiny", ["serve.deployments.classifier.replicas=[3,1]"])
    with pytest.raises(ConfigError, match="unknown deployment"):
        load_config("tiny", ["serve.deployments.classifer.num_cpus=1"])
    cfg = load_config("tiny", ["serve.deployments.classifier.num_gpus=0.25"])
    assert cfg.serve.deployments["classifier"].num_gpus == 0.25 and cfg.serve.deployments["classifier"].num_cpus == 0.5
    assert cfg.serve.deployments["explainer"].max_queued_requests == 32  # the others keep their defaults
