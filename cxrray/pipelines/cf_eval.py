"""Counterfactuals measured against phantom ground truth: does the decoded image carry the change, where, and
is the rest of the patient kept?

For test images negative for a finding F (a phantom set, so each image's case can be re-rendered), with the
explain settings given:

- image effect: p_F(encode(counterfactual)) - p_F(encode(reconstruction)), mean with a 95% bootstrap CI
  (what the image shows, not what z* says);
- where: energy of |counterfactual - reconstruction| per pixel inside the region F can occupy in this
  patient (`cxrray.data.phantom.region`, put through ingest's geometry and dilated by `dilate` pixels)
  over outside, with a bootstrap CI (`cxrray.eval.localisation.energy_ratio`);
- identity kept: SSIM(reconstruction, counterfactual) over the pixels outside that region;
- a grid (original / reconstruction / counterfactual / |difference| amplified) as PNG.

The reconstruction decode(z, x_T) is the baseline: it shares x_T and the decoder's errors with the
counterfactual, so their difference is the code change alone. `evaluate` decodes (several settings, same
images); `measure_records` measures counterfactuals an explain run already wrote with their reconstruction
(the audit's, in the demo).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cxrray.data.imaging import decode_png16, fit_square, png16_to_model
from cxrray.data.shards import read_tar
from cxrray.data.storage import Storage
from cxrray.diffusion.ddim import ddim_invert, ddim_renoise_decode, ddim_sample
from cxrray.eval.grids import save_grid
from cxrray.eval.localisation import dilate, energy_ratio, ssim_outside
from cxrray.io.loading import load_model
from cxrray.pipelines.audit import mean_ci as audit_mean_ci
from cxrray.pipelines.counterfactual import shift_codes
from cxrray.pipelines.explain import select
from cxrray.pipelines.head import load_head
from cxrray.pipelines.settings import ExplainConfig
from cxrray.errors import InputError


def phantom_regions(keys: list[str], finding: str, phantom_cfg, salt: str, count: int, size: int, fit: str) -> np.ndarray:
    """bool [N, size, size]: where `finding` can appear in each keyed phantom image, on the shards' grid."""
    from cxrray.data.deid import sample_key
    from cxrray.data.phantom import image_name, region, sample_case

    index = {sample_key(image_name(i), salt): i for i in range(count)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise InputError(f"{len(missing)} shard keys are not images 0..{count - 1} of this phantom set under this salt")
    out = []
    for key in keys:
        mask = region(sample_case(index[key], phantom_cfg), phantom_cfg, finding)
        out.append(fit_square(mask.astype(np.float32), size, fit) > 0.5)
    return np.stack(out)


def finding_regions(keys: list[str], finding: str, manifest: dict, phantom_cfg, salt: str, count: int,
                    dilate_px: int) -> np.ndarray:
    """`phantom_regions` on the shards' grid (the manifest's preprocessing), dilated by `dilate_px` pixels."""
    pre = manifest["preprocessing"]
    return dilate(phantom_regions(keys, finding, phantom_cfg, salt, count, pre["size"], pre["fit"]), dilate_px)


def mean_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"mean", "ci"}: the audit's percentile bootstrap over images, as a record."""
    mean, low, high = audit_mean_ci(values, n_boot, seed)
    return {"mean": mean, "ci": [low, high]}


def evaluate(checkpoint: str, probe: str, data_uri: str, finding: str, settings: list[ExplainConfig], *,
             phantom_cfg, phantom_count: int, images: int = 24, split: str = "test", dilate_px: int = 2,
             seed: int = 0, grid: Path | None = None, salt: str | None = None) -> list[dict]:
    """One result per explain setting (same images, one inversion per distinct invert_steps)."""
    from cxrray.data.shards import read_manifest

    salt = salt or os.environ.get("CXRRAY_SALT")
    if not salt:
        raise InputError("set CXRRAY_SALT to the salt the phantoms were ingested with")
    loaded = load_model(checkpoint)
    loaded.family.require("counterfactual")
    model, head = loaded.model, load_head(probe)
    head.index(finding)
    manifest = read_manifest(data_uri)
    chosen, _ = select(data_uri, split, label=finding, value=0.0, limit=images, seed=seed)
    store, by_shard = Storage(data_uri), {}
    for c in chosen:
        by_shard.setdefault(c["shard"], []).append(c["key"])
    pngs = {}
    for shard, keys in by_shard.items():
        wanted = set(keys)
        pngs.update({k: png for k, png, _ in read_tar(store.read_bytes(shard), shard) if k in wanted})
    keys = [c["key"] for c in chosen]
    x0 = torch.as_tensor(png16_to_model(np.stack([decode_png16(pngs[k]) for k in keys])))[:, None]
    regions = finding_regions(keys, finding, manifest, phantom_cfg, salt, phantom_count, dilate_px)
    with torch.no_grad():
        z = model.encode(x0).float()
    sensitivity = z_sensitivity(model, x0, {"other_patient": torch.roll(z, 1, 0)}, seed=seed)["other_patient"]
    inversions, references, results = {}, {}, []
    for cfg in settings:
        z_star = shift_codes(head, z, finding, cfg, toward=1)
        if cfg.renoise is None:
            if cfg.invert_steps not in inversions:
                inversions[cfg.invert_steps] = ddim_invert(model, x0, z, steps=cfg.invert_steps)
            x_T = inversions[cfg.invert_steps]
            if (cfg.invert_steps, cfg.steps) not in references:
                references[cfg.invert_steps, cfg.steps] = ddim_sample(model, z, x_T, steps=cfg.steps).clamp(-1, 1)
            ref = references[cfg.invert_steps, cfg.steps]
            cf = ddim_sample(model, z_star, x_T, steps=cfg.steps, guidance=cfg.z_guidance, z_from=z).clamp(-1, 1)
        else:  # the same seeded noise for both: their difference is the code change alone
            def decode(code, **kw):
                return ddim_renoise_decode(model, code, x0, cfg.renoise, steps=cfg.steps,
                                           generator=torch.Generator().manual_seed(cfg.seed), **kw).clamp(-1, 1)
            ref, cf = decode(z), decode(z_star, guidance=cfg.z_guidance, z_from=z)
        with torch.no_grad():
            probs = {"reference": head.probabilities(model.encode(ref).float()).numpy(),
                     "after": head.probabilities(model.encode(cf).float()).numpy(),
                     "latent": head.probabilities(z_star).numpy(), "before": head.probabilities(z).numpy()}
        results.append({"explain": cfg.model_dump(mode="json"),
                         **effects(finding, ref[:, 0].numpy(), cf[:, 0].numpy(), regions, probs, head.findings, seed),
                         "region_dilation_px": dilate_px, "x0_change_other_patient_z": sensitivity})
        print(f"[cf_eval] {len(results)}/{len(settings)} {setting_tag(cfg)}: {describe(results[-1])}", flush=True)
        if grid is not None:
            change = (cf - ref).abs()
            change = change / (change.amax() + 1e-8) * 2 - 1
            n = min(8, len(keys))
            path = Path(grid).with_name(f"{Path(grid).stem}_{setting_tag(cfg)}{Path(grid).suffix}")
            results[-1]["grid"] = str(save_grid([x0[:n], ref[:n], cf[:n], change[:n]], path,
                                                f"counterfactuals toward {finding} (z guidance {cfg.z_guidance:g}): "
                                                "original / reconstruction / counterfactual / |difference|"))
    return results


def effects(finding: str, ref: np.ndarray, cf: np.ndarray, regions: np.ndarray, probs: dict[str, np.ndarray],
            labels: list[str], seed: int = 0) -> dict:
    """The measures of one set of counterfactuals: reconstructions `ref` and counterfactuals `cf` [N, S, S] in
    [-1, 1], `regions` bool [N, S, S] where the finding can appear, and probe probabilities [N, F] over `labels`
    under "before" (z), "latent" (z*), "reference" (re-encoded ref) and "after" (re-encoded cf)."""
    j = labels.index(finding)
    image = probs["after"] - probs["reference"]
    diff = cf - ref
    return {"finding": finding, "images": len(ref),
            "image_effect": mean_ci(image[:, j], seed=seed),
            "latent_effect": mean_ci(probs["latent"][:, j] - probs["before"][:, j], seed=seed),
            "energy_ratio": energy_ratio(diff, regions, seed=seed),
            "ssim_outside": mean_ci(ssim_outside(ref, cf, regions), seed=seed),
            "image_effect_by_label": {label: float(np.mean(image[:, i])) for i, label in enumerate(labels)
                                      if np.isfinite(image[:, i]).all()},
            "mean_abs_change": float(np.abs(diff).mean())}


def describe(result: dict) -> str:
    """One line of an `effects` result, for progress output."""
    ratio = result["energy_ratio"]["ratio"]
    return (f"image effect {result['image_effect']['mean']:+.3f} (latent {result['latent_effect']['mean']:+.3f}), "
            f"energy in/out of the region {float('nan') if ratio is None else ratio:.2f}, "
            f"SSIM outside {result['ssim_outside']['mean']:.3f}, mean |change| {result['mean_abs_change']:.4f}")


def measure_records(records_uri: str, data_uri: str, finding: str, *, phantom_cfg, phantom_count: int, salt: str,
                    dilate_px: int = 2, seed: int = 0) -> dict:
    """`effects` of counterfactuals an explain run already wrote toward `finding` with `reference` (the audit's):
    every `{key}.{finding}.toward.json` under `records_uri`, its reference and counterfactual PNGs, against the
    phantom regions of those keys. Nothing is decoded again."""
    import json

    from cxrray.data.shards import read_manifest
    from cxrray.pipelines.explain import stem

    store = Storage(records_uri)
    suffix = f"{stem('', finding)}.json"
    names = sorted(n for n in store.list() if n.endswith(suffix) and not n.startswith("."))
    records = [json.loads(store.read_bytes(n)) for n in names]
    records = [r for r in records if "reference" in r["files"]]
    if not records:
        raise InputError(f"no counterfactuals toward {finding!r} with a reference under {store.uri}")
    labels = list(records[0]["probs_before"])

    def images(kind: str) -> np.ndarray:
        return np.stack([png16_to_model(decode_png16(store.read_bytes(r["files"][kind]))) for r in records])

    regions = finding_regions([r["key"] for r in records], finding, read_manifest(data_uri), phantom_cfg, salt,
                              phantom_count, dilate_px)
    probs = {kind: np.array([[r[f"probs_{kind}"][label] for label in labels] for r in records], dtype=np.float64)
             for kind in ("before", "latent", "reference", "after")}
    return {"explain": records[0]["explain"], **effects(finding, images("reference"), images("counterfactual"), regions,
                                                        probs, labels, seed), "region_dilation_px": dilate_px}


def setting_tag(cfg: ExplainConfig) -> str:
    """A short name for one explain setting, e.g. "pattern_linear0.3_g1" or "filter_closed0.9_g3_t0.5"."""
    step = f"linear{cfg.eps:g}" if cfg.mode == "linear" else f"closed{cfg.target_probability:g}"
    return f"{cfg.axis}_{step}_g{cfg.z_guidance:g}" + (f"_t{cfg.renoise:g}" if cfg.renoise else "")


def z_sensitivity(model, x0: torch.Tensor, codes: dict[str, torch.Tensor], timesteps=(50, 200, 400, 600, 800, 950),
                  seed: int = 0) -> dict[str, dict[int, float]]:
    """How much the decoder reads z: ||x0_hat(x_t, t, z') - x0_hat(x_t, t, z)|| / ||x0_hat(x_t, t, z)|| over the
    batch, x0_hat the clean image the model's output implies (so eps and v models compare), for each
    alternative code z' in `codes` and each t (x_t = x0 noised with one seeded noise). A decoder that uses z
    moves by tens of percent at high t when z is another patient's; ~0 means it ignores z."""
    from cxrray.diffusion.schedule import eps_and_x0, make_scheduler

    sched = make_scheduler("ddpm", **getattr(model, "schedule", {}))
    kind = sched.config.prediction_type
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        z = model.encode(x0).float()
        out: dict[str, dict[int, float]] = {name: {} for name in codes}
        for t in timesteps:
            tt = torch.full((x0.shape[0],), int(t))
            x_t = sched.add_noise(x0, noise, tt)

            def x0_hat(code):
                return eps_and_x0(kind, sched.alphas_cumprod, model(x_t, tt, code).float(), x_t, tt)[1]

            own = x0_hat(z)
            for name, code in codes.items():
                out[name][int(t)] = float((x0_hat(code) - own).norm() / own.norm())
    return out
