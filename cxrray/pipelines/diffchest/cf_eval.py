"""Counterfactuals measured against phantom ground truth: does the decoded image carry the change, where, and
is the rest of the patient kept?

For test images negative for a finding F (a phantom set, so each image's case can be re-rendered), with the
explain settings given:

- probe image effect: p_F(encode(counterfactual)) - p_F(encode(reconstruction)), mean with a 95% bootstrap
  CI (what the model's own encoder and probe read; not independent: the probe that built the direction);
- judged (with a `cxrray.pipelines.diffchest.cf_judge` judge): the independent judge's probability of F and of every
  other drawn label on the counterfactual minus on the original and minus on the reconstruction, beside the
  same judge on the true paired renders (the patient with F drawn in: the ideal effect);
- where: mean |counterfactual - reconstruction| (and - original) per pixel inside the region F can occupy
  in this patient (`cxrray.data.phantom.region`, put through ingest's geometry and dilated by `dilate`
  pixels) over outside, with a bootstrap CI (`cxrray.eval.localisation.energy_ratio`, an L1 ratio);
- identity kept: SSIM over the pixels outside that region, against the reconstruction and the original;
- `GOALS`, checked against the original; a grid (original / reconstruction / counterfactual / |difference|).

The reconstruction decode(z, x_T) is one baseline: it shares x_T and the decoder's errors with the
counterfactual, so their difference is the code change alone; the original is what the user compares with. `evaluate` decodes (several settings, same
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
from cxrray.eval.grids import save_grid
from cxrray.eval.localisation import dilate, energy_ratio, ssim_outside
from cxrray.models.loading import load_model
from cxrray.pipelines.diffchest.audit import mean_ci as audit_mean_ci
from cxrray.pipelines.diffchest.counterfactual import shift_codes
from cxrray.pipelines.diffchest.explain import select_samples
from cxrray.pipelines.diffchest.head import load_head
from cxrray.pipelines.settings import ExplainConfig
from cxrray.errors import InputError


#: issue 27's goals for a counterfactual toward a finding, fixed before any was measured: the independent
#: judge's effect (vs the original), its probability of the planted confounder moving less than this, the
#: change's L1 inside / outside the true region, SSIM outside it (vs the original)
GOALS = {"judge_effect": 0.3, "confounder_move": 0.1, "l1_ratio": 3.0, "ssim_outside": 0.9}


def phantom_cases(keys: list[str], phantom_cfg, salt: str, count: int) -> list:
    """The phantom case behind each shard key (images 0..count-1 of this phantom set under this salt)."""
    from cxrray.data.deid import sample_key
    from cxrray.data.phantom import image_name, sample_case

    index = {sample_key(image_name(i), salt): i for i in range(count)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise InputError(f"{len(missing)} shard keys are not images 0..{count - 1} of this phantom set under this salt")
    return [sample_case(index[key], phantom_cfg) for key in keys]


def phantom_regions(cases: list, finding: str, phantom_cfg, size: int, fit: str) -> np.ndarray:
    """bool [N, size, size]: where `finding` can appear in each phantom case, on the shards' grid."""
    from cxrray.data.phantom import region

    return np.stack([fit_square(region(case, phantom_cfg, finding).astype(np.float32), size, fit) > 0.5
                     for case in cases])


def finding_regions(keys: list[str], finding: str, manifest: dict, phantom_cfg, salt: str, count: int,
                    dilate_px: int) -> np.ndarray:
    """`phantom_regions` of the keyed images on the shards' grid (the manifest's preprocessing), dilated by
    `dilate_px` pixels."""
    pre = manifest["preprocessing"]
    cases = phantom_cases(keys, phantom_cfg, salt, count)
    return dilate(phantom_regions(cases, finding, phantom_cfg, pre["size"], pre["fit"]), dilate_px)


def mean_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"mean", "ci"}: the audit's percentile bootstrap over images, as a record."""
    mean, low, high = audit_mean_ci(values, n_boot, seed)
    return {"mean": mean, "ci": [low, high]}


def evaluate(checkpoint: str, probe: str, data_uri: str, finding: str, settings: list[ExplainConfig], *,
             phantom_cfg, phantom_count: int, images: int = 24, split: str = "test", dilate_px: int = 2,
             seed: int = 0, grid: Path | None = None, salt: str | None = None, judge=None, ingest_cfg=None,
             oracle_settings: list[ExplainConfig] = ()) -> list[dict]:
    """One result per explain setting (same images; one inversion per distinct (invert_steps, invert_to) and
    trajectory need). With `judge` (a `CounterfactualJudge`) and `ingest_cfg` (how the shards were made),
    each result also has the judge's reading (`judged`) and the goals it meets (`goals`), and the known-answer
    check (`oracle_code`) decodes the paired render's own code plainly and under each of `oracle_settings`."""
    from cxrray.data.shards import read_manifest
    from cxrray.pipelines.diffchest.counterfactual import decode_pair, invert

    salt = salt or os.environ.get("CXRRAY_SALT")
    if not salt:
        raise InputError("set CXRRAY_SALT to the salt the phantoms were ingested with")
    loaded = load_model(checkpoint)
    loaded.family.require("counterfactual")
    model, head = loaded.model, load_head(probe)
    head.index(finding)
    manifest = read_manifest(data_uri)
    chosen = select_samples(data_uri, split, head.info.get("encodings"), label=finding, value=0.0,
                            limit=images, seed=seed)  # planned from the probe's encodings when they fit
    store, by_shard = Storage(data_uri), {}
    for c in chosen:
        by_shard.setdefault(c["shard"], []).append(c["key"])
    pngs = {}
    for shard, keys in by_shard.items():
        wanted = set(keys)
        pngs.update({k: png for k, png, _ in read_tar(store.read_bytes(shard), shard) if k in wanted})
    keys = [c["key"] for c in chosen]
    x0 = torch.as_tensor(png16_to_model(np.stack([decode_png16(pngs[k]) for k in keys])))[:, None]
    cases = phantom_cases(keys, phantom_cfg, salt, phantom_count)
    pre = manifest["preprocessing"]
    regions = dilate(phantom_regions(cases, finding, phantom_cfg, pre["size"], pre["fit"]), dilate_px)
    ideal = None
    if judge is not None:
        from cxrray.pipelines.diffchest.cf_judge import model_image, paired_renders

        if ingest_cfg is None or not np.array_equal(model_image(cases[0], phantom_cfg, ingest_cfg), x0[0, 0].numpy()):
            raise InputError("the judge reads phantoms through `ingest_cfg`, which must be how these shards were "
                             f"made ({data_uri}: size {pre['size']}, fit {pre['fit']}): the first image differs")

        paired = paired_renders(cases, finding, phantom_cfg, ingest_cfg)
        ideal = judge_effects(judge, finding, x0, paired, None, phantom_cfg, seed)
        print(f"[cf_eval] the true paired renders, judged: {finding} {ideal['effect_vs_original']['mean']:+.3f}, "
              f"{ideal['confounder']} {ideal['confounder_move_vs_original'] or 0:+.3f}", flush=True)
    with torch.no_grad():
        z = model.encode(x0).float()
    if judge is not None:  # can the decoder draw the finding at all, given the code of the true paired render?
        ideal["oracle_code"] = oracle = oracle_code(model, head, finding, x0, z, paired, settings[0], judge, phantom_cfg,
                                                    seed, regions, oracle_settings)
        print(f"[cf_eval] the paired render's own code decoded: judge {finding} "
              f"{oracle['judged']['effect_vs_original']['mean']:+.3f}, mean |change| {oracle['mean_abs_change']:.4f}; "
              f"its mean code step {oracle['mean_step_norm']:.2f} (normalised z), cosine " + ", ".join(
                  f"{k} {v:+.2f}" for k, v in oracle["mean_step_cosine"].items()), flush=True)
    sensitivity = z_sensitivity(model, x0, {"other_patient": torch.roll(z, 1, 0)}, seed=seed)["other_patient"]
    inversions, references, results = {}, {}, []
    for cfg in settings:
        z_star = shift_codes(head, z, finding, cfg, toward=1)
        inversion, reference = None, None
        if cfg.renoise is None:
            need = (cfg.invert_steps, cfg.invert_to, cfg.blend != "none")
            if need not in inversions:
                inversions[need] = invert(model, x0, z, cfg)
            inversion, reference = inversions[need], references.get((cfg.invert_steps, cfg.invert_to, cfg.steps))
            reference = reference if cfg.blend == "none" else None  # a masked setting decodes its own
        decoded = decode_pair(model, x0, z, z_star, cfg, inversion, with_reference=True, reference=reference)
        ref, cf = decoded["reference"], decoded["counterfactual"]
        if cfg.renoise is None and cfg.blend == "none":
            references[cfg.invert_steps, cfg.invert_to, cfg.steps] = ref
        with torch.no_grad():
            probs = {"reference": head.probabilities(model.encode(ref).float()).numpy(),
                     "after": head.probabilities(model.encode(cf).float()).numpy(),
                     "latent": head.probabilities(z_star).numpy(), "before": head.probabilities(z).numpy()}
        result = {"explain": cfg.model_dump(mode="json"),
                  **effects(finding, ref[:, 0].numpy(), cf[:, 0].numpy(), regions, probs, head.findings, seed),
                  "vs_original": localisation(x0[:, 0].numpy(), cf[:, 0].numpy(), regions, seed),
                  "region_dilation_px": dilate_px, "x0_change_other_patient_z": sensitivity}
        if "mask" in decoded:
            result["mask_fraction"] = float(decoded["mask"].mean())
        if judge is not None:
            result["judged"] = judge_effects(judge, finding, x0, cf, ref, phantom_cfg, seed)
            result["judged"]["ideal"] = ideal
            result["goals"] = goals_met(result)
        results.append(result)
        print(f"[cf_eval] {len(results)}/{len(settings)} {setting_tag(cfg)}: {describe(result)}", flush=True)
        if grid is not None:
            change = (cf - ref).abs()
            change = change / (change.amax() + 1e-8) * 2 - 1
            n = min(8, len(keys))
            path = Path(grid).with_name(f"{Path(grid).stem}_{setting_tag(cfg)}{Path(grid).suffix}")
            results[-1]["grid"] = str(save_grid([x0[:n], ref[:n], cf[:n], change[:n]], path,
                                                f"counterfactuals toward {finding} ({setting_tag(cfg)}): "
                                                "original / reconstruction / counterfactual / |difference|"))
    return results


def oracle_code(model, head, finding: str, x0: torch.Tensor, z: torch.Tensor, paired: torch.Tensor, cfg: ExplainConfig,
                judge, phantom_cfg, seed: int = 0, regions: np.ndarray | None = None,
                variants: list[ExplainConfig] = ()) -> dict:
    """The known-answer check: decode z* = encode(true paired render) from the original's full inversion (`cfg`'s
    steps, plain decode), judged like any counterfactual; and the code change it implies, normalised: its mean's length in
    the effect axis's units and its cosine with each direction the probe offers. Each of `variants` decodes the
    same code under its own decoding levers (renoise, blend, guidance), judged and localised in `regions`."""
    from cxrray.pipelines.diffchest.counterfactual import decode_pair

    with torch.no_grad():
        z_pair = model.encode(paired).float()
    plain = cfg.model_copy(update={"blend": "none", "renoise": None, "z_guidance": 1.0, "invert_to": 1.0})
    cf = decode_pair(model, x0, z, z_pair, plain)["counterfactual"]
    step = (head.normalize(z_pair) - head.normalize(z)).mean(0)
    cosines = {}
    for axis, get in (("filter", lambda: head.direction(finding, z)[0]), ("pattern", lambda: head.pattern_of(finding, z)),
                      ("effect", lambda: head.effect_of(finding, z))):
        try:
            d = get()
        except InputError:
            continue
        cosines[axis] = float(step @ d / (step.norm() * d.norm() + 1e-12))
    effect_norm = float(head.effect_of(finding, z).norm()) if head.effect is not None else None
    decodes = []
    for variant in variants:
        other = decode_pair(model, x0, z, z_pair, variant)["counterfactual"]
        decodes.append({"explain": variant.model_dump(mode="json"), "tag": setting_tag(variant),
                        "judged": judge_effects(judge, finding, x0, other, None, phantom_cfg, seed),
                        "vs_original": localisation(x0[:, 0].numpy(), other[:, 0].numpy(), regions, seed),
                        "mean_abs_change": float((other - x0).abs().mean())})
    return {"judged": judge_effects(judge, finding, x0, cf, None, phantom_cfg, seed), "decodes": decodes,
            "mean_abs_change": float((cf - x0).abs().mean()), "mean_step_norm": float(step.norm()),
            "mean_step_in_effects": None if not effect_norm else float(step.norm()) / effect_norm,
            "mean_step_cosine": cosines}


def localisation(before: np.ndarray, after: np.ndarray, regions: np.ndarray, seed: int = 0) -> dict:
    """L1 of the change inside / outside `regions` and SSIM outside them, between two image sets [N, S, S]."""
    return {"l1_ratio": energy_ratio(after - before, regions, seed=seed),
            "ssim_outside": mean_ci(ssim_outside(before, after, regions), seed=seed)}


def judge_effects(judge, finding: str, x0: torch.Tensor, cf: torch.Tensor, ref: torch.Tensor | None, phantom_cfg,
                  seed: int = 0) -> dict:
    """The independent judge's probabilities of `cf` minus those of the original `x0` (and of the reconstruction
    `ref`, when given): the finding's with a CI, every label's mean, and the planted confounder's (the
    phantom set's device confounded with this finding; None when there is none)."""
    from cxrray.pipelines.diffchest.cf_judge import LABELS

    conf = phantom_cfg.parsed_confounder
    confounder = conf.device if conf is not None and conf.finding == finding else None
    p_cf, p_x0 = judge.probabilities(cf), judge.probabilities(x0)
    j = LABELS.index(finding)
    out = {"finding": finding, "confounder": confounder,
           "effect_vs_original": mean_ci(p_cf[:, j] - p_x0[:, j], seed=seed),
           "by_label_vs_original": {label: float(np.mean(p_cf[:, i] - p_x0[:, i])) for i, label in enumerate(LABELS)},
           "before": float(p_x0[:, j].mean()), "after": float(p_cf[:, j].mean())}
    out["confounder_move_vs_original"] = out["by_label_vs_original"][confounder] if confounder else None
    if ref is not None:
        p_ref = judge.probabilities(ref)
        out["effect_vs_reconstruction"] = mean_ci(p_cf[:, j] - p_ref[:, j], seed=seed)
        out["by_label_vs_reconstruction"] = {label: float(np.mean(p_cf[:, i] - p_ref[:, i]))
                                             for i, label in enumerate(LABELS)}
    return out


def goals_met(result: dict) -> dict:
    """Which of `GOALS` a judged result meets (all against the original image), and whether all do."""
    judged, local = result["judged"], result["vs_original"]
    ratio = local["l1_ratio"]["ratio"]
    met = {"judge_effect": judged["effect_vs_original"]["mean"] >= GOALS["judge_effect"],
           # no confounder planted with this finding: nothing to drag along
           "confounder_move": judged["confounder"] is None or abs(judged["confounder_move_vs_original"]) < GOALS["confounder_move"],
           "l1_ratio": ratio is not None and ratio >= GOALS["l1_ratio"],
           "ssim_outside": local["ssim_outside"]["mean"] >= GOALS["ssim_outside"]}
    return {**met, "all": all(met.values())}


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
    """One line of an `effects` result (with the judge's reading and the change against the original, when
    present), for progress output."""
    ratio = result["energy_ratio"]["ratio"]
    line = (f"probe image effect {result['image_effect']['mean']:+.3f} (latent {result['latent_effect']['mean']:+.3f}), "
            f"L1 in/out of the region {float('nan') if ratio is None else ratio:.2f}, "
            f"SSIM outside {result['ssim_outside']['mean']:.3f}, mean |change| {result['mean_abs_change']:.4f}")
    if "judged" in result:
        j, v = result["judged"], result["vs_original"]
        r = v["l1_ratio"]["ratio"]
        line += (f" | judge {j['finding']} {j['effect_vs_original']['mean']:+.3f} (vs recon "
                 f"{j['effect_vs_reconstruction']['mean']:+.3f}), {j['confounder']} "
                 f"{j['confounder_move_vs_original'] or 0:+.3f}; vs original: L1 in/out {float('nan') if r is None else r:.2f}, "
                 f"SSIM outside {v['ssim_outside']['mean']:.3f}; goals {'met' if result['goals']['all'] else 'not met'}")
    return line


def measure_records(records_uri: str, data_uri: str, finding: str, *, phantom_cfg, phantom_count: int, salt: str,
                    dilate_px: int = 2, seed: int = 0) -> dict:
    """`effects` of counterfactuals an explain run already wrote toward `finding` with `reference` (the audit's):
    every `{key}.{finding}.toward.json` under `records_uri`, its reference and counterfactual PNGs, against the
    phantom regions of those keys. Nothing is decoded again."""
    import json

    from cxrray.data.shards import read_manifest
    from cxrray.pipelines.diffchest.explain import stem

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
    """A short name for one explain setting, e.g. "pattern_linear0.3_g1", "filter_closed0.9_g3_t0.5" or
    "effect_linear1_g1_to0.5_model0.3" (partial inversion to 0.5 T, blended in the model's mask at 0.3)."""
    step = f"linear{cfg.eps:g}" if cfg.mode == "linear" else f"closed{cfg.target_probability:g}"
    return (f"{cfg.axis}_{step}_g{cfg.z_guidance:g}" + (f"_t{cfg.renoise:g}" if cfg.renoise else "")
            + (f"_to{cfg.invert_to:g}" if cfg.invert_to < 1 else "")
            + (f"_{cfg.blend}{cfg.mask_threshold:g}" if cfg.blend != "none" else ""))


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
