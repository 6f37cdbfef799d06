"""Ray Serve application: classify, explain (counterfactuals) and generate over HTTP.

`cxrray serve` runs it locally; `cluster/serve-config.yaml` deploys it (`serve deploy`) and
`cluster/kuberay-rayservice.yaml` runs it on Kubernetes. Modules: `uploads` (request bodies and
upload decoding -> errors), `models` (ModelService and the model deployments; provenance-stamped
PNG / DICOM come from `cxrray.pipelines.derived`, shared with the explain job), `api` (the FastAPI routes over a backend), `app` (ingress deployment, the
application builder and `cxrray serve`). Importing this package imports nothing else.
"""
