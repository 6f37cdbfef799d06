"""DAug's super-classes from a data set's labels (MIMIC-CXR / CheXpert names and the phantoms' own), as DAug
groups them: No Finding; Cardiac (Enlarged Cardiomediastinum, Cardiomegaly); Lung Lesion; Opacity
(Consolidation, Edema, Pneumonia); Atelectasis; Pleural (Effusion, Other); Devices (Support Devices).
Labels outside these (pneumothorax, fracture, the echo labels) belong to no super-class.
"""
from __future__ import annotations

import numpy as np

SUPER_CLASSES: dict[str, tuple[str, ...]] = {  # super-class -> member labels (lower-case, any source's spelling)
    "cardiac": ("enlarged_cardiomediastinum", "enlarged cardiomediastinum", "cardiomegaly"),
    "lung_lesion": ("lung_lesion", "lung lesion", "nodule", "mass"),
    "opacity": ("consolidation", "edema", "pneumonia", "lung_opacity", "lung opacity", "infiltration"),
    "atelectasis": ("atelectasis",),
    "pleural": ("effusion", "pleural_effusion", "pleural effusion", "pleural_other", "pleural other",
                "pleural_thickening"),
    "devices": ("support_devices", "support devices", "chest_tube", "pacemaker", "ecg_leads"),
}
NO_FINDING = "no_finding"
#: the paper's noisy-classifier AP per super-class (MIMIC-CXR), in this order
PAPER_AP = {"no_finding": 0.631, "cardiac": 0.885, "lung_lesion": 0.407, "opacity": 0.857, "atelectasis": 0.778,
            "pleural": 0.746, "devices": 0.633}


def super_class_of(name: str) -> str | None:
    """The super-class a label belongs to (a super-class's own name is itself); None for a label in none."""
    name = name.lower()
    if name in SUPER_CLASSES or name == NO_FINDING:
        return name
    return next((sc for sc, members in SUPER_CLASSES.items() if name in members), None)


def super_class_names(vocabulary: list[str]) -> list[str]:
    """The super-classes `super_labels` gives for labels named by `vocabulary`, in its order."""
    return super_labels(np.zeros((0, len(vocabulary)), np.float32), vocabulary)[1]


def super_labels(labels: np.ndarray, vocabulary: list[str]) -> tuple[np.ndarray, list[str]]:
    """labels [N, F] in {0, 1, NaN} named by `vocabulary` -> (super-labels [N, K] in {0, 1, NaN}, their names).
    A super-class is 1 when any member is 1, 0 when every member is known 0, else NaN; super-classes with no
    member in the vocabulary are left out. No Finding is the source's own "No Finding" column when it has one,
    else 1 when every label but the devices is 0 (pathologies outside the super-classes, e.g. pneumothorax,
    count against it as in CheXpert), 0 when any is 1, else NaN; devices never count against it."""
    labels = np.asarray(labels, np.float64)
    index = {name.lower(): j for j, name in enumerate(vocabulary)}
    names, columns = [], []
    devices = {index[m] for m in SUPER_CLASSES["devices"] if m in index}
    own = next((index[n] for n in ("no_finding", "no finding") if n in index), None)
    pathology = [j for j in range(labels.shape[1]) if j not in devices and j != own]
    for name, members in SUPER_CLASSES.items():
        cols = [index[m] for m in members if m in index]
        if not cols:
            continue
        block = labels[:, cols]
        column = np.where((block == 1).any(axis=1), 1.0, np.where((block == 0).all(axis=1), 0.0, np.nan))
        names.append(name)
        columns.append(column)
    if own is not None or pathology:
        block = labels[:, pathology]
        none = labels[:, own] if own is not None else np.where(
            (block == 1).any(axis=1), 0.0, np.where((block == 0).all(axis=1), 1.0, np.nan))
        names.insert(0, NO_FINDING)
        columns.insert(0, none)
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(labels), 0), np.float32), names
