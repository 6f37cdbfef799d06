"""Ray Serve application: classify, explain (counterfactuals) and generate over HTTP.

`cxrray serve` runs it locally; `cluster/serve-config.yaml` deploys it (`serve deploy`) and
`cluster/kuberay-rayservice.yaml` runs it on Kubernetes. Modules: `uploads` (request bodies and
upload decoding -> errors), `outputs` (provenance-stamped PNG / DICOM), `models` (ModelService and
the model deployments), `api` (the FastAPI routes over a backend), `app` (ingress deployment, the
application builder and `cxrray serve`). Importing this package imports nothing else.
"""
