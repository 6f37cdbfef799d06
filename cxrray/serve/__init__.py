"""Ray Serve application: classify, explain (counterfactuals) and generate over HTTP, for any model
family, answering what its capabilities allow.

`cxrray serve` runs it locally; `cluster/serve-config.yaml` deploys it (`serve deploy`) and
`cluster/kuberay-rayservice.yaml` runs it on Kubernetes. Modules: `settings` (the `serve` config
section), `uploads` (request bodies and upload decoding -> errors), `models` (ModelService and the
model deployments; provenance-stamped PNG / DICOM come from `cxrray.pipelines.derived`, shared with
the explain job), `api` (the FastAPI routes and OpenAPI schema over a backend), `app` (ingress
deployment, the application builder and `cxrray serve`). Importing this package imports nothing else.
"""
