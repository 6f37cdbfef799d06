"""The `serve` config section: request limits, dynamic batching and the deployments, as a mapping of
deployment name -> its settings (replicas, resources, queue). Torch- and Ray-free typed data owned by
`cxrray.serve`; `cxrray.config` composes it. Override one with e.g.
`--set serve.deployments.classifier.num_gpus=0.25`."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cxrray.data.settings import StrictModel

#: the application's deployments: ingress (HTTP, upload checks; decodes the uploads of the unbatched
#: endpoints), classifier (decodes its uploads, encoder + probe, batched; only with a probe), explainer (counterfactuals and generation, one diffusion run per replica)
DEPLOYMENTS = ("ingress", "classifier", "explainer")


class DeploymentSettings(StrictModel):
    """One Serve deployment: autoscaling range (min, max), per-replica load target and Ray resources."""

    replicas: tuple[int, int] = (1, 2)
    target_ongoing_requests: float = Field(4, gt=0)
    num_cpus: float = Field(0.5, ge=0)  # defaults fit a 2-core machine; clusters set their own
    num_gpus: float = Field(0.0, ge=0)  # fractional: replicas share a GPU (e.g. 0.25)
    max_queued_requests: int = Field(-1, ge=-1)  # calls queued beyond this answer 503 (-1: no limit)
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources per replica (e.g. a node pool)
    # Serve's autoscaler: load is averaged over look_back_period_s and must stay above (below) target for
    # upscale_delay_s (downscale_delay_s) before replicas are added (removed); Serve's own defaults
    look_back_period_s: float = Field(30.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @field_validator("replicas")
    @classmethod
    def _range(cls, pair: tuple[int, int]) -> tuple[int, int]:
        lo, hi = pair
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"replicas must be (min, max) with 0 <= min <= max and max >= 1, got {list(pair)}")
        return pair


def _default_deployments() -> dict[str, DeploymentSettings]:
    return {"ingress": DeploymentSettings(replicas=(1, 2), target_ongoing_requests=16, num_cpus=0.25),
            "classifier": DeploymentSettings(replicas=(1, 2), target_ongoing_requests=4, num_cpus=0.5),
            "explainer": DeploymentSettings(replicas=(1, 1), target_ongoing_requests=1, num_cpus=0.5,
                                            max_queued_requests=32)}


class ServeConfig(StrictModel):
    """`cxrray serve` (Ray Serve): limits and batching of the HTTP API, and `deployments` (see DEPLOYMENTS)."""

    host: str = "127.0.0.1"  # HTTP proxy address; anything wider only behind an authenticating gateway
    port: int = Field(8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"  # Serve's HTTP proxies
    api_key_env: str = "CXRRAY_API_KEY"  # when this variable is set, /v1 needs `Authorization: Bearer <key>`
    max_upload_bytes: int = Field(32 * 2**20, ge=1024)  # larger uploads: 413
    max_pixels: int = Field(40_000_000, ge=1)  # rows*cols of an upload (and <= ingest.decode.max_pixels): 413
    max_batch_size: int = Field(8, ge=1)  # classifier @serve.batch
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    access_log: bool = True  # Serve's per-request access log lines (method, route, status, latency; no content)
    max_steps: int = Field(100, ge=1, le=1000)  # DDIM decode steps a request may ask for (explain, generate)
    max_invert_steps: int = Field(250, ge=1, le=1000)
    max_generate: int = Field(8, ge=1, le=64)  # images per /v1/generate request
    deployments: dict[str, DeploymentSettings] = Field(default_factory=_default_deployments)

    @model_validator(mode="before")
    @classmethod
    def _merge_deployments(cls, data):
        """A partial `deployments` mapping (from YAML or --set) updates the defaults field by field."""
        if isinstance(data, dict) and isinstance(data.get("deployments"), dict):
            given = data["deployments"]
            unknown = sorted(set(given) - set(DEPLOYMENTS))
            if unknown:
                raise ValueError(f"unknown deployment(s) {unknown}; the application has {', '.join(DEPLOYMENTS)}")
            defaults = {k: v.model_dump() for k, v in _default_deployments().items()}
            data = {**data, "deployments": {k: {**defaults[k], **(given.get(k) or {})} for k in DEPLOYMENTS}}
        return data
