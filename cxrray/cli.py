"""`cxrray` command line. Each stage is a subcommand over a function of the package; bad input
prints what was wrong and where, and exits with status 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cxrray.config import load_config
from cxrray.errors import ConfigError, InputError

DEMO_SALT = "cxrray-demo-salt-phantoms-only"
# the demo's own choices (a user's --set still wins): a planted confounder for the audit to find, a test split
# large enough for >= 30 positives per finding, and DDIM step counts sized for a CPU
DEMO_OVERRIDES = ["phantom.confounder=tube:effusion:0.9:0.05", "phantom.masks=true",
                  'ingest.split_fractions={"train": 0.55, "val": 0.05, "test": 0.4}',
                  "explain.steps=50", "explain.invert_steps=50", "audit.images=24"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset (tiny, small, paper) or YAML file; default tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set ingest.size=128 (repeatable)")


def _parse_options(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--source-option {item!r} is not key=value")
        key, raw = item.split("=", 1)
        out[key] = yaml.safe_load(raw)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config as JSON")
    _add_config_args(p)

    p = sub.add_parser("phantoms", help="write procedural CXR phantoms as DICOM + labels.csv")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--confounder", default=None, help="DEVICE:FINDING:P1:P0, e.g. tube:effusion:0.9:0.05")
    p.add_argument("--seed", type=int, default=None)
    _add_config_args(p)

    p = sub.add_parser("ingest", help="DICOM/PNG inputs -> de-identified WebDataset shards + manifest")
    p.add_argument("--input", required=True, help="folder of inputs (image root for --source)")
    p.add_argument("--output", required=True, help="file://PATH or s3://bucket/prefix")
    p.add_argument("--size", type=int, default=None, help="square output side (overrides ingest.size)")
    p.add_argument("--labels", default=None, help="CSV for the folder source (path, patient, ..., findings)")
    p.add_argument("--source", default=None, help="dataset adapter: padchest, chexpert, mimic, nih, chexchonet, folder")
    p.add_argument("--metadata", default=None, help="the dataset's metadata file (with --source)")
    p.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE")
    _add_config_args(p)

    p = sub.add_parser("export", help="a trained model as diffusers save_pretrained folders")
    p.add_argument("--checkpoint", required=True, help="checkpoint, pretraining output, or models:/NAME@ALIAS")
    p.add_argument("--format", default="diffusers", choices=["diffusers"])
    p.add_argument("--output", required=True, help="folder to write")

    p = sub.add_parser("deid", help="free-text de-identification tools")
    dsub = p.add_subparsers(dest="deid_command", required=True)
    d = dsub.add_parser("report", help="measure report de-identification on a set with planted truth (phantoms)")
    d.add_argument("--input", required=True, help="image folder (DICOM headers give known identifiers)")
    d.add_argument("--labels", required=True, help="CSV with path, patient, study, report")
    d.add_argument("--truth", default=None, help="planted truth JSONL (default: report_truth.jsonl beside --labels)")
    d.add_argument("--shards", default=None, help="measure what ingest wrote at this URI instead of re-applying it")
    d.add_argument("--patterns-only", action="store_true", help="without header/metadata identifiers")
    d.add_argument("--json", default=None, help="also write the result here")
    _add_config_args(d)

    p = sub.add_parser("pretrain", help="diffusion-autoencoder pretraining on Ray Train + DeepSpeed")
    p.add_argument("--data", required=True, help="shards URI (file:// or s3://) written by `cxrray ingest`")
    p.add_argument("--output", required=True, help="run output URI: checkpoints, latest.json")
    p.add_argument("--images", type=int, default=None, help="train until this many images shown (train.images)")
    _add_config_args(p)

    p = sub.add_parser("status", help="print the training status of an output URI as JSON")
    p.add_argument("--output", required=True)

    p = sub.add_parser("sources", help="dataset metadata tools")
    ssub = p.add_subparsers(dest="sources_command", required=True)
    s = ssub.add_parser("summary", help="print counts of a dataset's metadata as JSON")
    s.add_argument("--source", required=True)
    s.add_argument("--metadata", required=True)
    s.add_argument("--source-option", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("encode", help="shards -> z (and x_T by DDIM inversion) as Parquet, on a Ray actor pool")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or pretraining output URI")
    p.add_argument("--data", required=True, help="shards URI")
    p.add_argument("--output", required=True, help="encodings URI (file:// or s3://)")
    p.add_argument("--invert", action="store_true", help="also store x_T (deterministic DDIM inversion)")
    p.add_argument("--invert-steps", type=int, default=None, help="inversion steps (encode.invert_steps)")
    _add_config_args(p)

    p = sub.add_parser("latents", help="image shards -> latent shards (frozen VAE) + tokenised reports, on a Ray "
                                      "actor pool")
    p.add_argument("--vae", required=True, help="autoencoder checkpoint, pretraining output or models:/ URI")
    p.add_argument("--data", required=True, help="image shards URI")
    p.add_argument("--output", required=True, help="latent shards URI (file:// or s3://)")
    _add_config_args(p)

    p = sub.add_parser("cohort", help="synthetic cohort specs (covariate DDPM)")
    csub = p.add_subparsers(dest="cohort_command", required=True)
    c = csub.add_parser("describe", help="the composition a cohort spec will have, before anything is generated")
    c.add_argument("spec", help="cohort spec YAML")
    c.add_argument("--checkpoint", required=True, help="the covariate DDPM (its training statistics and ranges)")
    c.add_argument("--n", type=int, default=None, help="override the spec's count")

    p = sub.add_parser("generate", help="a cohort spec (covariate DDPM) or report prompts (latent diffusion) -> "
                                        "synthetic shards (Ray Data actor pool, resumable)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or pretraining output URI")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--cohort", help="cohort spec YAML")
    what.add_argument("--prompts", help="text file, one report prompt per line (an empty line: unconditional)")
    what.add_argument("--prompts-from", metavar="DATA_URI", help="shards URI: its split's de-identified reports "
                                                                 "are the prompts (labels kept with each image)")
    p.add_argument("--split", default="test", help="the split whose reports --prompts-from takes (default test)")
    p.add_argument("--max-prompts", type=int, default=None, help="the first N reports (sample-key order)")
    p.add_argument("--n-per-prompt", type=int, default=1, help="images per prompt (with --prompts, --prompts-from)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (with prompts; a cohort spec has its own)")
    p.add_argument("--sr", default=None, help="super-resolution checkpoint: upscale each image (the Cheff cascade)")
    p.add_argument("--output", required=True, help="shards URI (file:// or s3://)")
    p.add_argument("--n", type=int, default=None, help="override the spec's count")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (generate.steps)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help="generate.sampler")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (generate.guidance)")
    _add_config_args(p)

    p = sub.add_parser("experiment", help="downstream experiments on Ray Train + Tune")
    esub = p.add_subparsers(dest="experiment_command", required=True)
    e = esub.add_parser("cohorts", help="does a synthetic cohort help an SLVH/DLV detector? Base / Gen / Base+Gen / "
                        "Base+Gen(Pos), seeds ensembled, paired tests on the real test split, report.html")
    e.add_argument("--real", required=True, help="real shards URI (train / val / test splits, echo covariates)")
    e.add_argument("--synthetic", required=True, help="synthetic shards URI written by `cxrray generate`")
    e.add_argument("--output", required=True, help="output URI (file:// or s3://): fits, metrics, report.html")
    e.add_argument("--arms", default=None, help="comma-separated subset of base,gen,base+gen,base+gen(pos)")
    e.add_argument("--seeds", type=int, default=None, help="fits per arm (experiment.seeds)")
    _add_config_args(e)

    p = sub.add_parser("audit-synthetic", help="a synthetic set's fidelity (image-only judge), FID/KID and "
                       "memorisation (nearest training image) against the real set it imitates")
    p.add_argument("--synthetic", required=True, help="synthetic shards URI written by `cxrray generate`")
    p.add_argument("--train", required=True, help="real shards URI: the generator's training split (and val / test)")
    p.add_argument("--test", default=None, help="real shards URI of the test split (default: --train)")
    p.add_argument("--output", required=True, help="output URI: audit.json, report.html, plots")
    p.add_argument("--features-model", default=None, help="local TorchScript feature network (e.g. FID Inception) "
                   "for a second FID/KID; never downloaded")
    _add_config_args(p)

    p = sub.add_parser("evaluate", help="measure trained models as their papers do")
    esub = p.add_subparsers(dest="evaluate_command", required=True)
    e = esub.add_parser("generation", help="the Cheff cascade: Table 2 analogue, FID/KID, MS-SSIM, conditioning "
                                           "AUROC and prevalence (judge trained on real images), device removal")
    e.add_argument("--ldm", required=True, help="report-conditioned latent diffusion checkpoint")
    e.add_argument("--sr", default=None, help="super-resolution checkpoint (the cascade's last stage)")
    e.add_argument("--sr-base", default=None, help="the SR model before its D(E(x)) fine-tune (Table 2's base row)")
    e.add_argument("--data", required=True, help="real shards URI (train/val/test splits, at least the output size)")
    e.add_argument("--output", required=True, help="output URI: generation_eval.json, report.html, grids")
    e.add_argument("--features-model", default=None, help="local TorchScript feature network (FID Inception)")
    _add_config_args(e)
    e = esub.add_parser("noisy-classifier", help="DAug's noise-aware classifier over super-classes: trained on x_t "
                                                 "at random t, AP per super-class at several t (Table 1 analogue)")
    e.add_argument("--data", required=True, help="shards URI (train / val / test splits)")
    e.add_argument("--output", required=True, help="folder: noisy_classifier.json, table.md, weights")
    e.add_argument("--checkpoint", default=None, help="a guided-family checkpoint trained on Ray Train (`cxrray "
                   "pretrain --set model.family=guided`): evaluated, not trained here")
    _add_config_args(e)
    e = esub.add_parser("daug", help="DAug's downstream experiment: one retrieval + classification model per arm "
                                     "([x,x,x], [x,heatmaps], shuffled heatmaps, no text loss) and data fraction, on Ray "
                                     "Train; AUROC / AP, mAP@10, Recall@k, paired patient-clustered bootstraps")
    e.add_argument("--data", required=True, help="`cxrray augment` output URI (shards with heatmap members)")
    e.add_argument("--output", required=True, help="folder: runs/, downstream.json, table.md, report.html")
    _add_config_args(e)
    e = esub.add_parser("localisation", help="where each method puts a finding, against the ground-truth masks: "
                                             "pixel AUROC, pointing game, energy inside, patient-clustered CIs")
    e.add_argument("--data", required=True, help="shards URI with masks (phantoms made with phantom.masks=true)")
    e.add_argument("--output", required=True, help="folder: localisation.json, table.md, report.html, maps.png")
    e.add_argument("--checkpoint", default=None, help="DiffChest checkpoint: the counterfactual and reconstruction "
                                                       "methods (add them with --set localisation.methods=[...])")
    e.add_argument("--probe", default=None, help="its linear probe (`cxrray probe` output): the counterfactual method")
    e.add_argument("--ldm", default=None, help="report-conditioned latent diffusion checkpoint: the img2img methods "
                                               "(attribution, empty_prompt)")
    e.add_argument("--ddpm", default=None, help="pixel DDPM checkpoint: DAug's guided method (with --classifier)")
    e.add_argument("--classifier", default=None, help="noise-aware classifier (folder or guided checkpoint): guided")
    _add_config_args(e)

    e = esub.add_parser("img2img", help="the attribution paper's img2img examined: strength x guidance sweep, the "
                                        "ablation (no text / no image prior / neither / no fine-tune) as FID, zero-shot "
                                        "and localised induction, judged by a classifier trained here")
    e.add_argument("--data", required=True, help="shards URI with masks and healthy renders (phantom.masks=true)")
    e.add_argument("--ldm", required=True, help="report-conditioned latent diffusion checkpoint (the fine-tuned one)")
    e.add_argument("--base-ldm", default=None, help="the model before its fine-tune: the ablation's no-fine-tune row")
    e.add_argument("--judge", required=True, help="a finding classifier folder trained on real images (`cxrray "
                                                  "classifier`, or the localisation benchmark's classifier/)")
    e.add_argument("--output", required=True, help="folder: img2img.json, report.html, grid.png")
    _add_config_args(e)

    p = sub.add_parser("reproduce", help="a paper's headline experiment in miniature, one command")
    p.add_argument("paper", choices=["cxr_ddpm", "cheff", "daug", "attribution"],
                   help="cxr_ddpm: synthetic cohorts (Streiffer et al.); cheff: the cascaded latent diffusion (Weber et "
                        "al.); daug: classifier-guided heatmaps as input channels (Jin et al.); attribution: latent-"
                        "diffusion visual attribution by img2img healthy counterparts (Siddiqui et al.)")
    p.add_argument("--preset", choices=["tiny", "paper"], default="tiny",
                   help="tiny: a 2-core machine in <= 60 min; paper: the cluster configuration")
    p.add_argument("--workdir", default=None, help="phantoms, reports, summary.json (default reproduce_out/PAPER)")
    p.add_argument("--shards", default=None, help="URI for shards and models (default file://data_shards/PAPER)")
    p.add_argument("--n", type=int, default=None, help="phantom images (default: the preset's)")
    _add_config_args(p)

    p = sub.add_parser("explain", help="counterfactual explanations for a file or for the images of a shards URI")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--probe", required=True, help="probe directory written by `cxrray probe`")
    p.add_argument("--input", required=True, help="a DICOM/PNG file, or a shards URI (batch fan-out)")
    p.add_argument("--finding", action="append", required=True, help="target finding (repeatable)")
    p.add_argument("--output", required=True, help="output folder or URI")
    p.add_argument("--away", action="store_true", help="move away from the finding instead of toward it")
    p.add_argument("--split", default=None, help="shards input: only this split")
    p.add_argument("--limit", type=int, default=None, help="shards input: at most this many images (seeded)")
    p.add_argument("--encodings", default=None, help="shards input: plan from these encodings, no shard read "
                                                     "(default: the probe's, when they encode exactly the input)")
    _add_config_args(p)

    p = sub.add_parser("attribute", help="where is the finding: attribution maps for a file or the images of a "
                                         "shards URI (PNG, overlay PNG, overlay DICOM, JSON each)")
    p.add_argument("--method", required=True, help="gradcam | integrated-gradients (--checkpoint: a classifier folder "
                   "from `cxrray classifier`) | counterfactual (--checkpoint: DiffChest, --probe) | reconstruction | "
                   "attribution | empty-prompt (--checkpoint: a report-conditioned latent diffusion model) | guided "
                   "(DAug: --checkpoint a pixel DDPM, --classifier)")
    p.add_argument("--checkpoint", required=True, help="the method's model (see --method)")
    p.add_argument("--probe", default=None, help="probe directory (`cxrray probe`): the counterfactual method")
    p.add_argument("--classifier", default=None, help="`cxrray evaluate noisy-classifier` folder: the guided method")
    p.add_argument("--data", required=True, help="a DICOM/PNG file, or a shards URI (batch fan-out)")
    p.add_argument("--finding", action="append", required=True, help="finding to localise (repeatable)")
    p.add_argument("--output", required=True, help="output folder or URI")
    p.add_argument("--split", default=None, help="shards input: only this split")
    p.add_argument("--limit", type=int, default=None, help="shards input: at most this many images (seeded)")
    p.add_argument("--encodings", default=None, help="shards input: plan from these encodings (no shard read)")
    _add_config_args(p)

    p = sub.add_parser("augment", help="DAug: the shards again with heatmap channels (classifier-guided translation)")
    p.add_argument("--ddpm", required=True, help="pixel DDPM checkpoint (the shards' image size)")
    p.add_argument("--classifier", required=True, help="`cxrray evaluate noisy-classifier` output folder")
    p.add_argument("--data", required=True, help="shards URI")
    p.add_argument("--output", required=True, help="output shards URI")
    _add_config_args(p)

    p = sub.add_parser("dreambooth", help="the attribution paper's fine-tune: DreamBooth with prior preservation on "
                                          "class prompts (dreambooth.* settings), stage by stage on Ray Train")
    p.add_argument("--checkpoint", required=True, help="report-conditioned latent diffusion checkpoint (the base)")
    p.add_argument("--data", required=True, help="latent shards made by its autoencoder and tokenizer (`cxrray latents`)")
    p.add_argument("--output", required=True, help="output URI: each stage's data and run, dreambooth.json")
    _add_config_args(p)

    p = sub.add_parser("classifier", help="train the finding classifier that Grad-CAM / integrated gradients explain")
    p.add_argument("--data", required=True, help="shards URI (its train and val splits; saliency.* settings)")
    p.add_argument("--output", required=True, help="folder: classifier.safetensors + classifier.json")
    _add_config_args(p)

    p = sub.add_parser("audit", help="confounder audit: what counterfactuals toward a finding drag along")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--probe", required=True)
    p.add_argument("--data", required=True, help="shards URI")
    p.add_argument("--finding", action="append", required=True, help="finding to audit (repeatable)")
    p.add_argument("--output", required=True, help="report folder")
    p.add_argument("--encodings", default=None, help="the probe's encodings URI: verdicts from cross-fitted, "
                                                     "bootstrapped, null-calibrated statistics (audit.statistics)")
    _add_config_args(p)

    p = sub.add_parser("probe", help="linear probe on encodings: fit per data fraction, evaluate with CIs, report")
    p.add_argument("--encodings", required=True, help="encodings URI (file:// or s3://) written by the encode job")
    p.add_argument("--output", required=True, help="local output directory: heads, metrics, tables, roc.png")
    p.add_argument("--fraction", type=float, action="append", default=None, metavar="F",
                   help="fraction of fit-split patients, in (0, 1] (repeatable; default probe.fractions)")
    _add_config_args(p)

    p = sub.add_parser("serve", help="HTTP API on Ray Serve: /v1/classify, /v1/explain, /v1/generate (Ctrl-C stops)")
    p.add_argument("--checkpoint", required=True, help="checkpoint or pretraining-output URI, or models:/NAME/VERSION")
    p.add_argument("--probe", default=None, help="probe head directory written by `cxrray probe` (path, file://, "
                   "s3://); needed for classify/explain, omit for a generative family (ddpm)")
    p.add_argument("--classifier", default=None, help="a noise-aware classifier folder (`cxrray evaluate noisy-"
                   "classifier`): a pixel DDPM then answers /v1/attribute with DAug's guided method")
    p.add_argument("--host", default=None, help="HTTP address (serve.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (serve.port; default 8000)")
    _add_config_args(p)

    p = sub.add_parser("demo", help="the main job on the embedded default: phantoms -> ingest -> pretrain -> report")
    p.add_argument("--n", type=int, default=1200)
    p.add_argument("--workdir", default="demo_out")
    p.add_argument("--output", default="file://data_shards/demo", help="shards URI")
    p.add_argument("--run", default="file://data_shards/demo-pretrain", help="pretraining output URI")
    _add_config_args(p)
    return parser


def cmd_config(args) -> int:
    print(load_config(args.config, args.overrides).model_dump_json(indent=1))
    return 0


def cmd_phantoms(args) -> int:
    from cxrray.data.phantom import generate

    overrides = list(args.overrides)
    if args.confounder:
        overrides.append(f"phantom.confounder={args.confounder}")
    if args.seed is not None:
        overrides.append(f"phantom.seed={args.seed}")
    cfg = load_config(args.config, overrides)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    step = max(1, args.n // 10)
    table = generate(args.n, args.out, cfg.phantom,
                     progress=lambda done, total: (done % step == 0 or done == total)
                     and print(f"[phantoms] {done}/{total}", flush=True))
    print(json.dumps({"images": len(table), "patients": int(table["patient"].nunique()),
                      "out": str(Path(args.out).resolve()), "labels": str(Path(args.out, "labels.csv").resolve())}))
    return 0


def cmd_ingest(args) -> int:
    from cxrray.data.ingest import ingest

    overrides = list(args.overrides) + ([f"ingest.size={args.size}"] if args.size else [])
    cfg = load_config(args.config, overrides)
    source, metadata = args.source, args.metadata
    if args.labels:
        if source and source != "folder":
            raise ConfigError("--labels is the folder source's CSV; do not combine it with --source")
        source, metadata = "folder", args.labels
    if source and not metadata:
        raise ConfigError(f"--source {source} needs --metadata FILE")
    manifest = ingest(args.input, args.output, cfg.ingest, source=source, metadata=metadata,
                      source_options=_parse_options(args.source_option))
    print(json.dumps(_summary(manifest, args.output)))
    return 0


def _summary(manifest: dict, uri: str) -> dict:
    return {"output": uri, "samples": manifest["samples"], "shards": len(manifest["shards"]),
            "rejected": manifest["rejected"], "rejects_by_reason": manifest["rejects_by_reason"],
            "splits": manifest["splits"], "findings": len(manifest["label_vocabulary"])}


def cmd_export(args) -> int:
    from cxrray.models.export import export_diffusers

    print(json.dumps(export_diffusers(args.checkpoint, args.output)))
    return 0


def cmd_deid(args) -> int:
    from cxrray.eval.deid import table
    from cxrray.pipelines.deid_report import deid_report

    truth = args.truth or str(Path(args.labels).parent / "report_truth.jsonl")
    cfg = load_config(args.config, args.overrides)
    result = deid_report(args.input, args.labels, truth, cfg.ingest, shards_uri=args.shards,
                         header_identifiers_too=not args.patterns_only)
    print(f"[deid] {result['reports']} reports, {result['mode']}\n{table(result)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("reports", "identifiers", "removed", "clinical_kept")}))
    return 0


def cmd_pretrain(args) -> int:
    from cxrray.train.pretrain import pretrain

    overrides = list(args.overrides) + ([f"train.images={args.images}"] if args.images else [])
    cfg = load_config(args.config, overrides)
    print(json.dumps(pretrain(cfg, args.data, args.output)))
    return 0


def cmd_status(args) -> int:
    from cxrray.train.pretrain import status_summary

    print(json.dumps(status_summary(args.output)))
    return 0


def cmd_sources(args) -> int:
    from cxrray.data.sources import load_source

    table = load_source(args.source, args.metadata, **_parse_options(args.source_option))
    print(json.dumps(table.summary(), sort_keys=True))
    return 0


def cmd_encode(args) -> int:
    from cxrray.pipelines.encode import encode

    overrides = list(args.overrides) + (["encode.invert=true"] if args.invert else [])
    overrides += [f"encode.invert_steps={args.invert_steps}"] if args.invert_steps else []
    index = encode(args.checkpoint, args.data, args.output, load_config(args.config, overrides).encode)
    print(json.dumps({k: index[k] for k in ("checkpoint", "rows", "z_dim", "invert_steps")} | {"output": args.output}))
    return 0


def cmd_latents(args) -> int:
    from cxrray.pipelines.latents import latents

    manifest = latents(args.vae, args.data, args.output, load_config(args.config, args.overrides).latents)
    print(json.dumps({"samples": manifest["samples"], "shape": manifest["latents"]["shape"],
                      "vocab_size": manifest["latents"]["vocab_size"], "output": args.output}))
    return 0


def _cohort_model(checkpoint: str):
    from cxrray.models.loading import checkpoint_config, model_identity

    model_identity(checkpoint, "generate")
    cfg = checkpoint_config(checkpoint)
    if not hasattr(cfg, "covariate_stats"):
        raise InputError(f"{checkpoint}: a {cfg.family} model has no covariates; cohorts need a covariate DDPM")
    return cfg


def cmd_cohort(args) -> int:
    from cxrray.pipelines.cohorts.spec import describe, describe_text, draw, load_spec

    model = _cohort_model(args.checkpoint)
    summary = describe(draw(load_spec(args.spec, args.n), model), model)
    print(describe_text(summary))
    print(json.dumps(summary))
    return 0


def cmd_generate(args) -> int:
    from cxrray.pipelines.cohorts.spec import load_spec
    from cxrray.pipelines.cheff.generate import generate_prompts, report_prompts
    from cxrray.pipelines.cohorts.generate import generate_cohort

    overrides = list(args.overrides) + [f"generate.{k}={v}" for k, v in
                                        (("steps", args.steps), ("sampler", args.sampler), ("guidance", args.guidance))
                                        if v is not None]
    cfg = load_config(args.config, overrides).generate
    if (args.prompts or args.prompts_from) and args.n_per_prompt < 1:
        raise InputError(f"--n-per-prompt must be >= 1, got {args.n_per_prompt}")
    if args.sr and args.cohort:
        raise InputError("--sr upscales a latent diffusion model's samples (with --prompts or --prompts-from)")
    if args.prompts_from:
        if args.max_prompts is not None and args.max_prompts < 1:
            raise InputError(f"--max-prompts must be >= 1, got {args.max_prompts}")
        prompts, sources, findings = report_prompts(args.prompts_from, args.split, args.max_prompts)
        manifest = generate_prompts(args.checkpoint, prompts, args.n_per_prompt, args.output, cfg, seed=args.seed,
                                    sr=args.sr, sources=sources, findings=findings)
    elif args.prompts:
        try:
            prompts = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise InputError(f"{args.prompts}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not prompts:
            raise InputError(f"{args.prompts}: no prompts (one per line; an empty line means unconditional)")
        manifest = generate_prompts(args.checkpoint, [" ".join(p.split()) for p in prompts], args.n_per_prompt,
                                    args.output, cfg, seed=args.seed, sr=args.sr)
    else:
        spec = load_spec(args.cohort, args.n)
        _cohort_model(args.checkpoint)
        manifest = generate_cohort(args.checkpoint, spec, args.output, cfg)
    print(json.dumps({"output": args.output, "samples": manifest["samples"], "shards": len(manifest["shards"]),
                      "positives": manifest["positives"]}))
    return 0


def cmd_experiment(args) -> int:
    from cxrray.pipelines.cohorts.experiment import run_experiment

    overrides = list(args.overrides) + ([f"experiment.seeds={args.seeds}"] if args.seeds else [])
    overrides += [f"experiment.arms=[{args.arms}]"] if args.arms else []
    metrics = run_experiment(args.real, args.synthetic, args.output, load_config(args.config, overrides))
    composite = metrics["overall"]["findings"]["composite_slvh_dlv"]
    print(json.dumps({"output": args.output, "composite_auroc": {a: composite[a]["auroc"]["value"] for a in composite},
                      "p_vs_base": {a: composite[a]["auroc"].get("p_value") for a in composite if a != "base"},
                      "young_lift": metrics["young_lift"], "mlflow_run_id": metrics["mlflow_run_id"]}))
    return 0


def cmd_audit_synthetic(args) -> int:
    from cxrray.pipelines.cohorts.synthetic_audit import run_synthetic_audit

    audit = run_synthetic_audit(args.synthetic, args.train, args.output, load_config(args.config, args.overrides),
                                test_uri=args.test, features_model=args.features_model)
    print(json.dumps({"output": args.output, "fidelity": audit["fidelity"], "memorisation": audit["memorisation"],
                      "fid": {k: v["fid"] for k, v in audit["quality"]["judge_features"].items()}}))
    return 0


def cmd_evaluate(args) -> int:
    if args.evaluate_command == "noisy-classifier":
        from cxrray.pipelines.daug.noisy_classifier import run_noisy_classifier

        result = run_noisy_classifier(args.data, args.output, load_config(args.config, args.overrides),
                                      checkpoint=args.checkpoint)
        print(json.dumps({"output": args.output, "average_precision": result["average_precision"]}))
        return 0
    if args.evaluate_command == "daug":
        from cxrray.pipelines.daug.downstream import run_downstream, table_rows

        result = run_downstream(args.data, args.output, load_config(args.config, args.overrides))
        print(json.dumps({"output": args.output, "arms": {f"{r['fraction']}/{r['arm']}": {
            k: r[k] for k in ("macro AUROC", "mAP@10", "Recall@1")} for r in table_rows(result)}}))
        return 0
    if args.evaluate_command == "localisation":
        from cxrray.benchmarks.localisation import run_localisation, table_rows

        result = run_localisation(args.data, args.output, load_config(args.config, args.overrides),
                                  checkpoint=args.checkpoint, probe=args.probe, ldm=args.ldm, ddpm=args.ddpm,
                                  classifier=args.classifier)
        print(json.dumps({"output": args.output, "pixel_auroc": {f"{r['finding']}/{r['method']}": r["pixel AUROC"]
                                                                 for r in table_rows(result)}}))
        return 0
    if args.evaluate_command == "img2img":
        from cxrray.benchmarks.img2img import run_img2img_study

        result = run_img2img_study(args.data, args.output, load_config(args.config, args.overrides), args.ldm, args.judge,
                                   base_ldm=args.base_ldm)
        print(json.dumps({"output": args.output, "ablation": {r["set"]: r["FID to real healthy"] for r in result["ablation"]},
                          "induction": {r["induce"]: r["P after"] for r in result["induction"]}}))
        return 0
    from cxrray.pipelines.cheff.evaluate import run_generation_eval

    result = run_generation_eval(args.ldm, args.data, args.output, load_config(args.config, args.overrides), sr=args.sr,
                                 sr_base=args.sr_base, features_model=args.features_model)
    print(json.dumps({"output": args.output, "table2": result["table2"], "device_removal": result["device_removal"],
                      "auroc": {r["label"]: r.get("auroc_generated") for r in result["conditioning"]},
                      "ldm_auroc": {r["label"]: r.get("auroc_generated") for r in result["ldm"]["conditioning"]},
                      "ldm_latent_std_ratio": result["ldm"]["latent_std"]["ratio"]}))
    return 0


def cmd_reproduce(args) -> int:
    from cxrray.pipelines.cheff.reproduce import CHEFF_PRESETS, reproduce_cheff
    from cxrray.pipelines.cohorts.reproduce import PRESETS, reproduce_cxr_ddpm

    workdir = Path(args.workdir or f"reproduce_out/{args.paper}")
    shards = (args.shards or f"file://data_shards/{args.paper}").rstrip("/")
    if args.paper == "cheff":
        preset = CHEFF_PRESETS[args.preset]
        _phantom_salt(load_config(args.config or args.preset, preset["common"] + list(args.overrides)), "reproduce")
        summary = reproduce_cheff(args.config or args.preset, list(args.overrides), preset, workdir,
                                  args.n or preset["n"], shards)
        e = summary["evaluation"]
        print(json.dumps({"report": str(workdir / "reproduce.html"), "table2": e["table2"],
                          "auroc": {r["label"]: r.get("auroc_generated") for r in e["conditioning"]},
                          "ldm_auroc": {r["label"]: r.get("auroc_generated") for r in e["ldm"]["conditioning"]},
                          "ldm_latent_std_ratio": e["ldm"]["latent_std"]["ratio"], "sr_start_sweep": e["sr_start_sweep"],
                          "laterality": {r["label"]: r.get("accuracy_generated") for r in e["laterality"]},
                          "device_removed": e["device_removal"]["removed_fraction"], "seconds": summary["seconds"]}))
        return 0
    if args.paper == "attribution":
        from cxrray.pipelines.attribution.reproduce import PRESETS as ATTRIBUTION_PRESETS, reproduce_attribution

        preset = ATTRIBUTION_PRESETS[args.preset]
        _phantom_salt(load_config(args.config or args.preset, preset["common"] + list(args.overrides)), "reproduce")

        def localise(c, data, output, ldm):
            from cxrray.benchmarks.localisation import run_localisation

            return run_localisation(data, output, c, ldm=ldm)

        def study(c, data, output, ldm, judge, base):
            from cxrray.benchmarks.img2img import run_img2img_study

            return run_img2img_study(data, output, c, ldm, judge, base_ldm=base)

        summary = reproduce_attribution(args.config or args.preset, list(args.overrides), preset, workdir,
                                        args.n or preset["n"], shards, localise, study)
        print(json.dumps({"report": str(workdir / "reproduce.html"), "pixel_auroc": {
            f"{model}/{f}/{m}": v["pixel_auroc"]["mean"] for model, r in summary["localisation"].items()
            for f, per in r["findings"].items() for m, v in per["methods"].items()},
            "ablation_fid": {r["set"]: r["FID to real healthy"] for r in summary["img2img"]["ablation"]},
            "seconds": summary["seconds"]}))
        return 0
    if args.paper == "daug":
        from cxrray.benchmarks.localisation import table_rows as localisation_rows
        from cxrray.pipelines.daug.reproduce import PRESETS as DAUG_PRESETS, reproduce_daug

        preset = DAUG_PRESETS[args.preset]
        cfg = load_config(args.config or args.preset, preset["overrides"] + list(args.overrides))
        _phantom_salt(cfg, "reproduce")
        def localise(c, data, output, ddpm, classifier):
            from cxrray.benchmarks.localisation import run_localisation

            return run_localisation(data, output, c, ddpm=ddpm, classifier=classifier)

        summary = reproduce_daug(cfg, workdir, args.n or preset["n"], shards, localise)
        print(json.dumps({"report": str(workdir / "reproduce.html"),
                          "ap_by_t": {r["super_class"]: {k: v for k, v in r.items() if k.startswith("ap_t")}
                                      for r in summary["noisy_classifier"]},
                          "pixel_auroc": {f"{r['finding']}/{r['method']}": r["pixel AUROC"]
                                          for r in localisation_rows(summary["localisation"])},
                          "seconds": summary["seconds"]}))
        return 0
    preset = PRESETS[args.preset]
    cfg = load_config(args.config or args.preset, preset["overrides"] + list(args.overrides))
    _phantom_salt(cfg, "reproduce")
    summary = reproduce_cxr_ddpm(cfg, workdir, args.n or preset["n"], shards, sweep=preset.get("guidance_sweep"))
    composite = summary["experiment"]["auroc"]["composite_slvh_dlv"]
    lvidd = {name: f["lvidd"]["of_ceiling"] for name, f in
             {"cohort": summary["audit"]["fidelity"], **summary["audit"]["guidance_sweep"]}.items()}
    print(json.dumps({"report": str(workdir / "reproduce.html"),
                      "composite_auroc": {a: v["value"] for a, v in composite.items()},
                      "young_lift": summary["experiment"]["young_lift"], "lvidd_r_of_ceiling": lvidd}))
    return 0


def cmd_explain(args) -> int:
    from cxrray.pipelines.diffchest.explain import explain

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(explain(args.checkpoint, args.probe, args.input, args.finding, args.output, cfg,
                             split=args.split, limit=args.limit, toward=-1 if args.away else 1,
                             encodings=args.encodings), indent=1))
    return 0


def cmd_attribute(args) -> int:
    from cxrray.attribute.job import attribute
    from cxrray.attribute.methods import method_name

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    cfg = load_config(args.config, args.overrides)
    method = method_name(args.method)
    companion = args.classifier if method == "guided" else args.probe  # the second model the method needs
    print(json.dumps(attribute(method, args.checkpoint, companion, args.data, args.finding,
                               args.output, cfg, split=args.split, limit=args.limit, encodings=args.encodings),
                     indent=1))
    return 0


def cmd_dreambooth(args) -> int:
    from cxrray.pipelines.attribution.dreambooth import dreambooth

    record = dreambooth(args.checkpoint, args.data, args.output, load_config(args.config, args.overrides))
    print(json.dumps({"checkpoint": record["checkpoint"], "stages": [
        {k: s[k] for k in ("name", "instances", "checkpoint", "loss")} for s in record["stages"]]}))
    return 0


def cmd_augment(args) -> int:
    from cxrray.pipelines.daug.augment import augment

    manifest = augment(args.ddpm, args.classifier, args.data, args.output, load_config(args.config, args.overrides).augment)
    print(json.dumps({"output": args.output, "samples": manifest["samples"], "members": manifest["members"]}))
    return 0


def cmd_classifier(args) -> int:
    from cxrray.pipelines.saliency.classifier import save_classifier, train_classifier
    from cxrray.pipelines.truth import load_truth

    cfg = load_config(args.config, args.overrides)
    train = load_truth(args.data, cfg.localisation.train_split, cfg.localisation.train_images, need_masks=False)
    val = load_truth(args.data, cfg.localisation.val_split, None, need_masks=False)
    net, record = train_classifier(train, val, cfg.saliency)
    save_classifier(net, record, args.output)
    print(json.dumps({"output": args.output, "val_auroc": record["val_auroc"], "best_epoch": record["best_epoch"]}))
    return 0


def cmd_audit(args) -> int:
    from cxrray.pipelines.diffchest.audit import audit

    result = audit(args.checkpoint, args.probe, args.data, args.finding, Path(args.output),
                   load_config(args.config, args.overrides), encodings=args.encodings)
    print(json.dumps({f: {"top": r["candidates"][:3], "flagged": r["flagged"]} for f, r in result["findings"].items()},
                     indent=1))
    return 0


def cmd_probe(args) -> int:
    from cxrray.pipelines.diffchest.probe import run_probe

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(run_probe(args.encodings, Path(args.output), cfg, args.fraction), indent=1))
    return 0


def _phantom_salt(cfg, command: str) -> None:
    """Commands that ingest only their own phantoms may use a fixed salt when none is set."""
    if not os.environ.get(cfg.ingest.salt_env) and cfg.ingest.salt is None:
        print(f"[{command}] {cfg.ingest.salt_env} not set: using a fixed demo salt (phantoms carry no real identities)")
        os.environ[cfg.ingest.salt_env] = DEMO_SALT


def cmd_demo(args) -> int:
    from cxrray.demo import run_demo

    cfg = load_config(args.config, DEMO_OVERRIDES + list(args.overrides))
    _phantom_salt(cfg, "demo")
    summary = run_demo(cfg, n=args.n, workdir=Path(args.workdir), shards=args.output, run=args.run)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_serve(args) -> int:
    from cxrray.serve.app import run_server

    overrides = list(args.overrides) + ([f"serve.host={args.host}"] if args.host else []) + (
        [f"serve.port={args.port}"] if args.port else [])
    return run_server(args.checkpoint, args.probe, load_config(args.config, overrides), args.classifier)


COMMANDS = {"config": cmd_config, "phantoms": cmd_phantoms, "ingest": cmd_ingest, "sources": cmd_sources, "deid": cmd_deid, "export": cmd_export,
            "pretrain": cmd_pretrain, "status": cmd_status, "demo": cmd_demo,
            "probe": cmd_probe, "encode": cmd_encode, "latents": cmd_latents, "explain": cmd_explain, "audit": cmd_audit,
            "attribute": cmd_attribute, "classifier": cmd_classifier, "augment": cmd_augment, "dreambooth": cmd_dreambooth,
            "cohort": cmd_cohort, "generate": cmd_generate, "experiment": cmd_experiment, "audit-synthetic": cmd_audit_synthetic, "evaluate": cmd_evaluate,
            "reproduce": cmd_reproduce,
            "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, InputError, FileNotFoundError, NotADirectoryError) as err:
        # what the user gave is wrong: say what and where; any other exception is a bug (exit 1, traceback)
        print(f"cxrray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
