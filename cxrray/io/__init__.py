"""Checkpoint and model I/O, below families/train/pipelines/serve: safetensors + JSON checkpoints
(`checkpoint`), `load_model(uri)` for every family and every kind of URI (`loading`), model cards
(`card`), diffusers export (`export`) and the MLflow pyfunc (`mlflow_pyfunc`). Nothing here unpickles."""
