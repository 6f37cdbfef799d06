"""Planted findings (as changes to the lung air map / density) and devices (strokes in pixel space)."""
from __future__ import annotations

import numpy as np

from .anatomy import F32, Anatomy, Frame, smooth_noise, soft

SIDE = {"right": -1, "left": 1}  # patient side -> image side (patient right is image left)


def _sides(side: str) -> tuple[int, ...]:
    return (-1, 1) if side == "both" else (SIDE[side],)


# ---- findings ---------------------------------------------------------------------------------
def effusion(an: Anatomy, lung_cover: dict, side: str, heights) -> dict:
    """Basal fluid with a lateral meniscus, per image side: fluid coverage in [0, 1]."""
    x, y = an.fr.x, an.fr.y
    out = {}
    for s, h in zip(_sides(side), heights):
        a = x if s > 0 else -x
        lung_h = an.y_cpa[s] - an.y_top
        he = h * lung_h
        frac = np.clip((a - F32(an.medial)) / F32(an.lmax - an.medial), 0, 1)
        # fluid level above the dome apex, with a meniscus rising along the lateral chest wall
        y_fl = F32(an.dome[s] - 0.25 * he) - F32(0.75 * he) * frac * frac
        grow = np.clip((y - y_fl) / F32(0.035) + F32(0.5), 0, 1)  # hazy upper margin
        out[s] = grow * lung_cover[s]
    return out


def pneumothorax(an: Anatomy, lung_sdf: dict, side: str, gap: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(image side, lucent rim coverage, pleural line coverage) of an apical/lateral pneumothorax."""
    s = SIDE[side]
    inner = an.lung_sdf(s, top_shift=gap * 1.1, lat_shift=gap)
    outer = lung_sdf[s]
    edge = an.fr.edge
    rim = soft(outer, edge) * np.clip(inner / F32(edge), 0, 1)
    line = soft(np.abs(inner) - F32(0.0022), edge) * soft(outer + F32(0.5 * gap), edge)
    return s, rim, line


def blob(an: Anatomy, rng: np.random.Generator, side: str, t: float, frac: float, size: float) -> tuple[int, np.ndarray]:
    """Patchy airspace opacity (consolidation) around a lung point."""
    s = SIDE[side]
    cx, cy = an.lung_point(s, t, frac)
    fr = an.fr
    r = np.hypot((fr.x - F32(cx)) / F32(size), (fr.y - F32(cy)) / F32(size * 1.35))
    patch = smooth_noise(rng, fr.rows, fr.cols, 14)
    cover = np.clip((F32(1.0) - r) * F32(2.2) + F32(0.45) * patch, 0, 1)
    return s, cover


def nodule(an: Anatomy, side: str, t: float, frac: float, radius: float) -> np.ndarray:
    s = SIDE[side]
    cx, cy = an.lung_point(s, t, frac)
    r = np.hypot(an.fr.x - F32(cx), an.fr.y - F32(cy))
    cover = soft(r - F32(radius), an.fr.edge)
    return cover * (F32(0.55) + F32(0.45) * np.sqrt(np.clip(1 - (r / F32(radius)) ** 2, 0, 1)))


# ---- devices ----------------------------------------------------------------------------------
def _catmull_rom(p: np.ndarray, per: int = 10) -> np.ndarray:
    p = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    t = np.linspace(0, 1, per, endpoint=False)[:, None]
    segs = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        segs.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                           + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    segs.append(p[-2:-1])
    return np.concatenate(segs)


def stroke(img: np.ndarray, fr: Frame, pts, half: float, value: float, opaque: bool = True) -> None:
    """Draw a smooth curve through canonical control points into `img` (in place), width 2*half."""
    cols, rows = fr.to_pixels(*np.asarray(pts, dtype=float).T)
    curve = _catmull_rom(np.stack([cols, rows], 1), per=max(6, int(fr.rows / 40)))
    hp = max(half * fr.k, 0.45)
    lo = np.floor(curve.min(0) - hp - 2).astype(int)
    hi = np.ceil(curve.max(0) + hp + 2).astype(int)
    c0, r0 = max(lo[0], 0), max(lo[1], 0)
    c1, r1 = min(hi[0], fr.cols), min(hi[1], fr.rows)
    if c0 >= c1 or r0 >= r1:
        return
    a, b = curve[:-1].astype(F32), curve[1:].astype(F32)
    ab = b - a
    L2 = np.maximum((ab**2).sum(1), F32(1e-6))
    qx = (np.arange(c0, c1, dtype=F32) + F32(0.5))[None, :, None]
    step = max(1, int(2_000_000 // max((c1 - c0) * len(a), 1)))  # bound the (rows, cols, segs) temporaries
    for y0 in range(r0, r1, step):
        y1 = min(y0 + step, r1)
        qy = (np.arange(y0, y1, dtype=F32) + F32(0.5))[:, None, None]
        t = np.clip(((qx - a[:, 0]) * ab[:, 0] + (qy - a[:, 1]) * ab[:, 1]) / L2, 0, 1)
        d2 = (qx - a[:, 0] - t * ab[:, 0]) ** 2 + (qy - a[:, 1] - t * ab[:, 1]) ** 2
        cover = np.clip(F32(hp + 0.5) - np.sqrt(d2.min(2)), 0, 1)
        view = img[y0:y1, c0:c1]
        if opaque:
            view += cover * (F32(value) - view)
        else:
            view += cover * F32(value)


def disc(img: np.ndarray, fr: Frame, cx: float, cy: float, radius: float, value: float, opaque: bool = True) -> None:
    col, row = fr.to_pixels(cx, cy)
    rp = max(radius * fr.k, 0.5)
    c0, c1 = max(int(col - rp - 2), 0), min(int(col + rp + 3), fr.cols)
    r0, r1 = max(int(row - rp - 2), 0), min(int(row + rp + 3), fr.rows)
    if c0 >= c1 or r0 >= r1:
        return
    qx = np.arange(c0, c1, dtype=F32)[None, :] + F32(0.5 - col)
    qy = np.arange(r0, r1, dtype=F32)[:, None] + F32(0.5 - row)
    cover = np.clip(F32(rp + 0.5) - np.hypot(qx, qy), 0, 1)
    view = img[r0:r1, c0:c1]
    view += cover * (F32(value) - view) if opaque else cover * F32(value)


def box(img: np.ndarray, fr: Frame, cx: float, cy: float, hw: float, hh: float, radius: float, value: float) -> None:
    """Opaque rounded rectangle (axis-aligned in the canonical frame)."""
    col, row = fr.to_pixels(cx, cy)
    ext = (max(hw, hh) * 1.5) * fr.k + 2
    c0, c1 = max(int(col - ext), 0), min(int(col + ext + 1), fr.cols)
    r0, r1 = max(int(row - ext), 0), min(int(row + ext + 1), fr.rows)
    if c0 >= c1 or r0 >= r1:
        return
    dx = np.arange(c0, c1, dtype=F32)[None, :] + F32(0.5 - col)
    dy = np.arange(r0, r1, dtype=F32)[:, None] + F32(0.5 - row)
    u = (F32(fr.c) * dx + F32(fr.s) * dy) / F32(fr.k)
    v = (F32(-fr.s) * dx + F32(fr.c) * dy) / F32(fr.k)
    qx = np.maximum(np.abs(u) - F32(hw - radius), 0)
    qy = np.maximum(np.abs(v) - F32(hh - radius), 0)
    sdf = (np.hypot(qx, qy) - F32(radius)) * F32(fr.k)
    cover = np.clip(F32(0.5) - sdf, 0, 1)
    view = img[r0:r1, c0:c1]
    view += cover * (F32(value) - view)


def draw_devices(img: np.ndarray, an: Anatomy, details: dict, rng: np.random.Generator) -> None:
    fr = an.fr
    lm = an.lmax
    if "ecg_leads" in details:
        spots = [(-0.31, 0.13), (0.31, 0.13), (0.30, 0.82), (-0.30, 0.84), (0.17, 0.60)]
        jit = details["ecg_leads"]["jitter"]
        for i in range(details["ecg_leads"]["n"]):
            ex, ey = spots[i][0] * an.hab + jit[i][0], spots[i][1] + jit[i][1]
            sgn = 1 if ex > 0 else -1
            wire = [(ex, ey), (ex + sgn * 0.06, ey + 0.08 + 0.03 * rng.random()),
                    (ex + sgn * 0.1, ey + 0.22), (ex + sgn * 0.16, ey + 0.45)]
            stroke(img, fr, wire, 0.0065, 0.88)
            disc(img, fr, ex, ey, 0.03, 0.35, opaque=False)
            disc(img, fr, ex, ey, 0.011, 1.0)
    if "pacemaker" in details:
        d = details["pacemaker"]
        s = 1 if d["side"] == "left" else -1
        gx, gy = s * d["x"] * an.hab, d["y"]
        heart_apex = (0.5 * an.ctr * 2 * lm, an.dome[1] - 0.06)
        lead = [(gx - s * 0.03, gy + 0.01), (s * 0.11, gy + 0.04), (-0.03, 0.27), (-0.045, 0.44),
                (0.02, 0.54), heart_apex]
        stroke(img, fr, lead, 0.0075, 0.95)
        box(img, fr, gx, gy, 0.042, 0.03, 0.012, 0.98)
        box(img, fr, gx + s * 0.012, gy - 0.004, 0.018, 0.016, 0.004, 0.8)
    if "chest_tube" in details:
        d = details["chest_tube"]
        s = -1 if d["side"] == "right" else 1
        b = d["bend"]
        path = [(s * 0.55, 0.95), (s * (lm + 0.07), 0.76), (s * (lm - 0.03), 0.62),
                (s * (lm - 0.07 + b), 0.42), (s * (0.2 + b), d["tip"] + 0.08), (s * (0.15 + b), d["tip"])]
        stroke(img, fr, path, 0.0095, 0.4, opaque=False)   # tube wall (plastic)
        stroke(img, fr, path, 0.003, 0.97)                  # radiopaque stripe
