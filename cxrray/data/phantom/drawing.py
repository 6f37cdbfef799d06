"""Compose anatomy, findings, devices, exposure and noise into one density image."""
from __future__ import annotations

import numpy as np

from . import findings as fnd
from .anatomy import F32, Anatomy, Frame, blur, smooth_noise, soft, splat
from .cases import PhantomCase, render_rng
from .config import PhantomConfig


def image_shape(case: PhantomCase, cfg: PhantomConfig) -> tuple[int, int]:
    rows = cfg.size
    return rows, max(8, int(round(rows * case.pose.aspect)))


def _vessels(an: Anatomy, rng: np.random.Generator, side: int) -> np.ndarray:
    """Vascular markings: a random branching tree of tapering curves from the hilum, plus the hilum.

    Branches are sampled as dense points, splatted onto the grid and blurred (cheap at any size)."""
    fr = an.fr
    hx, hy = 0.085, 0.43
    n0 = 6
    ang = np.array([-1.35, -0.85, -0.3, 0.25, 0.75, 1.2]) + rng.normal(0, 0.12, n0)
    x0, y0 = np.full(n0, hx), np.full(n0, hy)
    length, weight = rng.uniform(0.1, 0.125, n0), np.ones(n0)
    xs, ys, ws = [], [], []
    for depth in range(4):  # each level: all branches at once, then split each in two
        n = len(ang)
        x1, y1 = x0 + length * np.cos(ang), y0 + length * np.sin(ang)
        mx = (x0 + x1) / 2 + rng.normal(0, 1, n) * 0.12 * length
        my = (y0 + y1) / 2 + rng.normal(0, 1, n) * 0.12 * length
        t = np.linspace(0, 1, max(3, int(length.max() * fr.k / 0.6)))[None, :]
        # quadratic Bezier through a wiggled midpoint, ~0.6 px between samples
        xs.append(((1 - t) ** 2 * x0[:, None] + 2 * t * (1 - t) * mx[:, None] + t**2 * x1[:, None]).ravel())
        ys.append(((1 - t) ** 2 * y0[:, None] + 2 * t * (1 - t) * my[:, None] + t**2 * y1[:, None]).ravel())
        # denser sampling of short branches is compensated in the weights (uniform line density)
        ws.append(np.repeat(weight * length / length.max(), t.shape[1]))
        turn = np.stack([-rng.uniform(0.25, 0.55, n), rng.uniform(0.25, 0.55, n)], 1).ravel()
        x0, y0 = np.repeat(x1, 2), np.repeat(y1, 2)
        ang = np.repeat(ang, 2) + turn
        length = np.repeat(length, 2) * rng.uniform(0.62, 0.8, 2 * n)
        weight = np.repeat(weight, 2) * 0.75
    cols, rows = fr.to_pixels(side * np.concatenate(xs), np.concatenate(ys))
    sigma = max(0.7, 0.0022 * fr.k)
    img = splat(fr.rows, fr.cols, cols, rows, np.concatenate(ws) * (0.6 * 2.5 * sigma))  # peak ~ weight
    img = blur(img, sigma)
    x, y = fr.x, fr.y
    a = x if side > 0 else -x
    hilum = np.exp(-((a - F32(hx)) / F32(0.03)) ** 2 - ((y - F32(hy)) / F32(0.055)) ** 2)
    return F32(0.08) * np.minimum(img, F32(1.3)) + F32(0.12) * hilum


def _body(an: Anatomy) -> np.ndarray:
    """Soft-tissue density: neck, sloping shoulders, chest wall, abdomen and arms at the sides."""
    x, y = an.fr.x, an.fr.y
    a = np.abs(x)
    lift = 0.03 if an.view == "AP" else 0.0
    bc = F32(an.lmax + 0.07)
    y_sh = F32(-0.04 - lift) + F32(0.32) * np.maximum(a - F32(0.1), 0)  # neck-shoulder contour
    cover = soft(y_sh - y, an.fr.edge * 3) * soft(a - (bc + F32(0.17)), an.fr.edge * 3)
    # axilla: a dark gap between chest wall and arm, opening downwards
    dy = np.maximum(y - F32(0.3 - lift), 0)
    gap_w = F32(0.004) + F32(0.05) * dy
    gap = soft(np.abs(a - bc - F32(0.012) - gap_w) - gap_w, an.fr.edge * 2) * np.clip(dy / F32(0.05), 0, 1)
    thick = np.sqrt(np.clip(1 - (x / bc) ** 2, 0, 1))
    arm = np.sqrt(np.clip(1 - ((a - bc - F32(0.1)) / F32(0.09)) ** 2, 0, 1))
    dens = np.where(a < bc, F32(0.28) + F32(0.32) * thick, F32(0.25) + F32(0.12) * arm)
    return cover * (1 - gap) * dens


def anatomy(case: PhantomCase, cfg: PhantomConfig) -> Anatomy:
    """The case's chest geometry on its pixel grid (what `render` draws on)."""
    rows, cols = image_shape(case, cfg)
    p, d = case.pose, case.details
    fr = Frame(rows, cols, p.rotation_deg, p.shift_x, p.shift_y, p.scale)
    return Anatomy(fr, case.ctr, d.get("habitus", 1.0), d.get("inspiration", 0.0), case.view)


def render(case: PhantomCase, cfg: PhantomConfig) -> np.ndarray:
    """Float32 density image [rows, cols] in [0, 1] (bright = dense, MONOCHROME2 sense)."""
    rng = {part: render_rng(case, i) for i, part in enumerate(
        ("mottle", "vessels_r", "vessels_l", "consolidation", "bubble", "ribs", "devices", "exposure", "noise"))}
    an = anatomy(case, cfg)
    fr, d = an.fr, case.details
    rows, cols = fr.rows, fr.cols
    x, y = fr.x, fr.y

    dens = _body(an)
    sdf = {s: an.lung_sdf(s) for s in (-1, 1)}
    cover = {s: soft(sdf[s], fr.edge * 2.5) for s in (-1, 1)}
    depth = {s: np.sqrt(np.clip(-sdf[s] / F32(0.05), 0, 1)) for s in (-1, 1)}
    air = {s: cover[s] * (F32(0.62) + F32(0.38) * depth[s]) for s in (-1, 1)}
    heart, heart_thick = an.heart()
    below = soft(an.dome_y(-1, -x) - y, fr.edge * 3) * (x < 0) + soft(an.dome_y(1, x) - y, fr.edge * 3) * (x >= 0)
    mottle = smooth_noise(rng["mottle"], rows, cols, max(8, min(48, rows // 5)))
    marks = {s: _vessels(an, rng["vessels_l" if s > 0 else "vessels_r"], s) for s in (-1, 1)}

    # ---- findings change the air map (fluid / pus / tissue replaces air) ----------------------
    if "effusion" in d:
        for s, fl in fnd.effusion(an, cover, d["effusion"]["side"], d["effusion"]["height"]).items():
            air[s] = air[s] * (1 - F32(0.95) * fl)
            marks[s] = marks[s] * (1 - fl)
    if "consolidation" in d:
        c = d["consolidation"]
        s, blob = fnd.blob(an, rng["consolidation"], c["side"], c["t"], c["a"], c["size"])
        blob = blob * cover[s]
        air[s] = air[s] * (1 - F32(0.72) * blob)
        dens += F32(0.05) * blob * (F32(1) + F32(0.5) * mottle)
    ptx_line = None
    if "pneumothorax" in d:
        s, rim, ptx_line = fnd.pneumothorax(an, sdf, d["pneumothorax"]["side"], d["pneumothorax"]["gap"])
        marks[s] = marks[s] * (1 - rim)
        air[s] = air[s] + F32(0.16) * rim

    lungs = (air[-1] + air[1]) * (1 - heart)
    lung_cover = np.maximum(cover[-1], cover[1]) * (1 - heart)
    dens -= F32(0.47) * lungs
    dens += F32(0.025) * mottle * lung_cover
    dens += (marks[-1] * cover[-1] + marks[1] * cover[1]) * (1 - heart)
    above = 1 - below
    dens += heart * above * (F32(0.03) + F32(0.05) * heart_thick)
    if ptx_line is not None:
        dens += F32(0.16) * ptx_line
    if "nodule" in d:
        n = d["nodule"]
        dens += F32(0.24) * fnd.nodule(an, n["side"], n["t"], n["a"], n["radius"])

    # ---- abdomen, breasts, bones --------------------------------------------------------------
    dens += F32(0.05) * below * soft(np.abs(x) - F32(an.lmax + 0.05), F32(0.03))
    if rng["bubble"].random() < 0.6:  # gastric air bubble under the left hemidiaphragm
        gx, gy = 0.16 * an.hab + rng["bubble"].normal(0, 0.02), an.dome[1] + 0.065
        bub = soft(np.hypot((x - F32(gx)) / F32(1.5), y - F32(gy)) - F32(0.03), F32(0.02))
        dens -= F32(0.12) * bub * (y > F32(gy - 0.012))
    if case.sex == "F":
        for s in (-1, 1):
            r = np.hypot((x - F32(s * 0.24 * an.hab)) / F32(0.17), (y - F32(an.dome[s] + 0.0)) / F32(0.12))
            dens += F32(0.06) * np.clip((F32(1) - r) / F32(0.35), 0, 1) ** F32(0.7)
    dens += an.ribs(rng["ribs"]) * (1 - F32(0.5) * heart) * (1 - F32(0.6) * below) + an.clavicles_and_shoulders()
    dens += an.spine() * (1 - F32(0.5) * below)

    # ---- devices on top, then exposure, smooth variation and noise ------------------------------
    fnd.draw_devices(dens, an, d, rng["devices"])
    ex = rng["exposure"]
    field = smooth_noise(ex, rows, cols, 4)
    heel = F32(ex.uniform(-0.04, 0.04)) * (y - F32(0.5))
    dens = dens * (F32(1) + F32(0.05) * field) + heel
    gamma = ex.uniform(0.85, 1.15)
    dens = F32(0.035) + F32(ex.uniform(0.9, 1.05)) * np.clip(dens, 0, 1) ** F32(gamma)
    dens += F32(ex.uniform(0.006, 0.014)) * rng["noise"].standard_normal((rows, cols), dtype=F32)
    return np.clip(dens, 0.0, 1.0).astype(F32, copy=False)
