"""MLflow "model from code" for the pretrained DiffAE: loaded from safetensors + JSON artifacts, so
the registered model contains no pickled Python object. predict: images [B, 1, S, S] in [-1, 1] -> z."""
import json

import mlflow
import numpy as np
import torch


class DiffAEEncoder(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from cxrray.models.diffae import DiffAE, DiffAEConfig
        from cxrray.train.state import load_weights

        with open(context.artifacts["state"]) as f:
            state = json.load(f)
        self.model = DiffAE(DiffAEConfig(**state["model"])).eval()
        load_weights(self.model, context.artifacts["ema"])

    def predict(self, context, model_input, params=None):
        with torch.no_grad():
            return self.model.encode(torch.as_tensor(np.asarray(model_input), dtype=torch.float32)).numpy()


mlflow.models.set_model(DiffAEEncoder())
