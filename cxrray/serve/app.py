"""The Serve application: an ingress deployment (FastAPI from `cxrray.serve.api`) bound to the
`Classifier` (batched; only with a probe) and `Explainer` deployments, sized from the config's `serve`
section. Without a probe (a generative family such as ddpm) the app serves generation only.

`build_app(args)` is the builder for `serve run` / `serve deploy` (`import_path:
cxrray.serve.app:build_app`; args: checkpoint, probe, config, overrides); `make_app` is the same from
a loaded `Config`; `run_server` is `cxrray serve`.
"""
from __future__ import annotations

import json
import os
import time

from pydantic import BaseModel
from ray import serve

from cxrray.errors import InputError
from cxrray.config import Config, load_config
from cxrray.serve.api import HandleBackend, create_api
from cxrray.serve.models import Classifier, Explainer, endpoints_for
from cxrray.serve.settings import DeploymentSettings
from cxrray.tracking import tracking_uri


def settings_from(cfg: Config) -> dict:
    """The plain-data settings every deployment gets (no secrets: the API key stays in the environment)."""
    s = cfg.serve
    # MLflow model URIs: tracking.uri, else $MLFLOW_TRACKING_URI in the replicas (not copied into the
    # deployments' arguments: it may hold credentials), else the project's default sqlite file
    mlflow_uri = cfg.tracking.uri or (None if os.environ.get("MLFLOW_TRACKING_URI") else tracking_uri(cfg.tracking))
    return {"api_key_env": s.api_key_env, "max_upload_bytes": s.max_upload_bytes, "max_pixels": s.max_pixels,
            "fit": cfg.ingest.fit, "decode": cfg.ingest.decode.model_dump(mode="json"),
            "explain": cfg.explain.model_dump(mode="json"), "max_steps": s.max_steps,
            "augment": cfg.augment.model_dump(mode="json", include={"direction", "scale", "start_alpha_bar", "steps",
                                                                     "sigma", "seed"}),
            "attribution": cfg.attribution.model_dump(mode="json"),
            "max_invert_steps": s.max_invert_steps, "max_generate": s.max_generate,
            "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
            "tracking_uri": mlflow_uri}


@serve.deployment(name="Ingress")
@serve.ingress()
class Api:
    def __init__(self, classifier, explainer, settings: dict):
        self.backend, self.settings = HandleBackend(classifier, explainer), settings

    def __serve_build_asgi_app__(self):
        return create_api(self.settings, self.backend)


def _options(d: DeploymentSettings) -> dict:
    """Serve `.options(...)` of one deployment from its settings."""
    lo, hi = d.replicas
    return {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                   "target_ongoing_requests": d.target_ongoing_requests,
                                   "look_back_period_s": d.look_back_period_s, "upscale_delay_s": d.upscale_delay_s,
                                   "downscale_delay_s": d.downscale_delay_s},
            "max_queued_requests": d.max_queued_requests,
            "ray_actor_options": {"num_cpus": d.num_cpus, **({"num_gpus": d.num_gpus} if d.num_gpus else {}),
                                  **({"resources": dict(d.resources)} if d.resources else {})}}


def make_app(checkpoint: str, probe: str | None, cfg: Config, guide: str | None = None):
    """The Serve application (ingress bound to the model deployments), sized from `cfg.serve.deployments`;
    `guide`: a noise-aware classifier folder that lets a pixel DDPM answer /v1/attribute (DAug)."""
    s, settings = cfg.serve, {**settings_from(cfg), "guide": guide}
    d = s.deployments
    common = {"graceful_shutdown_wait_loop_s": 0.5,  # drained replicas stop within ~0.5 s, not 2 s
              # only when off: a serve-config file's application logging_config still decides otherwise
              **({} if s.access_log else {"logging_config": {"enable_access_log": False}})}
    classifier = None if not probe else Classifier.options(
        **common, max_ongoing_requests=max(16, 2 * s.max_batch_size), **_options(d["classifier"])
    ).bind(checkpoint, probe, settings)
    explainer = Explainer.options(**common, max_ongoing_requests=2, **_options(d["explainer"])).bind(
        checkpoint, probe, settings)
    return Api.options(**common, max_ongoing_requests=64, **_options(d["ingress"])).bind(classifier, explainer, settings)


class AppArgs(BaseModel):
    checkpoint: str  # checkpoint URI or models:/NAME/VERSION, runs:/RUN_ID/model
    probe: str | None = None  # probe head directory (path, file:// or s3://); none: generation only
    guide: str | None = None  # noise-aware classifier folder: a pixel DDPM then answers /v1/attribute (DAug)
    config: str | None = None  # preset or YAML, as --config
    overrides: list[str] = []  # as --set, e.g. ["serve.max_batch_size=16"]


def build_app(args: dict):
    """Serve application builder (`import_path: cxrray.serve.app:build_app`)."""
    a = AppArgs.model_validate(args if isinstance(args, dict) else dict(args))
    return make_app(a.checkpoint, a.probe, load_config(a.config, a.overrides), a.guide)


def run_server(checkpoint: str, probe: str | None, cfg: Config, guide: str | None = None) -> int:
    """`cxrray serve`: local Ray (or RAY_ADDRESS), Serve's proxy on serve.host:serve.port, until Ctrl-C."""
    import signal
    import sys

    from cxrray.families import get_family
    from cxrray.io.checkpoint import read_state
    from cxrray.models.loading import model_identity
    from cxrray.pipelines.diffchest.head import load_head
    from cxrray.runtime import ensure_ray

    answers = ["classify", "explain"] if probe else ["generate"]  # an MLflow URI: its family is read by the replicas
    if not checkpoint.startswith(("models:/", "runs:/")):
        family = get_family(model_identity(checkpoint)["family"])  # fail here, clearly, rather than in a replica
        if probe:
            family.require("encode")  # a probe reads z
        answers = endpoints_for(family, bool(probe))
        model = read_state(checkpoint)["model"]
        if family.name == "ldm" and model.get("text") and model.get("vae"):  # img2img attribution (the paper's)
            answers = sorted({*answers, "attribute"})
    if probe:
        load_head(probe)
    if guide:  # fail here, clearly: a pixel DDPM and a readable noise-aware classifier
        from cxrray.pipelines.daug.noisy_classifier import load_noisy_classifier

        load_noisy_classifier(guide)
        if not checkpoint.startswith(("models:/", "runs:/")) and model_identity(checkpoint)["family"] != "ddpm":
            raise InputError(f"--classifier guides a pixel DDPM (family ddpm); {checkpoint} is not one")
        answers = sorted({*answers, "attribute"})
    s = cfg.serve
    if s.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(s.api_key_env):
        print(f"cxrray serve: warning: listening on {s.host} without an API key; set {s.api_key_env}", file=sys.stderr)
    ensure_ray()
    serve.start(http_options={"host": s.host, "port": s.port}, proxy_location=s.proxy_location)
    serve.run(make_app(checkpoint, probe, cfg, guide), name="cxrray", route_prefix="/")
    url = f"http://{s.host}:{s.port}"
    print(json.dumps({"url": url, "auth": bool(os.environ.get(s.api_key_env)), "endpoints": [
        "GET /healthz", "GET /docs", "GET /v1/openapi.json", "GET /v1/models"] + [f"POST /v1/{a}" for a in answers]}),
          flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # kubectl/systemd stop, `kill`
    signal.signal(signal.SIGINT, stop)  # Ctrl-C, also when started in the background (SIGINT ignored there)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("cxrray serve: shutting down", file=sys.stderr, flush=True)
        serve.shutdown()
    return 0
