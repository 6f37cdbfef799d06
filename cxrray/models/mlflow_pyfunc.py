"""MLflow "model from code" for any family, loaded from safetensors + JSON artifacts, so a registered
model contains no pickled Python object.

predict: for a family that can `encode` (diffae), images [B, 1, S, S] in [-1, 1] -> z [B, z_dim]; for
an autoencoder (`reconstruct`: vae), images -> reconstructions [B, 1, S, S] in [-1, 1]; for super-resolution
(`upscale`: sr), low-resolution images -> [B, 1, S, S] (DDIM 50 steps, seed 0); for an embedder (`embed`: daug), the stacked
channels [B, 1 + H, S, S] in [-1, 1] -> [unit embedding [B, D] | super-class logits [B, K]]; for a noise-aware
classifier (`guide`: guided), x_t [B, 1, S, S] -> super-class logits [B, K] at timestep param `t` (default 0);
for a generator, a
table with one row per image and a column per condition of the family (ddpm: age, sex (M/F), ivsd, lvidd,
lvpwd; ldm: prompt; blanks = missing / unconditional) -> images [B, 1, S, S] in [-1, 1], DDIM
(params `steps`, default 50, and `seed`, default 0)."""
import json

import mlflow
import numpy as np
import torch


class CxrrayModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from cxrray.io.checkpoint import load_weights
        from cxrray.models.loading import model_config
        from cxrray.families import get_family

        with open(context.artifacts["state"]) as f:
            cfg = model_config(json.load(f))
        self.family = get_family(cfg.family)
        self.model = self.family.build(cfg).eval()
        load_weights(self.model, context.artifacts["ema"])

    def predict(self, context, model_input, params=None):
        with torch.no_grad():
            if "encode" in self.family.capabilities:
                return self.model.encode(torch.as_tensor(np.asarray(model_input), dtype=torch.float32)).numpy()
            if "reconstruct" in self.family.capabilities:
                return self.model(torch.as_tensor(np.asarray(model_input), dtype=torch.float32)).numpy()
            if "guide" in self.family.capabilities:
                x = torch.as_tensor(np.asarray(model_input), dtype=torch.float32)
                t = torch.full((len(x),), int((params or {}).get("t", 0)), dtype=torch.long)
                return self.model(x, t).numpy()
            if "embed" in self.family.capabilities:
                embeddings = self.model.embed(torch.as_tensor(np.asarray(model_input), dtype=torch.float32))
                return torch.cat([embeddings, self.model.class_logits(embeddings)], 1).numpy()
            if "upscale" in self.family.capabilities:
                return self.family.upscale(self.model, torch.as_tensor(np.asarray(model_input), dtype=torch.float32), steps=50,
                               generator=torch.Generator().manual_seed(0)).numpy()
            from cxrray.families import GenerateRequest

            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            schema = self.family.conditions(self.model.cfg)
            conditions = {k: [_value(spec, r.get(k)) for r in rows] for k, spec in schema.items()
                          if any(_value(spec, r.get(k)) is not None for r in rows)}
            request = GenerateRequest(n=len(rows), steps=int((params or {}).get("steps", 50)), conditions=conditions,
                                      generator=torch.Generator().manual_seed(int((params or {}).get("seed", 0))))
            return self.family.generate(self.model, request).images.numpy()


def _value(spec: dict, value):
    """A table cell -> the raw condition value (None: blank / missing; an enum matched by its first letters)."""
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return None
    if "enum" in spec:
        return next((e for e in spec["enum"] if str(value).strip().upper().startswith(str(e).upper())), None)
    return str(value) if spec.get("type") == "string" else float(value)


mlflow.models.set_model(CxrrayModel())
