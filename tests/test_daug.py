"""DAug, the part built so far (issue 29 §3): super-classes from a data set's labels, and the noise-aware
classifier's known answer — a class drawn plainly in the image is learnt (AP near 1 on clean images) and
fades toward chance as t approaches T, the curve the paper's Table 1 summarises."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxrray.config import load_config
from cxrray.pipelines.daug.noisy_classifier import average_precision_by_t, train_noisy_classifier
from cxrray.families.daug.superclasses import NO_FINDING, super_labels

NAN = np.nan


def test_super_labels_follow_dAugs_grouping_and_keep_unknowns_unknown():
    vocab = ["cardiomegaly", "effusion", "nodule", "pneumothorax", "chest_tube", "slvh"]
    labels = np.array([[1, 0, 0, 0, 0, 1],      # cardiac
                       [0, 0, 0, 0, 1, 0],      # a device only: still no finding
                       [0, NAN, 0, 0, 0, 0],    # effusion unknown: pleural and no-finding unknown
                       [0, 0, 1, 1, 0, 0],      # lesion (pneumothorax has no super-class)
                       [0, 0, 0, 1, 0, 0]])     # pneumothorax alone: in no super-class, yet not "no finding"
    y, names = super_labels(labels, vocab)
    assert names == [NO_FINDING, "cardiac", "lung_lesion", "pleural", "devices"]
    col = {n: y[:, i] for i, n in enumerate(names)}
    np.testing.assert_array_equal(col["cardiac"], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(col["devices"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(col[NO_FINDING][[0, 1, 3, 4]], [0, 1, 0, 0])
    assert np.isnan(col[NO_FINDING][2]) and np.isnan(col["pleural"][2])
    np.testing.assert_array_equal(col["lung_lesion"], [0, 0, 0, 1, 0])
    own, _ = super_labels(np.array([[0, 1, 1.0]]), ["effusion", "pacemaker", "No Finding"])  # the source's own column
    assert own[0, 0] == 1.0


def _squares(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16² noise images; class 0 = a bright 6x6 square, class 1 = a dark one (independent, ~half each)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.1, (n, 1, 16, 16)).astype(np.float32)
    y = (rng.random((n, 2)) < 0.5).astype(np.float32)
    for i in range(n):
        if y[i, 0]:
            images[i, 0, 2:8, 2:8] += 0.8
        if y[i, 1]:
            images[i, 0, 9:15, 9:15] -= 0.8
    return images, y


def test_the_noisy_classifier_learns_a_plain_class_and_loses_it_to_noise():
    cfg = load_config("tiny", ["noisy_classifier.epochs=12", "noisy_classifier.width=8", "noisy_classifier.patience=12",
                               "noisy_classifier.timesteps=[0,500,999]"]).noisy_classifier
    train, val, test = _squares(384, 0), _squares(96, 1), _squares(200, 2)
    net, record = train_noisy_classifier(*train, *val, cfg, progress=lambda line: None)
    rows = average_precision_by_t(net, *test, ["bright", "dark"], [0, 500, 999], seed=0)
    for row in rows:
        assert row["ap_t0"] > 0.9, row  # learnt where the class is plain
        assert row["ap_t999"] < row["ap_t0"] - 0.2 and row["ap_t999"] < row["prevalence"] + 0.25, row  # noise wins
    assert record["best_epoch"] >= 1


def test_classifier_guidance_moves_the_translation_toward_the_class_and_the_heatmap_shows_where():
    """DAug's translation on the squares: with a random-init pixel DDPM (no covariates) the unguided
    translation carries no class; guidance toward "bright square" raises the noise-aware classifier's P on
    the result (read at t = 0), guidance away lowers it, the start is set by alpha_bar, and the heatmap of the
    change peaks where the square is drawn more often than chance."""
    import torch

    from cxrray.families import get_family
    from cxrray.families.ddpm.config import DDPMConfig
    from cxrray.pipelines.daug.translate import heatmaps, start_fraction, translate

    cfg = load_config("tiny", ["noisy_classifier.epochs=10", "noisy_classifier.width=8",
                               "noisy_classifier.patience=10"]).noisy_classifier
    net, _ = train_noisy_classifier(*_squares(384, 0), *_squares(96, 1), cfg, progress=lambda line: None)
    torch.manual_seed(0)
    ddpm = get_family("ddpm").build(DDPMConfig(image_size=16, base_channels=16, channel_mult=(1, 2),
                                               layers_per_block=1, attention_resolutions=(), norm_groups=8)).eval()
    assert abs(start_fraction(0.08) - 0.5) < 0.1  # the linear schedule's alpha_bar 0.08 is near t = 500
    images, y = _squares(16, 3)
    x = torch.from_numpy(images)
    seeds = list(range(16))
    up, plain = translate(ddpm, net, x, 0, 20.0, 0.3, 10, seeds)
    down, plain_again = translate(ddpm, net, x, 0, -20.0, 0.3, 10, seeds)
    assert torch.equal(plain, plain_again)  # the same noise: the unguided arm repeats
    up_alone, _ = translate(ddpm, net, x[5:7], 0, 20.0, 0.3, 10, seeds[5:7])
    assert (up_alone - up[5:7]).abs().max() < 1e-4  # an image's translation does not depend on its batch
    p = {name: torch.sigmoid(net(v, torch.zeros(len(v), dtype=torch.long))[:, 0]).mean().item()
         for name, v in (("up", up), ("plain", plain), ("down", down))}
    assert p["down"] < p["plain"] < p["up"], p  # the sign of guidance, both ways (ordering only: a random DDPM)
    maps = heatmaps(up, plain)
    assert maps.shape == (16, 16, 16) and np.isclose(maps.max(axis=(1, 2)), 1.0).all()
    inside = maps[:, 2:8, 2:8].mean()
    assert inside > maps.mean(), (inside, maps.mean())  # the guided change gathers where the class is drawn


def test_augment_writes_each_images_heatmaps_beside_it_once_and_reruns_nothing(ray_local, tmp_path, monkeypatch):
    """`cxrray augment` on phantom shards with a random-init pixel DDPM and a 1-epoch noise-aware classifier
    (plumbing, not quality): every sample gains one heatmap per class in [0, 1] with its peak at 1, the rest of
    the sample is kept byte for byte, and a rerun writes nothing."""
    import torch

    from conftest import write_checkpoint
    from cxrray.cli import main
    from cxrray.data.imaging import decode_png16
    from cxrray.data.shards import read_manifest, read_tar
    from cxrray.families import get_family
    from cxrray.families.ddpm.config import DDPMConfig

    monkeypatch.setenv("CXRRAY_SALT", "daug-test")
    assert main(["phantoms", "--n", "40", "--out", str(tmp_path / "ph"), "--set", "phantom.size=48"]) == 0
    assert main(["ingest", "--input", str(tmp_path / "ph"), "--labels", str(tmp_path / "ph" / "labels.csv"),
                 "--output", f"file://{tmp_path}/shards", "--size", "16", "--set", "ingest.shard_samples=10"]) == 0
    assert main(["evaluate", "noisy-classifier", "--data", f"file://{tmp_path}/shards", "--output",
                 str(tmp_path / "nc"), "--set", "noisy_classifier.epochs=1", "--set", "noisy_classifier.width=8"]) == 0
    torch.manual_seed(0)
    ddpm = get_family("ddpm").build(DDPMConfig(image_size=16, base_channels=16, channel_mult=(1, 2),
                                               layers_per_block=1, attention_resolutions=(), norm_groups=8))
    ckpt = write_checkpoint(ddpm, tmp_path / "ddpm", 1)
    args = ["augment", "--ddpm", f"file://{ckpt}", "--classifier", str(tmp_path / "nc"), "--data",
            f"file://{tmp_path}/shards", "--output", f"file://{tmp_path}/aug", "--set", "augment.steps=4",
            "--set", "augment.start_alpha_bar=0.3"]
    assert main(args) == 0
    source, out = read_manifest(f"file://{tmp_path}/shards"), read_manifest(f"file://{tmp_path}/aug")
    assert out["samples"] == source["samples"] == 40 and {"heatmap_cardiac.png", "heatmap_pleural.png"} <= set(out["members"])
    before = {k: (png, meta) for s in source["shards"] for k, png, meta in read_tar((tmp_path / "shards" / s["name"]).read_bytes())}
    for s in out["shards"]:
        for key, png, meta, extra in read_tar((tmp_path / "aug" / s["name"]).read_bytes(), extras=True):
            assert (png, meta) == before[key]  # the sample itself is kept
            for name in ("heatmap_cardiac.png", "heatmap_pleural.png"):
                heat = decode_png16(extra[name]) / 65535
                assert heat.shape == (16, 16) and abs(heat.max() - 1.0) < 1e-4 and heat.min() >= 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "aug").iterdir()}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "aug").iterdir() if p.name != "manifest.json"} == {
        k: v for k, v in mtimes.items() if k != "manifest.json"}
    bad = [*args[:-4], "--set", "augment.classes=[nonsense]"]
    assert main(bad) == 2
    # `cxrray attribute --method guided`: the same translation from the same per-key seed, so an image's map is
    # its augment heatmap of the finding's super-class (effusion -> pleural), as 16-bit PNGs
    guided = ["attribute", "--method", "guided", "--checkpoint", f"file://{ckpt}", "--classifier", str(tmp_path / "nc"),
              "--data", f"file://{tmp_path}/shards", "--finding", "effusion", "--output", str(tmp_path / "maps"),
              "--limit", "3", "--set", "augment.steps=4", "--set", "augment.start_alpha_bar=0.3"]
    assert main(guided) == 0
    # the classifier as the guided family, trained on Ray Train: `evaluate noisy-classifier --checkpoint` scores it
    # and writes the folder augment reads; augment takes the checkpoint itself too, with the same heatmaps
    assert main(["pretrain", "--data", f"file://{tmp_path}/shards", "--output", f"file://{tmp_path}/guided",
                 "--set", "model.family=guided", "--set", "model.image_size=16", "--set", "train.images=96",
                 "--set", "train.global_batch=16", "--set", "train.num_workers=1", "--set", "train.strategy=ddp",
                 "--set", "train.eval_every=96", "--set", "train.checkpoint_every=96", "--set", "train.lr=0.001"]) == 0
    assert main(["evaluate", "noisy-classifier", "--data", f"file://{tmp_path}/shards", "--output",
                 str(tmp_path / "nc-ray"), "--checkpoint", f"file://{tmp_path}/guided"]) == 0
    record = json.loads((tmp_path / "nc-ray" / "noisy_classifier.json").read_text())
    assert record["training"]["checkpoint"]["uri"].startswith(f"file://{tmp_path}/guided")
    assert [r["super_class"] for r in record["average_precision"]] == record["super_classes"] and record["config"]["blocks"] == 3
    for source, target in ((str(tmp_path / "nc-ray"), "aug-folder"), (f"file://{tmp_path}/guided", "aug-ckpt")):
        assert main([*args[:4], source, *args[5:8], f"file://{tmp_path}/{target}", *args[9:]]) == 0
    folder_maps, ckpt_maps = ({k: e["heatmap_cardiac.png"] for s in read_manifest(f"file://{tmp_path}/{t}")["shards"]
                               for k, _, _, e in read_tar((tmp_path / t / s["name"]).read_bytes(), extras=True)}
                              for t in ("aug-folder", "aug-ckpt"))
    assert folder_maps == ckpt_maps and len(folder_maps) == 40
    heat = {key: extra["heatmap_pleural.png"] for s in out["shards"]
            for key, _, _, extra in read_tar((tmp_path / "aug" / s["name"]).read_bytes(), extras=True)}
    written = sorted((tmp_path / "maps").glob("*.effusion.guided.map.png"))
    assert len(written) == 3 and len(list((tmp_path / "maps").glob("*.guided.json"))) == 3
    for path in written:
        key = path.name.split(".")[0]
        np.testing.assert_allclose(decode_png16(path.read_bytes()) / 65535, decode_png16(heat[key]) / 65535, atol=2e-3)
    assert main([*guided[:7], "--data", f"file://{tmp_path}/shards", "--finding", "pneumothorax", "--output",
                 str(tmp_path / "maps2")]) == 2  # in no super-class
    assert main([*guided[:3], "--checkpoint", f"file://{ckpt}", "--data", f"file://{tmp_path}/shards", "--finding",
                 "effusion", "--output", str(tmp_path / "maps3")]) == 2  # no --classifier


def _masks_as_heatmaps(source: str, target: str) -> None:
    """The phantoms' own finding masks as DAug's heatmap members (a perfect heatmap: the known answer)."""
    from cxrray.data.imaging import decode_png16, encode_png16
    from cxrray.data.shards import MANIFEST, dumps, read_manifest, read_tar, write_shard
    from cxrray.data.storage import Storage

    def heatmap(mask_png: bytes) -> bytes:  # masks are stored 0/1 or 0/255: heatmaps span the 16 bits
        return encode_png16((decode_png16(mask_png) > 0).astype(np.float32))

    src, out = Storage(source), Storage(target)
    manifest = read_manifest(src)
    as_heatmap = {"mask_cardiomegaly.png": "heatmap_cardiac.png", "mask_effusion.png": "heatmap_pleural.png"}
    for shard in manifest["shards"]:
        samples = [(key, png, meta, {**extra, **{as_heatmap[m]: heatmap(v) for m, v in extra.items() if m in as_heatmap}})
                   for key, png, meta, extra in read_tar(src.read_bytes(shard["name"]), extras=True)]
        write_shard(out, shard["name"], "test", samples, [], manifest["label_vocabulary"])
    out.write_bytes(MANIFEST, dumps({**manifest, "members": sorted({*manifest["members"], *as_heatmap.values()})}))


def test_downstream_arms_on_ray_train_use_true_heatmaps_and_not_shuffled_ones(ray_local, tmp_path, monkeypatch, capsys):
    """`cxrray evaluate daug` with the masks as heatmaps: the `heatmaps` arm (trained on Ray Train like every
    arm) classifies pleural and cardiac from them near perfectly, the `shuffled` control cannot use them, the
    paired bootstrap says so, retrieval is scored in [0, 1]; a 50% subset keeps whole patients and the other
    splits; a rerun trains nothing."""
    import json

    from cxrray.cli import main
    from cxrray.data.shards import read_manifest, read_tar
    from cxrray.pipelines.daug.downstream import train_subset

    monkeypatch.setenv("CXRRAY_SALT", "daug-downstream")
    assert main(["phantoms", "--n", "240", "--out", str(tmp_path / "ph"), "--set", "phantom.masks=true",
                 "--set", "phantom.size=64"]) == 0
    assert main(["ingest", "--input", str(tmp_path / "ph"), "--labels", str(tmp_path / "ph" / "labels.csv"),
                 "--output", f"file://{tmp_path}/shards", "--set", "ingest.size=32", "--set", "ingest.shard_samples=60",
                 "--set", 'ingest.split_fractions={"train": 0.6, "val": 0.1, "test": 0.3}']) == 0
    _masks_as_heatmaps(f"file://{tmp_path}/shards", f"file://{tmp_path}/aug")
    # the subset: whole patients of the train split, every other split untouched
    half = train_subset(f"file://{tmp_path}/aug", f"file://{tmp_path}/half", 0.5, seed=0)
    full, sub = read_manifest(f"file://{tmp_path}/aug"), read_manifest(half)
    assert 0.3 < sub["splits"]["train"]["images"] / full["splits"]["train"]["images"] < 0.7
    assert sub["splits"]["test"] == full["splits"]["test"] and sub["splits"]["val"] == full["splits"]["val"]
    kept = {m["patient"] for s in sub["shards"] for _, _, m in read_tar((tmp_path / "half" / s["name"]).read_bytes())
            if m["split"] == "train"}
    every = [m for s in full["shards"] for _, _, m in read_tar((tmp_path / "aug" / s["name"]).read_bytes())]
    assert sum(m["patient"] in kept for m in every if m["split"] == "train") == sub["splits"]["train"]["images"]

    args = ["evaluate", "daug", "--data", f"file://{tmp_path}/aug", "--output", str(tmp_path / "ds"),
            "--set", "downstream.arms=[heatmaps,shuffled]", "--set", "downstream.fractions=[1.0]",
            "--set", "downstream.images=3200", "--set", "downstream.n_boot=500", "--set", "train.num_workers=1",
            "--set", 'downstream.model={"width": 8, "embed_dim": 32}']  # DeepSpeed, the default engine
    assert main(args) == 0
    result = json.loads((tmp_path / "ds" / "downstream.json").read_text())
    arms = result["fractions"]["f1"]["arms"]
    for name in ("pleural", "cardiac"):
        assert arms["heatmaps"]["classes"][name]["auroc"] > 0.95, (name, arms["heatmaps"]["classes"][name])
        test = next(c for c in result["fractions"]["f1"]["comparisons"]
                    if c["against"] == "shuffled" and c["metric"] == f"AUROC {name}")
        assert test["diff"] > 0 and test["p_value"] < 0.05, test
    for arm in arms.values():
        assert all(0 <= arm["retrieval"][m] <= 1 for m in ("ap@10", "hit@1", "hit@5", "hit@10"))
        assert arm["retrieval"]["hit@1"] <= arm["retrieval"]["hit@5"] <= arm["retrieval"]["hit@10"]
    assert "| f1 | heatmaps |" in (tmp_path / "ds" / "table.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("nothing to do") == 2  # every arm finished: nothing retrained


def test_retrieval_metrics_equal_a_brute_force_ranking_and_leave_out_the_querys_patient():
    """faiss neighbours + pattern counts against a plain sort over every pair: AP@10 and hit@1 per query, with and
    without the query's patient's other images in its gallery; a query without positives is NaN."""
    from cxrray.eval.retrieval import per_query

    rng = np.random.default_rng(0)
    n = 60
    positives = rng.random((n, 3)) < 0.3
    emb = rng.normal(size=(n, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    patients = [str(i // 3) for i in range(n)]
    for groups in (None, patients):
        g = np.arange(n).astype(str) if groups is None else np.array(groups)
        got = per_query(emb, positives, (1, 5, 10), 10, groups=groups)
        for i in range(n):
            order = [j for j in np.argsort(-(emb @ emb[i])) if g[j] != g[i]]
            rel = np.array([(positives[i] & positives[j]).any() for j in order])
            if not positives[i].any() or not rel.any():
                assert np.isnan(got["ap@10"][i]) and np.isnan(got["hit@1"][i])
                continue
            hits = rel[:10]
            ap = (np.cumsum(hits) / np.arange(1, 11) * hits).sum() / min(10, rel.sum())
            assert got["ap@10"][i] == pytest.approx(ap) and got["hit@1"][i] == float(rel[0])
            assert got["hit@5"][i] == float(rel[:5].any())
