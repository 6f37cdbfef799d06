"""Batch jobs over shards and the methods built from them, one package per method.

Shared by every method (this folder): `fanout` (work units over a Ray Data actor pool, written once),
`settings` (the jobs' config sections, torch-free), `derived` (synthetic / counterfactual outputs with
provenance), `encode` + `encodings` (z and x_T per sample, Parquet), `generate` (conditioned rows -> synthetic
shards), `judges` (the independent classifiers and image-quality features every method is judged with),
`truth` (a split's images with the masks and healthy counterparts ingest carried beside them),
`deid_report` (how well ingest de-identifies reports).

Methods: `diffchest/` (linear probe on the latent, counterfactuals, the confounder audit and its
evaluation), `cohorts/` (cxr_ddpm: cohort specs, the detector experiment, the synthetic-set audit, its
reproduce recipe), `cheff/` (the cascade, latent shards, generation evaluation, its reproduce recipe), `saliency/` (Grad-CAM and
integrated gradients of a classifier trained here: the localisation benchmark's baselines), `attribution/`
(latent-diffusion visual attribution: img2img healthy counterparts), `daug/` (DAug: super-classes and the
noise-aware classifier). Benchmarks that
run several methods side by side live one layer up, in `cxrray.benchmarks`.
A method package may import this folder's modules; methods do not import each other.
"""
