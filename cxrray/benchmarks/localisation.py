"""`cxrray evaluate localisation`: where does each method say the finding is, against where it is?

For each finding with masks in the shards (issue 29 §1), each method draws a map on the test split's images
positive for it (mask not empty), and each map is scored per image against the finding's mask: pixel AUROC
(`eval.localisation.pixel_auroc`), pointing game (maximum inside the mask grown by `tolerance_px`) and the
share of the map's mass inside the mask. Means carry patient-clustered 95% CIs; each method is compared
with every other on the same images by a paired patient bootstrap.

Methods: `oracle` |image - its true healthy counterpart| (the known-answer check: the scoring must put it
near 1), `random` (uniform noise: chance, pixel AUROC 0.5), `gradcam` and `integrated_gradients` of a
classifier trained here on the train split (`pipelines.saliency`), and with a DiffChest checkpoint and probe
`counterfactual` (|the counterfactual away from the finding - the image|) and `reconstruction` (|image - a
stochastic decode of its own code|). Judges none of the methods trained on: the
masks and the healthy renders come from the phantoms, not from any model.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cxrray.config import Config
from cxrray.errors import ConfigError, InputError
from cxrray.eval import html
from cxrray.eval.localisation import clustered_mean, energy_inside, paired_clustered, pixel_auroc, pointing_game
from cxrray.attribute.methods import DIFFCHEST, GENERATIVE, SALIENCY, Mapper, load_diffchest, load_mapper
from cxrray.pipelines.truth import TruthSet, load_truth

METRICS = {"pixel_auroc": "pixel AUROC", "pointing": "pointing game", "energy_inside": "energy inside"}
CONTROLS = ("oracle", "random")  # the scoring's known answer and its chance level


def method_maps(method: str, images: np.ndarray, finding: str, truth: TruthSet, rows: np.ndarray, cfg: Config,
                mappers: dict[str, Mapper]) -> np.ndarray:
    """float32 [n, S, S] maps of `method` for `images` (rows `rows` of `truth`): the controls here, every
    other method through its `Mapper`."""
    if method == "oracle":
        if truth.healthy is None:
            raise InputError("method oracle needs the healthy counterpart in the shards (phantom.masks=true)")
        return np.abs(images[:, 0] - truth.healthy[rows])
    if method == "random":
        rng = np.random.default_rng(cfg.localisation.seed)
        return rng.random(images[:, 0].shape).astype(np.float32)
    return mappers[method].maps(images, finding, [truth.keys[i] for i in rows])


def score(maps: np.ndarray, masks: np.ndarray, tolerance_px: int, within: np.ndarray | None = None
          ) -> dict[str, np.ndarray]:
    """Per-image scores [n] of each metric, over the pixels `within` (all by default)."""
    return {"pixel_auroc": pixel_auroc(maps, masks, within),
            "pointing": pointing_game(maps, masks, tolerance_px, within),
            "energy_inside": energy_inside(maps, masks, within)}


def run_localisation(data_uri: str, output_dir: str | Path, cfg: Config, checkpoint: str | None = None,
                     probe: str | None = None, ldm: str | None = None, ddpm: str | None = None,
                     classifier: str | None = None, progress=print) -> dict:
    """Run the benchmark (module doc); writes localisation.json, table.md, report.html and maps.png under
    `output_dir` and returns the JSON's content. `checkpoint` (+ `probe`): the DiffChest model (and linear
    probe) the counterfactual and reconstruction methods use; `ldm`: the latent diffusion model of the
    img2img methods (attribution, empty_prompt); `ddpm` + `classifier`: DAug's guided method (a pixel DDPM and
    a noise-aware classifier)."""
    from cxrray.pipelines.saliency.classifier import save_classifier, train_classifier

    lc = cfg.localisation
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(lc.seed)
    start = time.perf_counter()
    test = load_truth(data_uri, lc.test_split, lc.images)
    missing = [f for f in lc.findings if f not in test.masks]
    if missing:
        raise InputError(f"{data_uri}: no masks for {missing}; masks present: {sorted(test.masks)}")
    if lc.lungs_only and test.lungs is None:
        raise InputError(f"{data_uri}: localisation.lungs_only needs mask_lungs in the shards")
    progress(f"[localisation] {len(test.keys)} {lc.test_split} images, findings {lc.findings}, "
             f"methods {lc.methods}")
    saliency = None
    if {"gradcam", "integrated_gradients"} & set(lc.methods):
        train = load_truth(data_uri, lc.train_split, lc.train_images, need_masks=False)
        val = load_truth(data_uri, lc.val_split, None, need_masks=False)
        saliency = train_classifier(train, val, cfg.saliency, progress)
        save_classifier(*saliency, out / "classifier")
        progress(f"[localisation] classifier: val AUROC {saliency[1]['val_auroc']}")
    mappers = {m: Mapper(m, cfg, classifier=saliency) for m in SALIENCY if m in lc.methods}
    if set(DIFFCHEST) & set(lc.methods):
        if not checkpoint:
            raise ConfigError(f"localisation.methods {sorted(set(DIFFCHEST) & set(lc.methods))} need --checkpoint "
                              "(a DiffChest model)")
        if "counterfactual" in lc.methods and not probe:
            raise ConfigError("localisation.methods: 'counterfactual' needs --probe")
        diffchest = load_diffchest(checkpoint, probe, test.images.shape[-1])
        mappers.update({m: Mapper(m, cfg, diffchest=diffchest) for m in DIFFCHEST if m in lc.methods})
    for method in [m for m in GENERATIVE if m in lc.methods]:
        if not ldm:
            raise ConfigError(f"localisation.methods: {method!r} needs --ldm (a latent diffusion checkpoint)")
        mappers[method] = load_mapper(method, ldm, None, cfg)
    if "guided" in lc.methods:
        if not (ddpm and classifier):
            raise ConfigError("localisation.methods: 'guided' needs --ddpm and --classifier (DAug's pair)")
        mappers["guided"] = load_mapper("guided", ddpm, classifier, cfg)
        for finding in lc.findings:
            mappers["guided"].check(finding)
        if mappers["guided"].image_size != test.images.shape[-1]:
            raise InputError(f"{ddpm} generates {mappers['guided'].image_size}² images, the shards hold "
                             f"{test.images.shape[-1]}²")
    results, grid_rows = {}, []
    for finding in lc.findings:
        rows = test.positives(finding)
        if len(rows) < 2:
            raise InputError(f"{lc.test_split}: only {len(rows)} images positive for {finding!r} with a mask")
        images = test.images[rows]
        masks = test.masks[finding][rows]
        within = test.lungs[rows] if lc.lungs_only else None  # scored inside the lung fields only
        patients = [test.patients[i] for i in rows]
        per_method, maps_by_method = {}, {}
        for method in lc.methods:
            maps = method_maps(method, images, finding, test, rows, cfg, mappers)
            maps_by_method[method] = maps
            per_method[method] = score(maps, masks, lc.tolerance_px, within)
        summary = {m: {k: clustered_mean(v, patients, lc.n_boot, lc.seed) for k, v in scores.items()}
                   for m, scores in per_method.items()}
        paired = [{"a": a, "b": b, **{k: paired_clustered(per_method[a][k], per_method[b][k], patients, lc.n_boot,
                                                          lc.seed) for k in METRICS}}
                  for i, a in enumerate(lc.methods) for b in lc.methods[i + 1:]]
        results[finding] = {"images": int(len(rows)), "patients": len(set(patients)),
                            "mask_area": float(masks.mean()), "methods": summary, "paired": paired}
        grid_rows += _grid_rows(images, masks, maps_by_method, lc.grid_images)
        progress(f"[localisation] {finding}: " + ", ".join(
            f"{m} {_cell(summary[m]['pixel_auroc']['mean']) or 'n/a'}" for m in lc.methods) + " (pixel AUROC)")
    settings = {k: getattr(cfg, k).model_dump(mode="json") for k in ("saliency", "explain", "attribution", "augment")}
    result = {"data": data_uri, "checkpoint": checkpoint, "probe": probe, "ldm": ldm, "ddpm": ddpm,
              "noise_aware_classifier": classifier, "split": lc.test_split,
              "settings": {**settings, "attribute_seed": cfg.attribute.seed}, "config": lc.model_dump(mode="json"),
              "classifier": saliency[1] if saliency else None, "findings": results,
              "seconds": round(time.perf_counter() - start, 1)}
    (out / "localisation.json").write_text(json.dumps(result, indent=1))
    _report(result, out, grid_rows)
    return result


def _grid_rows(images: np.ndarray, masks: np.ndarray, maps: dict[str, np.ndarray], n: int) -> list[torch.Tensor]:
    """One picture row each: the images, their masks, then each method's map scaled to [-1, 1] per image."""
    take = slice(0, min(n, len(images)))

    def scaled(m: np.ndarray) -> torch.Tensor:
        lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
        return torch.from_numpy((m - lo) / np.maximum(hi - lo, 1e-12) * 2 - 1)[:, None].float()

    return [torch.from_numpy(images[take]).float(), torch.from_numpy(masks[take] * 2.0 - 1)[:, None].float(),
            *(scaled(m[take]) for m in maps.values())]


def table_rows(result: dict) -> list[dict]:
    rows = []
    for finding, r in result["findings"].items():
        for method, metrics in r["methods"].items():
            rows.append({"finding": finding, "method": method, "images": metrics["pixel_auroc"]["images"],
                         **{name: metrics[k]["mean"] for k, name in METRICS.items()},
                         **{f"{name} CI": metrics[k]["ci"] for k, name in METRICS.items()}})
    return rows


def _report(result: dict, out: Path, grid_rows: list[torch.Tensor]) -> None:
    from cxrray.eval.grids import save_grid

    rows = table_rows(result)
    columns = ["finding", "method", "images", *METRICS.values(), *(f"{n} CI" for n in METRICS.values())]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) for c in columns) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if grid_rows:
        save_grid(grid_rows, out / "maps.png", "localisation maps: images, masks, then each method's map")
    paired = [{"finding": f, "a": p["a"], "b": p["b"], "diff (pixel AUROC)": p["pixel_auroc"]["diff"],
               "CI": p["pixel_auroc"]["ci"], "p": p["pixel_auroc"]["p_value"]}
              for f, r in result["findings"].items() for p in r["paired"]]
    sections = [("Localisation against the ground-truth masks", html.table(rows, columns)),
                ("Paired comparisons (patient bootstrap)", html.table(paired, list(paired[0]) if paired else []))]
    if (out / "maps.png").exists():
        sections.append(("Maps (per finding: images, masks, then " + ", ".join(result["config"]["methods"]) + ")",
                         html.image(out / "maps.png")))
    note = ("No paper here reports lesion-level localisation; the masks and healthy counterparts come from the "
            "phantoms. oracle = |image - true healthy counterpart| (the scoring's known answer), random = chance.")
    (out / "report.html").write_text(html.page("Where is the disease? Localisation benchmark", sections, note))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list) and value and all(isinstance(v, float) for v in value):
        return "–".join(f"{v:.3f}" for v in value)
    return "" if value is None else str(value)
