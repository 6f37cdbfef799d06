"""`cxrray audit-synthetic`: is a synthetic set faithful, realistic, and safe to share?

Fidelity: an image-only judge (`detector.ImageJudge`), trained here on the real training split and
stopped early on the validation split, reads ivsd / lvidd / lvpwd / age and sex off every synthetic image.
Reported: Pearson r between requested and judged values, the same with the requested values shuffled
(the control: ~0), and the judge's own r on real test images (its ceiling); sex as AUROC of the judged
logit against the requested sex.

Quality: Fréchet distance and KID (torchmetrics, with the judge's trunk as the feature extractor, or a
user's TorchScript Inception file) between synthetic, train and test sets.

Memorisation: each synthetic image's nearest training image (faiss, exact L2) in pixel space (images
average-pooled to `pixel_size`) and in the judge's feature space (standardised by the training set),
against real test images' nearest-training distances: a synthetic image closer than the
`near_copy_quantile` of the test distances is flagged; a one-sided binomial test asks whether more are
flagged than that quantile would give by chance. The closest pairs are drawn as a grid.

Output (URI; also logged to MLflow, run "audit-synthetic"): audit.json, report.html, distances.png,
closest_pairs.png, judge.safetensors.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrray.data.imaging import png16_to_model
from cxrray.data.shards import jsonable
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.eval import html
from cxrray.pipelines.cohorts.echo_sets import ECHO, EchoSet, load_echo_set
from cxrray.pipelines.judges import ScriptedFeatures, apply_batched, image_quality
from cxrray.pipelines.settings import SyntheticAuditConfig

JUDGED = (*ECHO, "age")  # regression outputs, then the sex logit


def _images(s: EchoSet, rows=slice(None)) -> torch.Tensor:
    return torch.from_numpy(png16_to_model(s.image[rows]))[:, None]


def _targets(s: EchoSet, stats: dict) -> torch.Tensor:
    """[N, 5]: echo and age in the judge's z-units (NaN age stays NaN), then sex."""
    z = np.concatenate([(s.echo - stats["mean"][:3]) / stats["sd"][:3],
                        ((s.age - stats["mean"][3]) / stats["sd"][3])[:, None], s.sex[:, None]], axis=1)
    return torch.from_numpy(z.astype(np.float32))


def judge_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error on the known z-values + binary cross-entropy on sex."""
    known = ~torch.isnan(target[:, :4])
    mse = ((out[:, :4] - target[:, :4].nan_to_num()) ** 2 * known).sum() / known.sum().clamp(min=1)
    return mse + nn.functional.binary_cross_entropy_with_logits(out[:, 4], target[:, 4])


def train_judge(train: EchoSet, val: EchoSet, cfg: SyntheticAuditConfig) -> tuple[nn.Module, dict, dict]:
    """-> (judge at its best validation epoch, its z-statistics, its training record)."""
    from cxrray.pipelines.cohorts.detector import ImageJudge
    from cxrray.pipelines.judges import train_epochs

    values = np.concatenate([train.echo, train.age[:, None]], axis=1)
    stats = {"mean": np.nanmean(values, axis=0), "sd": np.maximum(np.nanstd(values, axis=0), 1e-3)}
    torch.manual_seed(cfg.seed)
    judge = ImageJudge(cfg.width)
    data = {"image": _images(train), "target": _targets(train, stats)}
    val_images, val_targets = _images(val), _targets(val, stats)

    def validate(net) -> float:
        net.eval()
        return float(judge_loss(apply_batched(net, val_images), val_targets))

    best_state, best, epoch, history = train_epochs(judge, judge, data, lambda m, b: judge_loss(m(b["image"]), b["target"]),
                                                    validate, cfg, cfg.seed)
    judge.load_state_dict(best_state)
    judge.eval()
    return judge, stats, {"best_epoch": epoch, "best_val_loss": best, "epochs_run": len(history)}


def fidelity(judge: nn.Module, stats: dict, syn: EchoSet, test: EchoSet, seed: int) -> dict:
    """Per judged quantity: r(requested, judged) on synthetic, with requested shuffled, and on real test
    (the judge's ceiling); `of_ceiling` = r_requested / r_real_test."""
    from sklearn.metrics import roc_auc_score

    def judged(s: EchoSet) -> np.ndarray:
        out = apply_batched(judge, _images(s)).numpy()
        return np.concatenate([out[:, :4] * stats["sd"] + stats["mean"], out[:, 4:]], axis=1)

    def r(a, b) -> float:
        keep = ~(np.isnan(a) | np.isnan(b))
        return float(np.corrcoef(a[keep], b[keep])[0, 1]) if keep.sum() > 2 and np.std(a[keep]) > 0 else float("nan")

    on_syn, on_test = judged(syn), judged(test)
    requested = {"ivsd": syn.echo[:, 0], "lvidd": syn.echo[:, 1], "lvpwd": syn.echo[:, 2], "age": syn.age}
    real = {"ivsd": test.echo[:, 0], "lvidd": test.echo[:, 1], "lvpwd": test.echo[:, 2], "age": test.age}
    shuffle = np.random.default_rng(seed).permutation(len(syn))
    out = {}
    for j, name in enumerate(JUDGED):
        r_syn, r_real = r(requested[name], on_syn[:, j]), r(real[name], on_test[:, j])
        out[name] = {"r_requested": r_syn, "r_shuffled": r(requested[name][shuffle], on_syn[:, j]), "r_real_test": r_real,
                     "of_ceiling": r_syn / r_real if r_real > 0 else float("nan"),  # issue 27's goal: >= 0.8
                     "judged_mean": float(np.mean(on_syn[:, j])), "requested_mean": float(np.nanmean(requested[name]))}
    both = lambda y: 0 < y.sum() < len(y)  # noqa: E731
    out["sex"] = {"auroc_requested": float(roc_auc_score(syn.sex, on_syn[:, 4])) if both(syn.sex) else float("nan"),
                  "auroc_shuffled": float(roc_auc_score(syn.sex[shuffle], on_syn[:, 4])) if both(syn.sex) else float("nan"),
                  "auroc_real_test": float(roc_auc_score(test.sex, on_test[:, 4])) if both(test.sex) else float("nan"),
                  "agreement": float(np.mean((on_syn[:, 4] > 0) == (syn.sex > 0.5)))}
    return out


FIDELITY_COLUMNS = ["set", "covariate", "r_requested", "r_shuffled", "of_ceiling", "sex_auroc_requested"]


def fidelity_rows(by_set: dict[str, dict]) -> list[dict]:
    """One row per set and echo covariate of `fidelity` outputs keyed by set name (FIDELITY_COLUMNS)."""
    return [{"set": name, "covariate": c, **f[c], "sex_auroc_requested": f["sex"]["auroc_requested"]}
            for name, f in by_set.items() for c in ("ivsd", "lvidd", "lvpwd")]


def nearest(reference: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbour of each query row among the reference rows (faiss) -> (distance, index)."""
    import faiss

    index = faiss.IndexFlatL2(reference.shape[1])
    index.add(np.ascontiguousarray(reference, dtype=np.float32))
    d2, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    return np.sqrt(np.maximum(d2[:, 0], 0.0)), idx[:, 0]


def memorisation(spaces: dict[str, dict[str, np.ndarray]], quantile: float) -> dict:
    """spaces: {space: {"train", "test", "synthetic": [N, D]}} -> per space: distances and flagged rows."""
    from scipy.stats import binomtest

    out = {}
    for space, rows in spaces.items():
        d_syn, nn_syn = nearest(rows["train"], rows["synthetic"])
        d_test, _ = nearest(rows["train"], rows["test"])
        threshold = float(np.quantile(d_test, quantile))
        flagged = np.flatnonzero(d_syn < threshold)
        test = binomtest(len(flagged), len(d_syn), quantile, alternative="greater")
        out[space] = {"threshold": threshold, "flagged": int(len(flagged)), "flagged_pct": 100 * len(flagged) / len(d_syn),
                      "expected_pct": 100 * quantile, "p_value_more_than_expected": float(test.pvalue),
                      "median_synthetic_to_train": float(np.median(d_syn)), "median_test_to_train": float(np.median(d_test)),
                      "distances": {"synthetic": d_syn, "test": d_test}, "nearest_train": nn_syn, "flagged_rows": flagged}
    return out


def _plot_distances(path: Path, memo: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(memo), 3.6))
    FigureCanvasAgg(fig)
    for k, (space, m) in enumerate(memo.items()):
        ax = fig.add_subplot(1, len(memo), k + 1)
        bins = np.histogram_bin_edges(np.concatenate(list(m["distances"].values())), bins=40)
        for name, d in m["distances"].items():
            ax.hist(d, bins=bins, alpha=0.5, density=True, label=f"{name} -> train")
        ax.axvline(m["threshold"], color="red", lw=1, label="near-copy threshold")
        ax.set(title=f"nearest training image ({space})", xlabel="L2 distance", ylabel="density")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_synthetic_audit(synthetic_uri: str, train_uri: str, output_uri: str, cfg, test_uri: str | None = None,
                        features_model: str | None = None, also: dict[str, str] | None = None, progress=print) -> dict:
    """Fidelity, quality and memorisation of the synthetic set at `synthetic_uri` (module doc); returns audit.json.
    `also` names more synthetic sets (e.g. one per guidance) whose fidelity the same judge measures
    (audit["fidelity_also"][name])."""
    from safetensors.torch import save

    from cxrray.eval.grids import save_grid
    from cxrray.tracking import RunLogger, start_run, tracking_uri

    ac: SyntheticAuditConfig = cfg.synthetic_audit
    scripted = ScriptedFeatures(features_model) if features_model else None  # a bad path fails before any work
    train, val = load_echo_set(train_uri, ac.train_split), load_echo_set(train_uri, ac.val_split)
    test, syn = load_echo_set(test_uri or train_uri, ac.test_split), load_echo_set(synthetic_uri, None)
    if syn.image.shape[1:] != train.image.shape[1:]:
        raise InputError(f"synthetic images are {syn.image.shape[1:]}, real ones {train.image.shape[1:]}: "
                         "generate at the real shards' size")
    progress(f"[audit-synthetic] judge on {len(train)} real images (val {len(val)}); synthetic {len(syn)}, test {len(test)}")
    judge, stats, record = train_judge(train, val, ac)
    faithful = fidelity(judge, stats, syn, test, ac.seed)
    faithful_also = {name: fidelity(judge, stats, load_echo_set(uri, None), test, ac.seed) for name, uri in (also or {}).items()}
    images = {"synthetic": _images(syn), "train": _images(train), "test": _images(test)}
    feats = {k: apply_batched(judge.features, v) for k, v in images.items()}
    quality = {"judge_features": image_quality(feats, ac)}
    if scripted is not None:
        quality["torchscript_features"] = image_quality({k: apply_batched(scripted, v) for k, v in images.items()}, ac)
    pooled = {k: nn.functional.adaptive_avg_pool2d(v, ac.pixel_size).flatten(1).numpy() for k, v in images.items()}
    feats = {k: v.numpy() for k, v in feats.items()}
    mu, sd = feats["train"].mean(axis=0), feats["train"].std(axis=0) + 1e-6
    memo = memorisation({"pixels": pooled, "features": {k: (v - mu) / sd for k, v in feats.items()}}, ac.near_copy_quantile)
    pix = memo["pixels"]
    closest = np.argsort(pix["distances"]["synthetic"])[:ac.grid_pairs]
    audit = {"synthetic": synthetic_uri, "train": train_uri, "test": test_uri or train_uri,
             "images": {k: len(v) for k, v in images.items()}, "judge": record, "fidelity": faithful,
             "fidelity_also": faithful_also, "quality": quality,
             "memorisation": {s: {k: v for k, v in m.items() if k not in ("distances", "nearest_train", "flagged_rows")}
                              for s, m in memo.items()},
             "closest_pairs": [{"synthetic": syn.key[i], "train": train.key[pix["nearest_train"][i]],
                                "distance": float(pix["distances"]["synthetic"][i])} for i in closest],
             "config": ac.model_dump(mode="json")}
    out = Storage(output_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _plot_distances(folder / "distances.png", memo)
        save_grid([images["synthetic"][closest], images["train"][pix["nearest_train"][closest]]],
                  folder / "closest_pairs.png", "top row: synthetic images closest to a training image; bottom: that image")
        (folder / "judge.safetensors").write_bytes(save(judge.state_dict(), metadata={"stats": json.dumps(jsonable(stats))}))
        fid_rows = [{"pair": p, **v} for p, v in quality["judge_features"].items()]
        fid_rows.append({"pair": "paper (Inception): gen-vs-train / gen-vs-test / train-vs-test", "fid": "9.62 / 13.5 / 4.07"})
        memo_rows = [{"space": s, **audit["memorisation"][s]} for s in memo]
        sections = [
            ("Fidelity: the judge reads the requested covariates off the image",
             html.table([{"covariate": k, **v} for k, v in faithful.items() if k != "sex"],
                        ["covariate", "r_requested", "r_shuffled", "r_real_test", "of_ceiling", "requested_mean", "judged_mean"])
             + html.table([{"covariate": "sex", **faithful["sex"]}], ["covariate", *faithful["sex"]])),
            *([("Fidelity of the further sets (same judge)", html.table(fidelity_rows(faithful_also), FIDELITY_COLUMNS))]
              if faithful_also else []),
            ("Image quality (FID / KID, judge features)", html.table(fid_rows, ["pair", "fid", "kid", "kid_sd", "kid_subset"], 4)),
            ("Memorisation (nearest training image)", html.table(memo_rows, list(memo_rows[0]), 4)),
            ("Distances", html.image(folder / "distances.png")),
            ("Closest pairs", html.image(folder / "closest_pairs.png", "synthetic (top) and its nearest training image")),
        ]
        (folder / "report.html").write_text(html.page("Synthetic set audit", sections,
                                                      "Judge trained here on the real training split; Inception "
                                                      "features only with --features-model (no download)."))
        run_id = start_run(cfg.tracking, {"synthetic_audit": audit["config"], "synthetic": synthetic_uri,
                                          "train": train_uri}, run_name="audit-synthetic")
        audit["mlflow_run_id"] = run_id
        (folder / "audit.json").write_text(json.dumps(jsonable(audit), indent=1))
        logger = RunLogger(tracking_uri(cfg.tracking), run_id)
        logger.metrics({f"r_requested/{k}": v["r_requested"] for k, v in faithful.items() if k != "sex"}
                       | {f"r_requested/{k}/{name}": v[k]["r_requested"] for name, v in faithful_also.items() for k in JUDGED}
                       | {f"fid/{p}": v["fid"] for p, v in quality["judge_features"].items()}
                       | {f"near_copies_pct/{s}": m["flagged_pct"] for s, m in memo.items()}, step=0)
        for path in sorted(folder.iterdir()):
            out.write_bytes(path.name, path.read_bytes())
            logger.artifact(path, "audit-synthetic")
        logger.finish()
    progress("[audit-synthetic] judge r (requested / shuffled): "
             + ", ".join(f"{k} {v['r_requested']:.2f}/{v['r_shuffled']:.2f}" for k, v in faithful.items() if k != "sex")
             + f"; FID syn-train {quality['judge_features']['synthetic_vs_train']['fid']:.3f}; near-copies "
             f"{memo['pixels']['flagged_pct']:.1f}% (pixels), {memo['features']['flagged_pct']:.1f}% (features); "
             f"report {out.url('report.html')}")
    return jsonable(audit)
