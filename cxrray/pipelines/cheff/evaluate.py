"""`cxrray evaluate generation`: the Cheff cascade measured as the paper does, and what it shows only as pictures.

- Table 2 analogue on real test images (MSE / PSNR / SSIM against the original at each stage's output size):
  the autoencoder alone, D(E(x)); SR alone (each SR model given: base, fine-tuned) from the image at the
  latent model's size; the cascade SR(D(E(x))); plain bicubic upscaling of the same input.
- A judge (conv trunk + one logit per label, and one per lateral label for its side) trained on the real
  training split reads findings, devices and the side a report gives them (cxrray.eval.laterality), every
  image resized to `judge_size`; its trunk is the feature space of FID / KID (torchmetrics; Inception only
  from a local TorchScript file).
- One sample per test-split report (its de-identified text as the prompt) and unconditional samples:
  FID / KID against real test images (real train vs test as the floor); MS-SSIM between random pairs
  (diversity; real test pairs as the reference); per label, the judge's AUROC on report-conditioned
  samples against the label of the report's own image (bootstrap CI; the judge on real test images is
  the ceiling); unconditional samples' judged prevalence against the judge's count on real test images
  and the real labels (Wilson CIs); per lateral label, laterality accuracy: the judged side of samples whose
  prompt gives the label one side, against that side (Wilson CI; the judge on real test images is the ceiling).
- Device removal on phantoms: the device's pixels (where the same phantom rendered without it differs),
  grown by `inpaint_dilate`, inpainted without a prompt; mean |error| inside the mask against the device-free
  render, for the inpainted image and for the original; PSNR outside the mask against the original, beside
  D(E(x))'s (the autoencoder's floor: the whole latent is decoded).

Output (URI; also logged to MLflow, run "evaluate-generation"): generation_eval.json, report.html,
samples.png, inpainting.png, outpainting.png.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxrray.data.imaging import decode_png16, png16_to_model
from cxrray.data.shards import jsonable, read_manifest, read_tar
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.eval import html
from cxrray.eval.laterality import side_targets
from cxrray.eval.reconstruction import reconstruction_metrics
from cxrray.families import Generated
from cxrray.families.sr.network import resize
from cxrray.pipelines.cheff.cascade import Cheff
from cxrray.pipelines.settings import GenerationEvalConfig
from cxrray.pipelines.judges import FindingJudge, ScriptedFeatures, apply_batched, image_quality, masked_bce, train_epochs

#: the paper's Table 2 (256² test set; SR 256 -> 1024) and generation figures, quoted beside ours
PAPER = {"autoencoder": {"mse": 0.0005, "psnr": 36.80, "ssim": 0.9926}, "sr_base": {"psnr": 24.59},
         "sr_fine_tuned": {"psnr": 26.09}, "fid": 11.58, "kid": 0.0099, "pixel_cascade_fid": 46.54,
         "pixel_cascade_kid": 0.0530}
REPORT_TARGETS = ("effusion", "cardiomegaly", "chest_tube", "pacemaker")  # the AUROC >= 0.8 labels


class RealSet:
    """A split of real shards: images float32 [N, 1, S, S] in [-1, 1], labels float [N, F] (NaN unknown),
    sides float [N, L] (1 right, 0 left, NaN: the report gives the label no single side), de-identified
    reports and keys, in sample-key order."""

    def __init__(self, uri: str, split: str, size: int, laterality: dict[str, list[str]], limit: int | None = None):
        store = Storage(uri)
        manifest = read_manifest(store)
        self.findings = list(manifest.get("label_vocabulary", []))
        rows = sorted((meta["key"], png, meta) for s in manifest["shards"] if s.get("splits", {}).get(split)
                      for _, png, meta in read_tar(store.read_bytes(s["name"]), s["name"]) if meta.get("split") == split)
        rows = rows[:limit] if limit else rows
        if not rows:
            raise InputError(f"{uri} has no {split!r} samples")
        images = torch.from_numpy(np.stack([png16_to_model(decode_png16(png)) for _, png, _ in rows]))[:, None]
        if images.shape[-1] < size:
            raise InputError(f"{uri} holds {images.shape[-1]}² images; this evaluation needs at least {size}²")
        self.images = resize(images, size)
        self.labels = np.array([[np.nan if v is None else v for v in m.get("labels", [])] or [np.nan] * len(self.findings)
                                for _, _, m in rows], dtype=np.float32).reshape(len(rows), len(self.findings))
        self.reports = [" ".join((m.get("report") or "").split()) for _, _, m in rows]
        self.keys = [k for k, _, _ in rows]
        self.sides = side_targets(self.reports, laterality)


def train_judge(train: RealSet, val: RealSet, cfg: GenerationEvalConfig,
                progress=lambda line: None) -> tuple[FindingJudge, dict]:
    """The judge at its best validation loss (early stopping), and its training record; a progress line per epoch."""
    torch.manual_seed(cfg.seed)
    judge = FindingJudge(len(train.findings) + train.sides.shape[1], cfg.width, cfg.judge_size)
    targets = lambda s: torch.from_numpy(np.concatenate([s.labels, s.sides], axis=1))  # noqa: E731
    data = {"image": train.images, "labels": targets(train)}
    val_labels = targets(val)

    def validate(net) -> float:
        net.eval()
        return float(masked_bce(apply_batched(net, val.images), val_labels))

    start = time.perf_counter()

    def report(m: dict) -> None:
        per_epoch = (time.perf_counter() - start) / m["epoch"]
        progress(f"[evaluate generation] judge epoch {m['epoch']}/{cfg.epochs}: val BCE {m['val_nll']:.4f} (best "
                 f"{m['best_val_nll']:.4f} at {m['best_epoch']}), {per_epoch:.0f} s/epoch, "
                 f"at most {per_epoch * (cfg.epochs - m['epoch']):.0f} s left")

    state, best, epoch, history = train_epochs(judge, judge, data, lambda m, b: masked_bce(m(b["image"]), b["labels"]),
                                               validate, cfg, cfg.seed, report=report)
    judge.load_state_dict(state)
    return judge.eval(), {"best_epoch": epoch, "best_val_bce": best, "epochs_run": len(history)}


def ms_ssim(images: torch.Tensor, pairs: int, seed: int) -> dict:
    """Mean MS-SSIM over random distinct pairs (lower: more diverse). Scales: as many of MS-SSIM's five as
    the image size allows with a 3-pixel window (small images), weights renormalised."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

    rng = np.random.default_rng(seed)
    n = len(images)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    size = images.shape[-1]
    scales = max(1, min(5, int(np.log2(size)) - 2))  # torchmetrics' limit at kernel 3: 16² -> 2, 128² -> 5
    weights = tuple(float(b) / sum(betas[:scales]) for b in betas[:scales])
    a, b = (images[i].float() + 1) / 2, (images[j].float() + 1) / 2
    values = msssim(a, b, data_range=1.0, kernel_size=3, betas=weights, reduction="none")
    return {"ms_ssim": float(values.mean()), "sd": float(values.std()), "pairs": int(pairs), "scales": scales}


def _wilson(k: int, n: int) -> list[float]:
    from statsmodels.stats.proportion import proportion_confint

    return [float(v) for v in proportion_confint(k, n, method="wilson")] if n else [float("nan")] * 2


def conditioning(findings: list[str], p_cond: np.ndarray, source_labels: np.ndarray, p_real: np.ndarray,
                 test: RealSet, p_unc: np.ndarray, cfg: GenerationEvalConfig) -> list[dict]:
    """Per label: AUROC of the judge (probabilities [N, labels + sides] of the report-conditioned samples, real
    test images, unconditional samples) against the report's own label (and on the real test images), and
    prevalence judged among unconditional samples vs real test (Wilson CIs)."""
    from sklearn.metrics import roc_auc_score

    from cxrray.eval.stats import bootstrap_ci

    rows = []
    for f, name in enumerate(findings):
        y_src, y_real = source_labels[:, f], test.labels[:, f]
        known, known_real = ~np.isnan(y_src), ~np.isnan(y_real)
        pos, pos_real = int(y_src[known].sum()), int(y_real[known_real].sum())
        row = {"label": name, "prompts_with": pos, "prompts_without": int(known.sum()) - pos}
        if min(pos, int(known.sum()) - pos, pos_real, int(known_real.sum()) - pos_real) < cfg.min_positives:
            rows.append({**row, "note": "too few positives or negatives to judge"})
            continue
        auc = float(roc_auc_score(y_src[known], p_cond[known, f]))
        ci = bootstrap_ci(y_src[known], p_cond[known, f], n_boot=500, seed=cfg.seed)
        k_unc, k_judged_real = int((p_unc[:, f] > 0.5).sum()), int((p_real[known_real, f] > 0.5).sum())
        rows.append({**row, "auroc_generated": auc, "auroc_ci": list(ci),
                     "auroc_real": float(roc_auc_score(y_real[known_real], p_real[known_real, f])),
                     "prevalence_unconditional": k_unc / len(p_unc), "prevalence_unconditional_ci": _wilson(k_unc, len(p_unc)),
                     "prevalence_judged_real": k_judged_real / int(known_real.sum()),
                     "prevalence_real": pos_real / int(known_real.sum()),
                     "prevalence_real_ci": _wilson(pos_real, int(known_real.sum()))})
    return rows


def laterality(findings: list[str], p_cond: np.ndarray, prompt_sides: np.ndarray, p_real: np.ndarray,
               test: RealSet, train: RealSet, cfg: GenerationEvalConfig) -> list[dict]:
    """Per lateral label: accuracy of the judged side of samples whose prompt gives the label one side, and of
    real test images whose report does (Wilson CIs); judged only with `min_positives` of each side in train.
    `accuracy_majority` is what always answering the training split's commoner side scores on the same prompts
    (pacemakers are mostly left: a judge that ignores the image can look accurate)."""
    side_cond, side_real = p_cond[:, len(findings):] > 0.5, p_real[:, len(findings):] > 0.5
    rows = []
    for j, name in enumerate(cfg.laterality):
        stated, stated_real, in_train = ~np.isnan(prompt_sides[:, j]), ~np.isnan(test.sides[:, j]), train.sides[:, j]
        row = {"label": name, "prompts_right": int((prompt_sides[stated, j] == 1).sum()),
               "prompts_left": int((prompt_sides[stated, j] == 0).sum()),
               "train_right": int((in_train == 1).sum()), "train_left": int((in_train == 0).sum())}
        if min(row["train_right"], row["train_left"]) < cfg.min_positives or not stated.any():
            rows.append({**row, "note": "too few sided reports to learn or judge the side"})
            continue
        hit = int((side_cond[stated, j] == (prompt_sides[stated, j] == 1)).sum())
        majority = 1.0 if row["train_right"] >= row["train_left"] else 0.0
        hit_real = int((side_real[stated_real, j] == (test.sides[stated_real, j] == 1)).sum())
        rows.append({**row, "accuracy_generated": hit / int(stated.sum()), "accuracy_ci": _wilson(hit, int(stated.sum())),
                     "accuracy_majority": float((prompt_sides[stated, j] == majority).mean()),
                     "accuracy_real": hit_real / max(int(stated_real.sum()), 1), "real_sided": int(stated_real.sum())})
    return rows


def _auroc_summary(measured: dict) -> dict:
    """One sweep row: FID / KID against real test images and the judged AUROC per label."""
    q = measured["quality"]["synthetic_vs_test"]
    return {"fid": q["fid"], "kid": q["kid"],
            **{f"auroc_{r['label']}": r["auroc_generated"] for r in measured["conditioning"] if "auroc_generated" in r}}


def device_phantoms(cfg: GenerationEvalConfig, size: int, fit: str) -> list[dict]:
    """`inpaint_cases` phantoms with one of `inpaint_devices`: the ingest-decoded image, the same phantom
    without the device mapped through the same intensity transform, and the device's mask, all at `size`."""
    from cxrray.data.dicom import decode_file
    from cxrray.data.imaging import fit_square, model_input
    from cxrray.data.phantom import PhantomConfig
    from cxrray.data.phantom.cases import sample_case
    from cxrray.data.phantom.dicom import write_dicom
    from cxrray.data.phantom.drawing import render
    from cxrray.data.phantom.masks import THRESHOLD, counterpart
    from cxrray.data.settings import DecodeConfig
    from cxrray.eval.localisation import dilate

    pcfg = PhantomConfig(size=max(64, 2 * size), seed=cfg.seed + 7919)
    cases, index = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        while len(cases) < cfg.inpaint_cases and index < 200 * cfg.inpaint_cases:
            case, index = sample_case(index, pcfg), index + 1
            device = next((d for d in cfg.inpaint_devices if case.labels.get(d)), None)
            if device is None:
                continue
            with_device, without = render(case, pcfg), render(counterpart(case, device), pcfg)
            changed = np.abs(with_device - without) > THRESHOLD
            if not changed.any():
                continue
            path = Path(tmp) / f"{index}.dcm"
            write_dicom(case, with_device, path, pcfg)
            decoded = decode_file(path.read_bytes(), DecodeConfig()).pixels
            order = np.argsort(with_device, axis=None)  # ingest's intensity map, applied to the device-free render
            clean = np.where(changed, np.interp(without, with_device.ravel()[order], decoded.ravel()[order]), decoded)
            mask = fit_square(changed.astype(np.float32), size, fit) > 0.05
            cases.append({"device": device, "image": model_input(decoded, size, fit),
                          "clean": model_input(clean.astype(np.float32), size, fit),
                          "mask": dilate(mask[None], cfg.inpaint_dilate)[0]})
    if not cases:
        raise InputError(f"no phantom with {cfg.inpaint_devices} in {index} cases")
    return cases


def _psnr_where(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    mse = float((((a - b) / 2.0) ** 2)[where].mean())  # [-1, 1] -> unit range
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def device_removal(cheff: Cheff, cases: list[dict], cfg: GenerationEvalConfig) -> tuple[dict, dict]:
    """Inpaint each phantom's device (unconditional) and outpaint around a central box; measures and images."""
    image = torch.from_numpy(np.stack([c["image"] for c in cases]))[:, None]
    clean = np.stack([c["clean"] for c in cases])
    mask = np.stack([c["mask"] for c in cases])
    painted = torch.cat([cheff.inpaint(image[i:i + cfg.batch_size], torch.from_numpy(mask[i:i + cfg.batch_size, None])
                                       .float(), seed=cfg.seed + i, steps=cfg.steps).images
                         for i in range(0, len(cases), cfg.batch_size)])
    recon = cheff.reconstruct(image)
    x, p, r = image[:, 0].numpy(), painted[:, 0].clamp(-1, 1).numpy(), recon[:, 0].clamp(-1, 1).numpy()
    inside = [float(np.abs(p[i] - clean[i])[mask[i]].mean()) for i in range(len(cases))]
    before = [float(np.abs(x[i] - clean[i])[mask[i]].mean()) for i in range(len(cases))]
    result = {"cases": len(cases), "devices": {d: sum(c["device"] == d for c in cases) for d in cfg.inpaint_devices},
              "mask_fraction": float(mask.mean()),
              "error_inside_inpainted": float(np.mean(inside)), "error_inside_original": float(np.mean(before)),
              "removed_fraction": float(1 - np.mean(inside) / max(np.mean(before), 1e-8)),
              "cases_improved": int(sum(a < b for a, b in zip(inside, before))),
              "psnr_outside_inpainted": float(np.mean([_psnr_where(p[i], x[i], ~mask[i]) for i in range(len(cases))])),
              "psnr_outside_autoencoder": float(np.mean([_psnr_where(r[i], x[i], ~mask[i]) for i in range(len(cases))]))}
    keep = torch.zeros_like(image)
    s = image.shape[-1]
    keep[..., s // 4: 3 * s // 4, s // 4: 3 * s // 4] = 1
    shown = min(8, len(cases))
    outpainted = cheff.outpaint(image[:shown], keep[:shown], seed=cfg.seed, steps=cfg.steps).images
    grids = {"inpainting": [image[:shown], torch.from_numpy(mask[:shown, None]).float() * 2 - 1, painted[:shown],
                            torch.from_numpy(clean[:shown, None])],
             "outpainting": [image[:shown], keep[:shown] * 2 - 1, outpainted]}
    return result, grids


def _seed(cfg: GenerationEvalConfig, batch: int, conditional: bool) -> int:
    """Each batch's own seed (the latent model draws from it, SR3 from `stage_generator(seed, 1)`)."""
    return cfg.seed * 100_003 + batch + (0 if conditional else 50_000)


def _batched(what: str, n: int, cfg: GenerationEvalConfig, progress, make) -> torch.Tensor:
    """torch.cat of make(batch index, slice) over batches of `batch_size`, with a rate / ETA line per batch."""
    out, start = [], time.perf_counter()
    for b, i in enumerate(range(0, n, cfg.batch_size)):
        out.append(make(b, slice(i, min(i + cfg.batch_size, n))))
        done = min(i + cfg.batch_size, n)
        rate = done / (time.perf_counter() - start)
        progress(f"[evaluate generation] {what}: {done}/{n} images, {rate:.2f} img/s, ETA {(n - done) / rate:.0f} s")
    return torch.cat(out)


def sample_latents(cheff: Cheff, prompts: list[str | None], cfg: GenerationEvalConfig, guidance: float,
                   progress) -> torch.Tensor:
    """The latent model's samples [N, C, s, s], one per prompt (None: unconditional), seeded per batch."""
    conditional = any(p is not None for p in prompts)

    def make(b, rows):
        chunk = prompts[rows]
        prompt = ["" if p is None else p for p in chunk] if conditional else None
        return cheff.sample_latents(prompt, n=len(chunk), seed=_seed(cfg, b, conditional), steps=cfg.steps,
                                    guidance=guidance)

    return _batched(f"latent model, {'report-conditioned' if conditional else 'unconditional'}, guidance {guidance:g}",
                    len(prompts), cfg, progress, make)


def upscale_samples(cheff: Cheff, low: torch.Tensor, cfg: GenerationEvalConfig, start: float, conditional: bool,
                    progress) -> torch.Tensor:
    """The cascade's last stage on the latent model's decoded samples (each batch's SR noise its own)."""
    def make(b, rows):
        return cheff.upscale_generated(Generated(low[rows], ""), _seed(cfg, b, conditional), cfg.sr_steps, start).images

    return _batched(f"SR3 from {start:g} T", len(low), cfg, progress, make).clamp(-1, 1)


LDM_TIMESTEPS = (50, 250, 500, 750, 894, 980)  # 894 / 980: the first DDIM step at 150 / 50 steps
SR_TIMESTEPS = (100, 500, 1000, 1500, 1900, 1980)


def denoising_by_stage(cheff: Cheff, real_out: torch.Tensor, real_latents: torch.Tensor, with_report: list[int],
                       prompts: list[str], cfg: GenerationEvalConfig) -> dict:
    """Each stage's noise and clean-estimate errors per timestep on real test data (`denoising_error`): the
    latent model on the test images' latents under their own reports, SR3 on the test images given their
    bicubic down-sample. Where the clean estimate's error grows is where sampling from noise goes wrong."""
    from cxrray.diffusion.diagnostics import denoising_error
    from cxrray.families.ldm.task import prompt_ids

    rows = with_report[:cfg.batch_size]
    model = cheff.ldm.model
    context = model.context(prompt_ids(model, prompts[:len(rows)]), len(rows))
    out = {"ldm": denoising_error(model, real_latents[rows], context, list(LDM_TIMESTEPS), cfg.seed)}
    if cheff.sr is not None:
        high = real_out[:cfg.batch_size]
        out["sr"] = denoising_error(cheff.sr.model, high, resize(high, cheff.image_size), list(SR_TIMESTEPS), cfg.seed)
    return out


def sr_start_sweep(cheff: Cheff, real_out: torch.Tensor, cfg: GenerationEvalConfig, progress) -> list[dict]:
    """PSNR / SSIM of the SR model alone (real images at the latent model's size -> the output size) per start
    in `sr_starts`, beside bicubic upscaling: where SR3 starting from the noised bicubic upsample wins."""
    low = resize(real_out, cheff.image_size)
    rows = [{"start": "bicubic", **reconstruction_metrics(real_out, resize(low, cheff.output_size))}]
    for start in cfg.sr_starts:
        up = _batched(f"SR start sweep at {start:g} T", len(low), cfg, progress,
                      lambda b, r: cheff.upscale(low[r], seed=cfg.seed + b, steps=cfg.sr_steps, start=start).images)
        rows.append({"start": start, **reconstruction_metrics(real_out, up)})
    return rows


def table2(cheff: Cheff, sr_base: Cheff | None, real_out: torch.Tensor, cfg: GenerationEvalConfig,
           progress=lambda line: None) -> list[dict]:
    """MSE / PSNR / SSIM of each stage against the originals (module doc); a progress line per row."""
    low = resize(real_out, cheff.image_size)
    recon = cheff.reconstruct(low)
    rows = [{"stage": "autoencoder alone: D(E(x))", "size": cheff.image_size, **reconstruction_metrics(low, recon),
             "paper_psnr": PAPER["autoencoder"]["psnr"], "paper_ssim": PAPER["autoencoder"]["ssim"]}]
    if cheff.sr is None:
        return rows
    start = time.perf_counter()

    def up(stage: Cheff, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([stage.upscale(x[i:i + cfg.batch_size], seed=cfg.seed, steps=cfg.sr_steps).images
                         for i in range(0, len(x), cfg.batch_size)])
        progress(f"[evaluate generation] Table 2: {len(x)} images upscaled ({cfg.sr_steps} steps), "
                 f"{time.perf_counter() - start:.0f} s so far")
        return out

    size = cheff.output_size
    stages = [("fine-tuned" if cheff.sr.model.cfg.degrade == "autoencoder" else "as given", cheff)]
    stages += [("base", sr_base)] if sr_base is not None else []
    for name, stage in stages:
        paper = PAPER["sr_fine_tuned" if name == "fine-tuned" else "sr_base"]["psnr"]
        rows.append({"stage": f"SR alone ({name}, from {stage.sr.model.cfg.sample_start:g} T): SR(x)", "size": size, **reconstruction_metrics(real_out, up(stage, low)),
                     "paper_psnr": paper})
    rows.append({"stage": f"cascade: SR(D(E(x))), from {cheff.sr.model.cfg.sample_start:g} T", "size": size, **reconstruction_metrics(real_out, up(cheff, recon))})
    rows.append({"stage": "bicubic upscaling of x", "size": size, **reconstruction_metrics(real_out, resize(low, size))})
    return rows


def run_generation_eval(ldm: str, data_uri: str, output_uri: str, cfg, sr: str | None = None,
                        sr_base: str | None = None, features_model: str | None = None, progress=print) -> dict:
    """The measures of the module doc for the cascade (`ldm`, optional `sr`, and `sr_base` for Table 2's
    base row) against the real shards at `data_uri`, on `generation_eval.threads` torch threads (the
    driver's whole machine by default: a judge epoch at 128² measured 57 s on one of two cores, 40 s on both);
    returns generation_eval.json."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.generation_eval.threads or os.cpu_count() or 1)
    try:
        return _evaluate(ldm, data_uri, output_uri, cfg, sr, sr_base, features_model, progress)
    finally:
        torch.set_num_threads(previous)


def _evaluate(ldm_uri: str, data_uri: str, output_uri: str, cfg, sr: str | None, sr_base: str | None,
              features_model: str | None, progress) -> dict:
    from cxrray.eval.grids import save_grid
    from cxrray.tracking import RunLogger, start_run, tracking_uri

    ec: GenerationEvalConfig = cfg.generation_eval
    scripted = ScriptedFeatures(features_model) if features_model else None
    cheff = Cheff.load(ldm_uri, sr, device="cpu")
    base = Cheff.load(ldm_uri, sr_base, device="cpu") if sr_base else None
    if not cheff.ldm.model.cfg.text:
        raise InputError(f"{ldm_uri} is not report-conditioned: conditioning accuracy needs prompts")
    size = cheff.output_size
    train, val, test = (RealSet(data_uri, split, size, ec.laterality)
                        for split in (ec.train_split, ec.val_split, ec.test_split))
    progress(f"[evaluate generation] judge on {len(train.keys)} real images (val {len(val.keys)}) at "
             f"{ec.judge_size or size}²; test {len(test.keys)}")
    judge, record = train_judge(train, val, ec, progress)
    rows = table2(cheff, base, test.images[:ec.images], ec, progress)
    sweep = sr_start_sweep(cheff, test.images[:ec.images], ec, progress) if cheff.sr is not None else []
    with_report = [i for i, r in enumerate(test.reports) if r][:ec.prompts]
    prompts = [test.reports[i] for i in with_report]
    guidances = list(dict.fromkeys([ec.guidance, *ec.guidance_sweep]))
    latents = {g: sample_latents(cheff, prompts, ec, g, progress) for g in guidances}
    latents_unc = sample_latents(cheff, [None] * ec.unconditional, ec, 1.0, progress)
    ldm_images = {g: apply_batched(cheff.decode, z, ec.batch_size).clamp(-1, 1) for g, z in latents.items()}
    ldm_unc = apply_batched(cheff.decode, latents_unc, ec.batch_size).clamp(-1, 1)
    judge_side = ec.judge_size or size  # the latent model's samples are read at the judge's own size

    def judged(images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(judge features, probabilities) of one image set; each set goes through the trunk once."""
        with torch.no_grad():
            features = apply_batched(judge.features, resize(images, judge_side) if images.shape[-1] < size else images)
            return features, torch.sigmoid(judge.head(features)).numpy()

    real = {k: judged(v) for k, v in {"train": train.images, "test": test.images}.items()}
    ldm_judged = {g: judged(v) for g, v in ldm_images.items()}
    ldm_unc_judged = judged(ldm_unc)
    source_labels, prompt_sides = test.labels[with_report], test.sides[with_report]

    def measures(synthetic, unconditional) -> dict:
        return {"quality": image_quality({"synthetic": synthetic[0], "train": real["train"][0],
                                          "test": real["test"][0]}, ec),
                "conditioning": conditioning(test.findings, synthetic[1], source_labels, real["test"][1], test,
                                             unconditional[1], ec),
                "laterality": laterality(test.findings, synthetic[1], prompt_sides, real["test"][1], test, train, ec)}

    real_latents = apply_batched(cheff.ldm.model.latents, resize(test.images, cheff.image_size), ec.batch_size).float()
    denoising = denoising_by_stage(cheff, test.images, real_latents, with_report, prompts, ec)
    ldm_measured = {g: measures(ldm_judged[g], ldm_unc_judged) for g in guidances}  # each guidance once
    ldm = {"size": cheff.image_size, "guidance": ec.guidance, **ldm_measured[ec.guidance],
           "latent_std": {"sampled_conditional": float(latents[ec.guidance].std()),
                          "sampled_unconditional": float(latents_unc.std()), "real_test": float(real_latents.std()),
                          "ratio": float(latents[ec.guidance].std() / real_latents.std())},
           "guidance_sweep": [{"guidance": g, **_auroc_summary(ldm_measured[g])}
                              for g in ec.guidance_sweep],
           "diversity": {"report_conditioned": ms_ssim(ldm_images[ec.guidance], ec.diversity_pairs, ec.seed),
                         "unconditional": ms_ssim(ldm_unc, ec.diversity_pairs, ec.seed)}}
    if cheff.sr is not None:
        default_start = cheff.sr.model.cfg.sample_start
        starts = list(dict.fromkeys([default_start, *ec.sr_starts]))
        cascades = {st: upscale_samples(cheff, ldm_images[ec.guidance], ec, st, True, progress) for st in starts}
        cascades_judged = {st: judged(images) for st, images in cascades.items()}  # each start through the judge once
        conditional, cascade_judged = cascades[default_start], cascades_judged[default_start]
        unconditional = upscale_samples(cheff, ldm_unc, ec, default_start, False, progress)
        for row in sweep:  # the cascade's FID / KID per start beside the SR alone's PSNR
            if row["start"] in cascades:
                fid = image_quality({"synthetic": cascades_judged[row["start"]][0], "train": real["train"][0],
                                     "test": real["test"][0]}, ec)["synthetic_vs_test"]
                row.update(cascade_fid=fid["fid"], cascade_kid=fid["kid"])
    else:
        conditional, unconditional = ldm_images[ec.guidance], ldm_unc
        cascade_judged = ldm_judged[ec.guidance]
    unc_judged = judged(unconditional)
    cascade = measures(cascade_judged, unc_judged)
    quality = {"judge_features": cascade["quality"]}
    if scripted is not None:
        sets = {"synthetic": conditional, "train": train.images, "test": test.images}
        quality["torchscript_features"] = image_quality({k: apply_batched(scripted, v) for k, v in sets.items()}, ec)
    diversity = {"report_conditioned": ms_ssim(conditional, ec.diversity_pairs, ec.seed),
                 "unconditional": ms_ssim(unconditional, ec.diversity_pairs, ec.seed),
                 "real_test": ms_ssim(test.images, ec.diversity_pairs, ec.seed)}
    labels, sides = cascade["conditioning"], cascade["laterality"]
    removal, paint_grids = device_removal(cheff, device_phantoms(ec, cheff.image_size, cfg.ingest.fit), ec)
    result = {"ldm_model": ldm_uri, "sr": sr, "sr_base": sr_base, "data": data_uri, "output_size": size, "judge": record,
              "table2": rows, "sr_start_sweep": sweep, "ldm": ldm, "denoising": denoising, "quality": quality, "diversity": diversity,
              "conditioning": labels, "laterality": sides, "device_removal": removal, "paper": PAPER,
              "config": ec.model_dump(mode="json"),
              "not_measured": ["the paper's own figures for conditioning (it shows pictures only)"]}
    out = Storage(output_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        grid_rows = [cheff.sample(p or None, n=6, seed=ec.seed, steps=ec.steps, guidance=ec.guidance,
                                  sr_steps=ec.sr_steps).images for p in ec.grid_prompts]
        save_grid(grid_rows, folder / "samples.png", "SYNTHETIC - Cheff cascade samples, one row per prompt")
        save_grid([cheff.sample(p or None, n=6, seed=ec.seed, steps=ec.steps, guidance=g, sr_steps=0).images
                   for p in ec.grid_prompts for g in (1.0, max(ec.guidance_sweep))], folder / "ldm_samples.png",
                  f"SYNTHETIC - the latent model alone, rows: each prompt at guidance 1 and {max(ec.guidance_sweep):g}")
        save_grid(paint_grids["inpainting"], folder / "inpainting.png",
                  "SYNTHETIC - rows: phantom, device mask, inpainted, the same phantom rendered without the device")
        save_grid(paint_grids["outpainting"], folder / "outpainting.png",
                  "SYNTHETIC - rows: phantom, kept region, outpainted")
        _page(folder, result, ec)
        run_id = start_run(cfg.tracking, {"generation_eval": result["config"], "ldm": ldm_uri, "sr": sr or "",
                                          "data": data_uri}, run_name="evaluate-generation")
        result["mlflow_run_id"] = run_id
        (folder / "generation_eval.json").write_text(json.dumps(jsonable(result), indent=1))
        logger = RunLogger(tracking_uri(cfg.tracking), run_id)
        logger.metrics({f"table2_psnr/{i}": r["psnr"] for i, r in enumerate(rows)}
                       | {"fid_vs_test": quality["judge_features"]["synthetic_vs_test"]["fid"],
                          "removed_fraction": removal["removed_fraction"]}
                       | {f"auroc/{r['label']}": r["auroc_generated"] for r in labels if "auroc_generated" in r}
                       | {f"laterality/{r['label']}": r["accuracy_generated"] for r in sides if "accuracy_generated" in r}
                       | {f"ldm_auroc/{r['label']}": r["auroc_generated"] for r in ldm["conditioning"]
                          if "auroc_generated" in r}
                       | {"ldm_fid_vs_test": ldm["quality"]["synthetic_vs_test"]["fid"],
                          "ldm_latent_std_ratio": ldm["latent_std"]["ratio"]}, step=0)
        for path in sorted(folder.iterdir()):
            out.write_bytes(path.name, path.read_bytes())
            logger.artifact(path, "evaluate-generation")
        logger.finish()
    def aurocs(measured: list[dict]) -> str:
        return ", ".join(f"{r['label']} {r['auroc_generated']:.2f}" for r in measured if "auroc_generated" in r)

    progress(f"[evaluate generation] autoencoder PSNR {rows[0]['psnr']:.2f} dB; latent model alone: AUROC "
             f"{aurocs(ldm['conditioning'])}, latent std {ldm['latent_std']['ratio']:.2f}x the real latents', FID "
             f"{ldm['quality']['synthetic_vs_test']['fid']:.3f}; cascade: FID vs test "
             f"{quality['judge_features']['synthetic_vs_test']['fid']:.3f}; AUROC {aurocs(labels)}; laterality "
             + ", ".join(f"{r['label']} {r['accuracy_generated']:.2f}" for r in sides if "accuracy_generated" in r)
             + f"; device removed {removal['removed_fraction']:.0%}; report {out.url('report.html')}")
    return jsonable(result)


def _page(folder: Path, result: dict, cfg: GenerationEvalConfig) -> None:
    q = result["quality"]["judge_features"]
    fid_rows = [{"pair": p, **v} for p, v in q.items()]
    fid_rows.append({"pair": f"paper (Inception, 1024²): Cheff / pixel-space cascade",
                     "fid": f"{PAPER['fid']} / {PAPER['pixel_cascade_fid']}", "kid": f"{PAPER['kid']} / {PAPER['pixel_cascade_kid']}"})
    div_rows = [{"set": k, **v} for k, v in result["diversity"].items()]
    cond_cols = ["label", "prompts_with", "prompts_without", "auroc_generated", "auroc_ci", "auroc_real",
                 "prevalence_unconditional", "prevalence_unconditional_ci", "prevalence_judged_real", "prevalence_real", "note"]
    removal, ldm = result["device_removal"], result["ldm"]
    sweep_cols = ["guidance", "fid", "kid", *sorted({k for r in ldm["guidance_sweep"] for k in r if k.startswith("auroc_")})]
    sections = [
        ("Table 2 analogue (ours beside the paper's)", html.table(result["table2"], ["stage", "size", "mse", "psnr", "ssim",
                                                                                       "paper_psnr", "paper_ssim"], 4)),
        ("SR start sweep: SR alone on real images (PSNR / SSIM) and the cascade's FID per start (1 = from noise)",
         html.table(result["sr_start_sweep"], ["start", "psnr", "ssim", "cascade_fid", "cascade_kid"], 4)),
        (f"The latent model alone, decoded at {ldm['size']}² (guidance {ldm['guidance']:g}): conditioning",
         html.table(ldm["conditioning"], cond_cols, 3)
         + html.table([ldm["latent_std"]], list(ldm["latent_std"]), 3)
         + html.table([{"pair": p, **v} for p, v in ldm["quality"].items()], ["pair", "fid", "kid", "kid_sd"], 4)),
        ("The latent model alone: classifier-free guidance sweep (judge AUROC, FID vs real test)",
         html.table(ldm["guidance_sweep"], sweep_cols, 3)
         + html.image(folder / "ldm_samples.png", " | ".join(p or "(unconditional)" for p in cfg.grid_prompts))),
        ("Where each stage's denoiser errs: noise MSE and clean-estimate RMSE per timestep on real test data",
         "".join(f"<h3>{stage}</h3>" + html.table(r, ["t", "alpha_bar", "eps_mse", "x0_rmse", "amplification", "output_mse", "output_gain"], 6)
                 for stage, r in result["denoising"].items())),
        ("Samples", html.image(folder / "samples.png", " | ".join(p or "(unconditional)" for p in cfg.grid_prompts))),
        ("FID / KID (judge features; Inception only with --features-model)",
         html.table(fid_rows, ["pair", "fid", "kid", "kid_sd", "kid_subset"], 4)),
        ("Diversity (MS-SSIM of random pairs; lower is more diverse)", html.table(div_rows, list(div_rows[0]), 4)),
        ("Conditioning accuracy and prevalence (judge trained on real images; target AUROC >= 0.8 for "
         + ", ".join(REPORT_TARGETS) + ")", html.table(result["conditioning"], cond_cols, 3)),
        ("Laterality: the judged side of samples whose prompt gives one (target accuracy >= 0.8)",
         html.table(result["laterality"], ["label", "prompts_right", "prompts_left", "accuracy_generated", "accuracy_ci",
                                           "accuracy_majority", "accuracy_real", "real_sided", "train_right", "train_left", "note"], 3)),
        ("Device removal by inpainting (phantoms)", html.table([removal], [k for k in removal if k != "devices"], 4)
         + html.image(folder / "inpainting.png") + html.image(folder / "outpainting.png")),
    ]
    (folder / "report.html").write_text(html.page(
        "Cheff cascade: generation evaluation", sections,
        "Not measured: " + "; ".join(result["not_measured"]) + ". The paper's figures are on 1024² MaCheX images."))
