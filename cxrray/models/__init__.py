"""A checkpoint as a model of its family, above the families: `load_model(uri)` for every family and kind of
URI (`loading`), diffusers export (`export`) and the MLflow "model from code" (`mlflow_pyfunc`). Nothing here
unpickles."""
