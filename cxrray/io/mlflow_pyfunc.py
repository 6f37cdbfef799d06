"""MLflow "model from code" for any family, loaded from safetensors + JSON artifacts, so a registered
model contains no pickled Python object.

predict: for a family that can `encode` (diffae), images [B, 1, S, S] in [-1, 1] -> z [B, z_dim]; for
an autoencoder (`reconstruct`: vae), images -> reconstructions [B, 1, S, S] in [-1, 1]; for a generator (ddpm), a table of covariates (one row per image; columns age, sex (M/F), ivsd, lvidd,
lvpwd; blanks = missing) -> images [B, 1, S, S] in [-1, 1], DDIM 50 steps, seeded by the row index."""
import json

import mlflow
import numpy as np
import torch


class CxrrayModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from cxrray.io.checkpoint import load_weights
        from cxrray.io.loading import model_config
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
            from cxrray.diffusion.ddim import sample_conditional
            from cxrray.families.ddpm.config import COVARIATES

            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            values = {k: torch.tensor([_code(k, r.get(k)) for r in rows], dtype=torch.float32)
                      for k in COVARIATES}
            c = self.model.condition(values)
            generator = torch.Generator().manual_seed(int((params or {}).get("seed", 0)))
            steps = int((params or {}).get("steps", 50))
            return sample_conditional(self.model, len(rows), c, steps=steps, generator=generator).numpy()


def _code(name, value) -> float:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return float("nan")
    if name == "sex":
        return {"M": 1.0, "F": 0.0}.get(str(value).upper()[:1], float("nan"))
    return float(value)


mlflow.models.set_model(CxrrayModel())
