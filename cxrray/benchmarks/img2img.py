"""`cxrray evaluate img2img`: the attribution paper's img2img (`pipelines.attribution.img2img`) examined where it
works and where it fails, with judges it did not train: a finding classifier trained here on real images (the
localisation benchmark's, `pipelines.saliency`), the phantoms' true healthy renders and their masks.

- **Sweep** strength x guidance (the paper states both 0.55 / 4 and 0.85 / 7.5) on the test positives of each
  finding: the map's pixel AUROC (|image - counterpart|, and |D(E(x)) - counterpart|: without the autoencoder's
  own error) and pointing game against the mask; the counterpart's judge P(finding)
  (should fall), the mean |change| of the judge's other labels (should stay), its error to the true healthy
  render over the mask relative to the image's own (< 1: closer to the truth than the image was), SSIM to the
  image (the paper's ~0.80) and SSIM outside the mask (what should not change).
- **Ablation** (the paper's: FID ~92 for the full method rising to ~113 without text and image prior) at the
  `attribution` settings: full, no text (empty prompt), no image prior (strength 1: a sample under the prompt),
  neither, and no fine-tune (the base model, when given), each set of counterparts of the abnormal images
  against the real healthy test images: FID in the judge's feature space (no Inception weights here), judge
  P(finding), SSIM to the input. References: the abnormal images themselves, the same through the autoencoder
  alone (strength 0: its blur is in every counterpart) and their true healthy renders. FID on tens of images
  in a 64-wide feature space carries a large small-sample bias: compare rows, not with the paper's numbers.
- **Induction** on healthy test images toward a finding's prompt (`img2img.induction`): judge P(finding)
  before and after; for a prompt naming a side, the share of the change on that side (the patient's left is
  the image's right).

Writes img2img.json, report.html and grid.png under the output folder; returns the JSON's content.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from cxrray.config import Config
from cxrray.errors import InputError
from cxrray.eval import html
from cxrray.eval.localisation import pixel_auroc, pointing_game, ssim_outside
from cxrray.pipelines.attribution.img2img import attribution_maps, reference_images
from cxrray.pipelines.judges import apply_batched, frechet
from cxrray.pipelines.saliency.classifier import load_classifier
from cxrray.pipelines.seeds import item_seeds
from cxrray.pipelines.truth import load_truth


def ssim_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of each pair of images [N, S, S] in [-1, 1] -> [N]."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    ta, tb = (torch.as_tensor((np.asarray(x, np.float32) + 1) / 2)[:, None] for x in (a, b))
    return ssim(ta, tb, data_range=1.0, reduction="none").numpy()


def side_share(change: np.ndarray, side: str) -> np.ndarray:
    """Per image [n], the share of |change| [n, S, S] on the patient's `side` ("left" | "right"): the patient's left
    is the image's right half (radiographic convention, as the phantoms draw it)."""
    change = np.abs(np.asarray(change, np.float64))
    half = change.shape[-1] // 2
    on_image_right = change[..., half:].sum(axis=(1, 2)) / np.maximum(change.sum(axis=(1, 2)), 1e-12)
    return on_image_right if side == "left" else 1 - on_image_right


class Judge:
    """The classifier trained here on real images: P(label) [n, F] and its features [n, D] of images [n, S, S]."""

    def __init__(self, folder: str | Path, findings: list[str]):
        self.net, record = load_classifier(folder)
        if record["findings"] != findings:
            raise InputError(f"judge {folder} labels {record['findings']}, the shards {findings}")

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return torch.sigmoid(apply_batched(self.net, torch.from_numpy(np.asarray(images, np.float32)[:, None]))).numpy()

    def features(self, images: np.ndarray) -> torch.Tensor:
        return apply_batched(self.net.features, torch.from_numpy(np.asarray(images, np.float32)[:, None]))


def _counterparts(model, images: np.ndarray, prompt: str, settings, keys: list[str], seed: int) -> np.ndarray:
    return attribution_maps(model, images, prompt, settings, item_seeds(seed, keys, len(images)))[1]


def run_img2img_study(data_uri: str, output_dir: str | Path, cfg: Config, ldm: str, judge: str,
                      base_ldm: str | None = None, progress=print) -> dict:
    """The sweep, ablation and induction (module doc) of the latent diffusion model `ldm` (and `base_ldm`, the
    model before its fine-tune) on `data_uri`'s test split, judged by the classifier folder `judge`."""
    from cxrray.models.loading import load_ema

    st, ac = cfg.img2img, cfg.attribution
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    test = load_truth(data_uri, cfg.localisation.test_split)
    if test.healthy is None:
        raise InputError(f"{data_uri}: no healthy counterparts (phantom.masks=true makes them)")
    missing = [f for f in st.findings if f not in test.masks]
    if missing:
        raise InputError(f"{data_uri}: no masks for {missing}")
    judged = Judge(judge, test.findings)
    model = load_ema(ldm)
    base = load_ema(base_ldm) if base_ldm else None
    x = test.images[:, 0]
    healthy_rows = np.flatnonzero((test.labels == 0).all(axis=1))
    if len(healthy_rows) < 2:
        raise InputError(f"{data_uri}: fewer than 2 test images without any finding")
    keys = lambda rows: [test.keys[i] for i in rows]  # noqa: E731
    seed = cfg.attribute.seed

    sweep, grid = [], []
    rows_of = {f: test.positives(f)[:st.images] for f in st.findings}
    for finding, rows in rows_of.items():
        j = test.findings.index(finding)
        others = [k for k in range(len(test.findings)) if k != j]
        masks, truth = test.masks[finding][rows], test.healthy[rows]
        before = judged.probabilities(x[rows])
        truth_error = np.abs(x[rows] - truth)[masks].mean()
        recon = reference_images(model, x[rows][:, None], ac.model_copy(update={"reference": "reconstruction"}))
        for strength in st.strengths:
            for guidance in st.guidances:
                settings = ac.model_copy(update={"strength": strength, "guidance": guidance})
                well = _counterparts(model, x[rows][:, None], ac.prompt, settings, keys(rows), seed)
                change = np.abs(x[rows] - well)
                after = judged.probabilities(well)
                sweep.append({"finding": finding, "strength": strength, "guidance": guidance, "images": int(len(rows)),
                              "pixel AUROC": float(np.nanmean(pixel_auroc(change, masks))),
                              "pixel AUROC vs D(E(x))": float(np.nanmean(pixel_auroc(np.abs(recon - well), masks))),
                              "pointing": float(np.mean(pointing_game(change, masks, cfg.localisation.tolerance_px))),
                              "P before": float(before[:, j].mean()), "P after": float(after[:, j].mean()),
                              "other labels |dP|": float(np.abs(after[:, others] - before[:, others]).mean()),
                              "error to truth / image's": float(np.abs(well - truth)[masks].mean() / max(truth_error, 1e-9)),
                              "SSIM": float(ssim_pairs(x[rows], well).mean()),
                              "SSIM outside mask": float(np.nanmean(ssim_outside(x[rows], well, masks)))})
                if strength == ac.strength and guidance == ac.guidance:
                    grid += [torch.from_numpy(x[rows][:6, None]), torch.from_numpy(well[:6, None]),
                             torch.from_numpy(truth[:6, None])]
                progress(f"[img2img] sweep {finding} strength {strength:g} guidance {guidance:g}: pixel AUROC "
                         f"{sweep[-1]['pixel AUROC']:.3f}, P {sweep[-1]['P before']:.2f} -> {sweep[-1]['P after']:.2f}")

    abnormal = np.unique(np.concatenate(list(rows_of.values())))
    real_healthy = judged.features(x[healthy_rows])
    finding_index = [test.findings.index(f) for f in st.findings]

    def judged_set(name: str, images: np.ndarray) -> dict:
        p = judged.probabilities(images)[:, finding_index]
        positive = test.labels[abnormal][:, finding_index] == 1
        return {"set": name, "images": int(len(images)), "FID to real healthy": frechet(judged.features(images), real_healthy),
                "P(finding) on positives": float(p[positive].mean()),
                "SSIM to input": float(ssim_pairs(x[abnormal], images).mean())}

    floor = ac.model_copy(update={"strength": 0.0})  # D(E(x)): what the autoencoder alone does to the images
    ablation = [judged_set("abnormal (reference: unchanged)", x[abnormal]),
                judged_set("abnormal through the autoencoder (reference: strength 0)",
                           _counterparts(model, x[abnormal][:, None], ac.prompt, floor, keys(abnormal), seed)),
                judged_set("true healthy renders (reference)", test.healthy[abnormal])]
    full_prior = ac.model_copy(update={"strength": 1.0})
    variants = [("full (text + image prior)", model, ac.prompt, ac), ("no text (empty prompt)", model, "", ac),
                ("no image prior (strength 1)", model, ac.prompt, full_prior), ("neither", model, "", full_prior)]
    if base is not None:
        variants.append(("no fine-tune (base model)", base, ac.prompt, ac))
    for name, net, prompt, settings in variants:
        ablation.append(judged_set(name, _counterparts(net, x[abnormal][:, None], prompt, settings, keys(abnormal), seed)))
        progress(f"[img2img] ablation {name}: FID {ablation[-1]['FID to real healthy']:.2f}")

    induction = []
    calm = healthy_rows[:st.images]
    calm_before = judged.probabilities(x[calm])
    for spec in st.induction:
        j = test.findings.index(spec["finding"])
        made = _counterparts(model, x[calm][:, None], spec["prompt"], ac, keys(calm), seed)
        before, after = calm_before[:, j], judged.probabilities(made)[:, j]
        row = {"induce": spec["name"], "prompt": spec["prompt"], "finding": spec["finding"], "images": int(len(calm)),
               "P before": float(before.mean()),
               "P after": float(after.mean()), "judged positive after": float((after > 0.5).mean())}
        if spec.get("side"):
            row["change on the named side"] = float(side_share(made - x[calm], spec["side"]).mean())
        induction.append(row)
        progress(f"[img2img] induce {spec['name']}: P {row['P before']:.2f} -> {row['P after']:.2f}")

    result = {"data": data_uri, "ldm": ldm, "base_ldm": base_ldm, "judge": judge,
              "settings": {"attribution": ac.model_dump(mode="json"), "img2img": st.model_dump(mode="json"),
                           "attribute_seed": seed},
              "sweep": sweep, "ablation": ablation, "induction": induction,
              "seconds": round(time.perf_counter() - start, 1)}
    (out / "img2img.json").write_text(json.dumps(result, indent=1))
    _report(result, out, grid)
    return result


def _report(result: dict, out: Path, grid: list[torch.Tensor]) -> None:
    from cxrray.eval.grids import save_grid

    sections = [("Strength x guidance sweep (test positives; judge = a classifier trained here on real images)",
                 html.table(result["sweep"], list(result["sweep"][0]))),
                ("Ablation: counterparts of the abnormal images against the real healthy ones",
                 html.table(result["ablation"], list(result["ablation"][0]))),
                ("Induction on healthy images", html.table(result["induction"],
                                                           list(dict.fromkeys(k for r in result["induction"] for k in r))))]
    if grid:
        save_grid([g.float() for g in grid], out / "grid.png",
                  "img2img at the attribution settings: per finding, images, counterparts, true healthy renders")
        sections.append(("Counterparts at the attribution settings", html.image(out / "grid.png")))
    note = ("FID here is read in the judge's feature space (no Inception weights can be downloaded), so its scale "
            "is not the paper's; the ordering is what compares. The paper's ablation: full ~92, neither ~113.")
    (out / "report.html").write_text(html.page("Latent-diffusion visual attribution: img2img examined", sections, note))
