"""The HTTP API (FastAPI) over a backend: Serve handles in the ingress deployment (`HandleBackend`), or
one in-process `ModelService` (`LocalBackend`: tests, benchmarks). Every error is JSON
{"error": code, "detail": message}; no request content, file name or header value is logged, and on
a 500 only the exception's type name. /v1 needs `Authorization: Bearer <key>` when the variable named
by serve.api_key_env is set in the process (compared in constant time); /healthz, the OpenAPI schema
(/v1/openapi.json, request bodies described) and its docs page (/docs) are always open.

Which /v1 operations answer depends on the loaded model's family (`/v1/models` lists `endpoints`):
one it cannot do answers 422 `not_supported` naming the missing capability.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxrray.data.settings import DecodeConfig
from cxrray.pipelines.settings import ExplainConfig
from cxrray.serve.uploads import (FORM_OVERHEAD, ApiError, media_type, parse_multipart, prepare_image,
                                  prepare_image_and_mask, read_body, upload_parts)

log = logging.getLogger("cxrray.serve")
JSON_LIMIT = 64 * 1024
INFO_TTL_S = 30.0
MAX_SEED = 2**63 - 1
EXPLAIN_FIELDS = {"finding", "eps", "steps", "invert_steps", "format", "direction"}
ATTRIBUTE_FIELDS = {"method", "finding", "steps", "invert_steps", "format", "strength", "guidance"}
# a DiffChest model's own, DAug's (a guided DDPM), or the attribution paper's img2img (a report-conditioned LDM)
ATTRIBUTE_METHODS = ("counterfactual", "reconstruction", "guided", "attribution", "empty_prompt")
IMG2IMG = ("attribution", "empty_prompt")
FINDING_LABEL = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
PAINT_FIELDS = {"seed", "steps", "guidance", "prompt"}
REQUIRED_FIELDS = ("finding", "mask", "seed")  # of the multipart forms that have them
MAX_GUIDANCE = 20.0


class GenerateBody(BaseModel):
    """POST /v1/generate (application/json). `conditions` are the model's own (see /v1/models
    `conditions`: names, types, ranges); any left out are unobserved."""

    seed: int = Field(..., ge=0, le=MAX_SEED, description="seeds the noise: same body, same images")
    n: int = Field(1, ge=1, description="images to draw (at most serve.max_generate)")
    steps: int | None = Field(None, ge=1, description="DDIM steps (at most serve.max_steps)")
    conditions: dict[str, float | str] = Field(default_factory=dict, description=(
        "the model's conditions by name: covariates, e.g. {\"age\": 71, \"sex\": \"F\"}, or a report "
        "{\"prompt\": \"Large pleural effusion in the right lower lung.\"}"))
    guidance: float = Field(1.0, ge=1.0, le=MAX_GUIDANCE, description="classifier-free guidance scale (1: off)")


def _form_schema(fields: dict[str, dict]) -> dict:
    """OpenAPI requestBody of a multipart upload: the image in `file` plus the given form fields."""
    props = {"file": {"type": "string", "format": "binary",
                      "description": "DICOM, PNG or JPEG radiograph (identifiers are never stored or echoed)"}, **fields}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": props, "required": ["file"] + [k for k in REQUIRED_FIELDS if k in fields]}}}}}


EXPLAIN_FORM = _form_schema({
    "finding": {"type": "string", "description": "a fitted finding of /v1/models `findings`"},
    "eps": {"type": "number", "exclusiveMinimum": 0, "maximum": 10, "description": "step along the probe direction"},
    "steps": {"type": "integer", "minimum": 1, "description": "DDIM decode steps (at most serve.max_steps)"},
    "invert_steps": {"type": "integer", "minimum": 1, "description": "DDIM inversion steps"},
    "direction": {"type": "string", "enum": ["toward", "away"]},
    "format": {"type": "string", "enum": ["png", "dicom"], "description": "counterfactual as PNG-16 or DICOM SC"}})
ATTRIBUTE_FORM = _form_schema({
    "method": {"type": "string", "enum": list(ATTRIBUTE_METHODS),
               "description": "the model's first of /v1/models `attribute_methods` by default. counterfactual: "
                              "|counterfactual away from the finding - image|; reconstruction: |image - a seeded "
                              "stochastic decode of its own code|; guided (a pixel DDPM served with a noise-aware "
                              "classifier): DAug's smoothed |guided - unguided| translation of the finding's super-class; "
                              "attribution / empty_prompt (a report-conditioned latent diffusion model): |image - its "
                              "img2img counterpart| toward the healthy prompt / the empty report (SDEdit)"},
    "finding": {"type": "string", "description": "a fitted finding of /v1/models `findings`"},
    "steps": {"type": "integer", "minimum": 1, "description": "DDIM decode steps (at most serve.max_steps)"},
    "invert_steps": {"type": "integer", "minimum": 1, "description": "DDIM inversion steps (counterfactual)"},
    "strength": {"type": "number", "minimum": 0, "maximum": 1,
                 "description": "img2img: how far into the schedule the image's latent is noised (attribution.strength)"},
    "guidance": {"type": "number", "minimum": 1, "maximum": 20,
                 "description": "img2img: classifier-free guidance toward the prompt (attribution.guidance)"},
    "format": {"type": "string", "enum": ["png", "dicom"], "description": "the overlay's format"},
})


def _paint_form(mask: str) -> dict:
    """OpenAPI body of /v1/inpaint and /v1/outpaint: image, mask (what its nonzero pixels mean) and fields."""
    return _form_schema({
        "mask": {"type": "string", "format": "binary", "description": f"PNG of the image's rows x columns; {mask}"},
        "seed": {"type": "integer", "minimum": 0, "description": "seeds the noise: same request, same image"},
        "steps": {"type": "integer", "minimum": 1, "description": "DDIM steps (at most serve.max_steps)"},
        "guidance": {"type": "number", "minimum": 1, "maximum": MAX_GUIDANCE, "description": "classifier-free guidance"},
        "prompt": {"type": "string", "description": "report the generated region follows (report-conditioned models)"}})


INPAINT_FORM = _paint_form("nonzero pixels are generated anew, the rest is kept")
UPSCALE_FORM = _form_schema({
    "seed": {"type": "integer", "minimum": 0, "description": "seeds the noise: same request, same image"},
    "steps": {"type": "integer", "minimum": 1, "description": "DDIM steps (at most serve.max_steps)"}})
OUTPAINT_FORM = _paint_form("nonzero pixels are kept, everything else is generated")
GENERATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": GenerateBody.model_json_schema()}}}}


class HandleBackend:
    """The model deployments through Serve handles (no classifier for a model without a probe)."""

    def __init__(self, classifier, explainer):
        self.classifier, self.explainer = classifier, explainer

    async def info(self) -> dict:
        return await (self.classifier or self.explainer).info.remote()

    async def classify(self, upload: bytes) -> dict:
        return await self.classifier.classify.remote(upload)

    async def explain(self, image, finding, cfg, toward, fmt) -> dict:
        return await self.explainer.explain.remote(image, finding, cfg, toward, fmt)

    async def attribute(self, image, method, finding, cfg, fmt) -> dict:
        return await self.explainer.attribute.remote(image, method, finding, cfg, fmt)

    async def generate(self, seed, n, steps, conditions, guidance) -> dict:
        return await self.explainer.generate.remote(seed, n, steps, conditions, guidance)

    async def inpaint(self, image, mask, seed, steps, conditions, guidance, outpaint) -> dict:
        return await self.explainer.inpaint.remote(image, mask, seed, steps, conditions, guidance, outpaint)

    async def transform(self, image, operation, seed, steps) -> dict:
        return await self.explainer.transform.remote(image, operation, seed, steps)


class LocalBackend:
    """One in-process `ModelService` (tests, benchmarks): the same answers without Serve."""

    def __init__(self, service, settings: dict):  # cxrray.serve.models.ModelService, `settings_from(cfg)`
        self.service = service
        self.prepare = (settings["fit"], DecodeConfig(**settings["decode"]), settings["max_pixels"])

    async def info(self) -> dict:
        return self.service.info()

    async def classify(self, upload: bytes):
        answer = (await asyncio.to_thread(self.service.classify_uploads, [upload], *self.prepare))[0]
        return {**answer, "model": self.service.model_ref}

    async def explain(self, image, finding, cfg, toward, fmt):
        return await asyncio.to_thread(self.service.explain, image, finding, cfg, toward, fmt)

    async def attribute(self, image, method, finding, cfg, fmt):
        return await asyncio.to_thread(self.service.attribute, image, method, finding, cfg, fmt)

    async def generate(self, seed, n, steps, conditions, guidance):
        return await asyncio.to_thread(self.service.generate, seed, n, steps, conditions, guidance)

    async def inpaint(self, image, mask, seed, steps, conditions, guidance, outpaint):
        return await asyncio.to_thread(self.service.inpaint, image, mask, seed, steps, conditions, guidance, outpaint)

    async def transform(self, image, operation, seed, steps):
        return await asyncio.to_thread(self.service.transform, image, operation, seed, steps)


def _int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ApiError(422, "invalid_field", f"{name} must be an integer, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, "invalid_field", f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ApiError(422, "out_of_range", f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _number(value, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(422, "invalid_field", f"{name} must be a finite number, got {str(value)[:40]!r}")
    if not lo <= value <= hi:
        raise ApiError(422, "out_of_range", f"{name} must be in {lo:g}..{hi:g}, got {value:g}")
    return float(value)


def _conditions(given, schema: dict[str, dict]) -> dict:
    """A generation request's conditions checked against the model's (names, types, ranges, enums)."""
    if not isinstance(given, dict):
        raise ApiError(422, "invalid_field", "conditions must be a JSON object {name: value}")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        allowed = ", ".join(schema) or "none (this model is unconditional)"
        raise ApiError(422, "unknown_condition", f"unknown condition(s) {[u[:40] for u in unknown][:5]}; allowed: {allowed}")
    out = {}
    for name, value in given.items():
        spec = schema[name]
        if "enum" in spec:
            if value not in spec["enum"]:
                raise ApiError(422, "out_of_range", f"{name} must be one of {spec['enum']}, got {str(value)[:40]!r}")
            out[name] = value
        elif spec.get("type") == "string":
            if not isinstance(value, str):
                raise ApiError(422, "invalid_field", f"{name} must be a string, got {type(value).__name__}")
            if len(value) > spec.get("maxLength", JSON_LIMIT):
                raise ApiError(422, "out_of_range", f"{name} is {len(value)} characters; at most "
                                                    f"{spec['maxLength']} are allowed")
            out[name] = value
        else:
            out[name] = _number(value, name, spec["minimum"], spec["maximum"])
    return out


def _form_number(fields: dict, name: str, default: float, lo: float, hi: float) -> float:
    """A number from a form field (text), `default` when absent; 422 with the reason otherwise."""
    if name not in fields:
        return float(default)
    try:
        value = float(fields[name])
    except ValueError:
        raise ApiError(422, "invalid_field", f"{name} must be a number, got {fields[name][:40]!r}") from None
    return _number(value, name, lo, hi)


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ApiError(422, "invalid_field", f"{name} must be one of {', '.join(allowed)}, got {value[:40]!r}")
    return value


async def _call(make):
    """A backend call, `make()` -> awaitable (every call is a pure function of its arguments, so safe to repeat).
    A replica lost mid-call (its node gone) is retried once on another; lost again or none left: 503 with a
    reason. Overload is 503; anything else propagates to the 500 guard."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    for attempt in (1, 2):
        try:
            return await make()
        except BackPressureError:
            raise ApiError(503, "overloaded", "too many requests queued; retry later") from None
        except (RayActorError, DeploymentUnavailableError) as exc:
            log.warning("model replica unavailable (%s), attempt %d", type(exc).__name__, attempt)
    raise ApiError(503, "unavailable", "the model replica serving this request was lost; retry")


def create_api(settings: dict, backend) -> FastAPI:
    app = FastAPI(title="cxrray", version="1", docs_url="/docs", redoc_url=None, openapi_url="/v1/openapi.json",
                  description="Chest-radiograph diffusion models: classify, explain with counterfactuals, generate. "
                              "Every generated or derived image is synthetic and says so in its metadata.")
    api_key = os.environ.get(settings["api_key_env"]) or None
    decode = DecodeConfig(**settings["decode"])
    upload_limit = settings["max_upload_bytes"]
    explain_defaults = settings["explain"]
    default_steps = min(explain_defaults["steps"], settings["max_steps"])
    cache: dict = {}

    async def info() -> dict:
        """Model facts for validation (findings, image size); re-read every INFO_TTL_S (model updates)."""
        if "info" not in cache or time.monotonic() - cache["at"] > INFO_TTL_S:
            cache["info"], cache["at"] = await _call(lambda: backend.info()), time.monotonic()
        return cache["info"]

    def model_ref(i: dict) -> dict:
        return {"name": i["model"]["name"], "version": i["model"]["version"]}

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else (
            {"Retry-After": "1"} if exc.status == 503 else None)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse({"error": codes.get(exc.status_code, f"http_{exc.status_code}"), "detail": str(exc.detail)},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return JSONResponse({"error": "invalid_request", "detail": str(exc.errors())[:500]}, status_code=422)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1") and request.url.path != app.openapi_url and api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return await _api_error(request, ApiError(401, "unauthorized", "send Authorization: Bearer <API key>"))
        try:
            return await call_next(request)
        except ApiError as exc:
            return await _api_error(request, exc)
        except Exception as exc:  # never the message: it may quote request content
            log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
            return JSONResponse({"error": "internal_error", "detail": f"internal error ({type(exc).__name__})"},
                                status_code=500)

    async def upload(request: Request, allowed: set[str], parts: tuple[str, ...] = ("file",)) -> tuple[dict, list[bytes]]:
        if media_type(request.headers.get("content-type")) != "multipart/form-data":
            raise ApiError(415, "unsupported_media_type",
                           "send multipart/form-data with the image in a part named `file`")
        body = await read_body(request, len(parts) * upload_limit + FORM_OVERHEAD)
        fields, files = parse_multipart(body, request.headers["content-type"])
        unknown = sorted(set(fields) - allowed - set(parts))
        if unknown:
            raise ApiError(422, "unknown_field", f"unknown form field(s) {unknown}; allowed: {sorted(allowed)}")
        return fields, upload_parts(fields, files, upload_limit, parts)

    def supported(i: dict, endpoint: str) -> None:
        if endpoint not in i.get("endpoints", ()):
            m = i["model"]
            why = ("it has no probe" if endpoint in ("classify", "explain") and "encode" in m["capabilities"]
                   else f"its capabilities are {', '.join(m['capabilities'])}")
            raise ApiError(422, "not_supported", f"model {m['name']} (family {m['family']}) cannot {endpoint}: {why}; "
                                                 f"this service answers {', '.join(i.get('endpoints', [])) or 'nothing'}")

    async def image_of(data: bytes, i: dict) -> np.ndarray:
        """The upload decoded like ingest, at the model's input side (an SR model's: its low resolution)."""
        return await asyncio.to_thread(prepare_image, data, i.get("input_size", i["model"]["image_size"]),
                                       settings["fit"], decode, settings["max_pixels"])

    @app.get("/healthz")
    async def healthz():
        try:
            i = await asyncio.wait_for(info(), timeout=30)
        except Exception:
            return JSONResponse({"error": "unavailable", "detail": "model deployments not ready"}, status_code=503)
        return {"status": "ok", "model": model_ref(i)}

    @app.get("/v1/models")
    async def models():
        i = await info()
        return {"models": [i["model"]], "endpoints": i["endpoints"], "attribute_methods": i.get("attribute_methods", []),
                "conditions": i["conditions"],
                "findings": i["findings"], "unfitted": i["unfitted"],
                "limits": {k: settings[k] for k in ("max_upload_bytes", "max_pixels", "max_steps",
                                                     "max_invert_steps", "max_generate")},
                "explain_defaults": {"eps": explain_defaults["eps"], "steps": default_steps,
                                     "invert_steps": min(explain_defaults["invert_steps"], settings["max_invert_steps"]),
                                     "mode": explain_defaults["mode"], "axis": explain_defaults["axis"]}}

    @app.post("/v1/classify", openapi_extra=_form_schema({}),
              summary="Finding probabilities of one radiograph (linear probe on the semantic code)")
    async def classify(request: Request):
        i = await info()
        supported(i, "classify")
        _, (data,) = await upload(request, set())
        out = await _call(lambda: backend.classify(data))  # decoded in the batched model replica
        if "error" in out:
            raise ApiError.from_answer(out)
        return {"findings": list(out["probabilities"]), **out}

    def fitted_finding(fields: dict, i: dict) -> str:
        """The form's `finding`: required, and one the probe has fitted (422 otherwise)."""
        finding = fields.get("finding", "").strip()
        if not finding:
            raise ApiError(422, "missing_field", "form field `finding` is required")
        if finding not in i["findings"]:
            why = "has no fitted probe" if finding in i["unfitted"] else "is unknown"
            raise ApiError(422, "unknown_finding", f"finding {finding[:60]!r} {why}; choose from {i['findings']}")
        return finding

    def finding_label(fields: dict) -> str:
        """The img2img methods' `finding`: what the map is named for (the healthy prompt is the same for every
        finding, so no vocabulary constrains it): required, lower-case letters, digits and _."""
        finding = fields.get("finding", "").strip()
        if not finding:
            raise ApiError(422, "missing_field", "form field `finding` is required")
        if not FINDING_LABEL.match(finding):
            raise ApiError(422, "invalid_field", f"finding {finding[:60]!r}: lower-case letters, digits and _, "
                                                 "at most 40 (e.g. effusion)")
        return finding

    def decode_steps(fields: dict) -> tuple[int, int]:
        """(steps, invert_steps) of the form, within the service's limits."""
        steps = _int(fields.get("steps", default_steps), "steps", 1, settings["max_steps"])
        invert = _int(fields.get("invert_steps", min(explain_defaults["invert_steps"], settings["max_invert_steps"])),
                      "invert_steps", 1, settings["max_invert_steps"])
        return steps, invert

    @app.post("/v1/explain", openapi_extra=EXPLAIN_FORM,
              summary="Counterfactual of one radiograph toward/away from a finding, with a difference map")
    async def explain(request: Request):
        i = await info()
        supported(i, "explain")
        fields, (data,) = await upload(request, EXPLAIN_FIELDS)
        finding = fitted_finding(fields, i)
        try:
            eps = float(fields.get("eps", explain_defaults["eps"]))
        except ValueError:
            raise ApiError(422, "invalid_field", "eps must be a number") from None
        steps, invert = decode_steps(fields)
        direction = _choice(fields.get("direction", "toward"), "direction", ("toward", "away"))
        fmt = _choice(fields.get("format", "png"), "format", ("png", "dicom"))
        try:
            cfg = ExplainConfig(**{**explain_defaults, "eps": eps, "steps": steps, "invert_steps": invert})
        except ValidationError:
            raise ApiError(422, "out_of_range", f"eps must be in (0, 10], got {eps}") from None
        if not math.isfinite(eps):
            raise ApiError(422, "out_of_range", f"eps must be in (0, 10], got {eps}")
        image = await image_of(data, i)
        out = await _call(lambda: backend.explain(image, finding, cfg.model_dump(mode="json"),
                                          1 if direction == "toward" else -1, fmt))
        return {"finding": finding, "direction": direction, "eps": eps, "steps": steps, "invert_steps": invert,
                "format": fmt, **out}

    @app.post("/v1/attribute", openapi_extra=ATTRIBUTE_FORM,
              summary="Where a finding is in one radiograph: an attribution map, its overlay, P(finding)")
    async def attribute(request: Request):
        i = await info()
        supported(i, "attribute")
        fields, (data,) = await upload(request, ATTRIBUTE_FIELDS)
        served = i.get("attribute_methods") or ["counterfactual"]
        method = _choice(fields.get("method", served[0]), "method", ATTRIBUTE_METHODS)
        if method not in served:
            raise ApiError(422, "not_supported", f"attribution method {method!r}: this model serves {served}")
        for name in ("strength", "guidance"):  # the img2img methods' settings: refused, never ignored
            if name in fields and method not in IMG2IMG:
                raise ApiError(422, "unsupported_field", f"{name} is a setting of the generative attribution methods, "
                                                         f"not of {method}")
        if method != "counterfactual" and "invert_steps" in fields:
            raise ApiError(422, "unsupported_field", f"invert_steps is the counterfactual's; {method} does not invert")
        finding = finding_label(fields) if method in IMG2IMG else fitted_finding(fields, i)
        if method in ("guided", *IMG2IMG):  # the steps default to the method's section, as `cxrray attribute` does
            section = settings["augment" if method == "guided" else "attribution"]
            fields = {"steps": min(section["steps"], settings["max_steps"]), **fields}
        steps, invert = decode_steps(fields)
        fmt = _choice(fields.get("format", "png"), "format", ("png", "dicom"))
        if method == "guided":
            cfg = {**settings["augment"], "steps": steps}
            invert = None
        elif method in IMG2IMG:
            cfg = {**settings["attribution"], "steps": steps,
                   "strength": _form_number(fields, "strength", settings["attribution"]["strength"], 0.0, 1.0),
                   "guidance": _form_number(fields, "guidance", settings["attribution"]["guidance"], 1.0, 20.0)}
            invert = None
        else:
            cfg = ExplainConfig(**{**explain_defaults, "steps": steps, "invert_steps": invert}).model_dump(mode="json")
        image = await image_of(data, i)
        out = await _call(lambda: backend.attribute(image, method, finding, cfg, fmt))
        extra = {k: cfg[k] for k in ("strength", "guidance", "prompt")} if method in IMG2IMG else {}
        return {"method": method, "finding": finding, "steps": steps, "invert_steps": invert, "format": fmt, **extra, **out}

    @app.post("/v1/generate", openapi_extra=GENERATE_BODY,
              summary="Seeded synthetic images, under the model's conditions (covariates) where it has them")
    async def generate(request: Request):
        if media_type(request.headers.get("content-type")) != "application/json":
            raise ApiError(415, "unsupported_media_type", "send a JSON object: {\"seed\": int, \"n\": int, \"steps\": int}")
        try:
            body = json.loads(await read_body(request, JSON_LIMIT))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_json", "the body must be a JSON object")
        unknown = sorted(set(body) - set(GenerateBody.model_fields))
        if unknown:
            raise ApiError(422, "unknown_field", f"unknown field(s) {unknown}; allowed: {', '.join(GenerateBody.model_fields)}")
        if "seed" not in body:
            raise ApiError(422, "missing_field", "field `seed` is required")
        i = await info()
        supported(i, "generate")
        seed = _int(body["seed"], "seed", 0, MAX_SEED)
        n = _int(body.get("n", 1), "n", 1, settings["max_generate"])
        steps = _int(body.get("steps", default_steps), "steps", 1, settings["max_steps"])
        conditions = _conditions(body.get("conditions", {}), i["conditions"])
        guidance = _number(body.get("guidance", 1.0), "guidance", 1.0, MAX_GUIDANCE)
        out = await _call(lambda: backend.generate(seed, n, steps, conditions, guidance))
        return {"seed": seed, "n": n, "steps": steps, "conditions": conditions, "guidance": guidance, **out}

    async def paint(request: Request, outpaint: bool) -> dict:
        i = await info()
        supported(i, "outpaint" if outpaint else "inpaint")
        fields, (data, mask_data) = await upload(request, PAINT_FIELDS, ("file", "mask"))
        if "seed" not in fields:
            raise ApiError(422, "missing_field", "form field `seed` is required")
        seed = _int(fields["seed"], "seed", 0, MAX_SEED)
        steps = _int(fields.get("steps", default_steps), "steps", 1, settings["max_steps"])
        try:
            guidance = float(fields.get("guidance", 1.0))
        except ValueError:
            raise ApiError(422, "invalid_field", "guidance must be a number") from None
        guidance = _number(guidance, "guidance", 1.0, MAX_GUIDANCE)
        conditions = _conditions({"prompt": fields["prompt"]} if fields.get("prompt") else {}, i["conditions"])
        image, mask = await asyncio.to_thread(prepare_image_and_mask, data, mask_data, i["model"]["image_size"],
                                              settings["fit"], decode, settings["max_pixels"])
        out = await _call(lambda: backend.inpaint(image, mask, seed, steps, conditions, guidance, outpaint))
        return {"seed": seed, "steps": steps, "guidance": guidance, "conditions": conditions,
                "masked": float(mask.mean()), **out}

    @app.post("/v1/inpaint", openapi_extra=INPAINT_FORM,
              summary="One radiograph with the masked region generated anew (e.g. a device removed), the rest kept")
    async def inpaint(request: Request):
        return await paint(request, outpaint=False)

    @app.post("/v1/outpaint", openapi_extra=OUTPAINT_FORM,
              summary="One radiograph with the masked region kept and everything around it generated")
    async def outpaint(request: Request):
        return await paint(request, outpaint=True)

    @app.post("/v1/upscale", openapi_extra=UPSCALE_FORM,
              summary="One radiograph super-resolved by an SR model (read at its low resolution; seeded DDIM)")
    async def upscale(request: Request):
        i = await info()
        supported(i, "upscale")
        fields, (data,) = await upload(request, {"seed", "steps"})
        if "seed" not in fields:
            raise ApiError(422, "missing_field", "form field `seed` is required")
        seed = _int(fields["seed"], "seed", 0, MAX_SEED)
        steps = _int(fields.get("steps", default_steps), "steps", 1, settings["max_steps"])
        image = await image_of(data, i)
        out = await _call(lambda: backend.transform(image, "upscale", seed, steps))
        return {"seed": seed, "steps": steps, **out}

    @app.post("/v1/reconstruct", openapi_extra=_form_schema({}),
              summary="One radiograph through an autoencoder, D(E(x)): what its latents keep")
    async def reconstruct(request: Request):
        i = await info()
        supported(i, "reconstruct")
        _, (data,) = await upload(request, set())
        image = await image_of(data, i)
        return await _call(lambda: backend.transform(image, "reconstruct", 0, 0))

    return app
