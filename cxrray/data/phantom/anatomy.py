"""Normal chest anatomy drawn on vectorised coordinate grids.

Canonical frame: y runs from 0 (top of the image) to 1 (bottom) and x from the midline, both in
units of the image height (x < 0 is image left = patient right). The pose (rotation, shift,
scale) is applied by sampling that frame on the rotated pixel grid, so every shape is written once
in canonical units and all drawing is whole-array numpy (no per-pixel Python).
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32


class Frame:
    """Pixel grid <-> canonical coordinates for one posed image."""

    def __init__(self, rows: int, cols: int, rotation_deg: float, shift_x: float, shift_y: float,
                 scale: float):
        self.rows, self.cols = rows, cols
        th = math.radians(rotation_deg)
        self.c, self.s = math.cos(th), math.sin(th)
        self.cx = cols / 2 + shift_x * rows
        self.cy = rows / 2 + shift_y * rows
        self.k = scale * rows  # pixels per canonical unit
        dx = (np.arange(cols, dtype=F32) + F32(0.5) - F32(self.cx))[None, :]
        dy = (np.arange(rows, dtype=F32) + F32(0.5) - F32(self.cy))[:, None]
        self.x = (F32(self.c / self.k) * dx + F32(self.s / self.k) * dy).astype(F32)
        self.y = (F32(-self.s / self.k) * dx + F32(self.c / self.k) * dy + F32(0.5)).astype(F32)
        self.edge = F32(1.2 / self.k + 0.002)  # soft-edge width: ~1 px plus a little blur

    def to_pixels(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Canonical -> (col, row) pixel coordinates (continuous, pixel centres at +0.5)."""
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float) - 0.5
        return self.cx + self.k * (self.c * x - self.s * y), self.cy + self.k * (self.s * x + self.c * y)


def soft(sdf: np.ndarray, width) -> np.ndarray:
    """Signed distance (negative inside) -> coverage in [0, 1] with a linear edge of `width`."""
    return np.clip(F32(0.5) - sdf / F32(width), 0.0, 1.0)


def sample_grid(g: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear lookup of grid `g` [nv, nu] at continuous (u, v); u wraps around, v is clamped."""
    nv, nu = g.shape
    v = np.clip(v, 0, nv - 1.001)
    u0f = np.floor(u)
    v0f = np.floor(v)
    tu, tv = u - u0f, v - v0f
    u0 = u0f.astype(np.int64) % nu
    u1 = (u0 + 1) % nu
    v0 = v0f.astype(np.int64)
    top = g[v0, u0] * (1 - tu) + g[v0, u1] * tu
    bot = g[v0 + 1, u0] * (1 - tu) + g[v0 + 1, u1] * tu
    return top * (1 - tv) + bot * tv


def splat(rows: int, cols: int, px: np.ndarray, py: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Accumulate weighted points (pixel coordinates) onto a grid with bilinear weights."""
    fx, fy = px - 0.5, py - 0.5
    x0, y0 = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - x0, fy - y0
    out = np.zeros(rows * cols, dtype=np.float64)
    for dx, dy, ww in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)), (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
        cx, cy = x0 + dx, y0 + dy
        ok = (cx >= 0) & (cx < cols) & (cy >= 0) & (cy < rows)
        out += np.bincount((cy * cols + cx)[ok], weights=(w * ww)[ok], minlength=rows * cols)
    return out.reshape(rows, cols).astype(F32)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-clamped) built from shifted slices; sigma in pixels."""
    r = max(1, int(np.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(F32)
    for axis in (0, 1):
        n = img.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(img, pad, mode="edge")
        out = np.zeros_like(img)
        for i, kv in enumerate(k):
            out += kv * (p[i:i + n] if axis == 0 else p[:, i:i + n])
        img = out
    return img


def smooth_noise(rng: np.random.Generator, rows: int, cols: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency field: a cells x cells normal grid, bilinearly upsampled."""
    g = rng.standard_normal((cells, cells)).astype(F32)

    def interp_matrix(n: int) -> np.ndarray:
        pos = (np.arange(n, dtype=F32) + 0.5) / n * (cells - 1)
        lo = np.clip(np.floor(pos).astype(int), 0, cells - 2)
        t = pos - lo
        m = np.zeros((n, cells), dtype=F32)
        m[np.arange(n), lo] = 1 - t
        m[np.arange(n), lo + 1] = t
        return m

    return interp_matrix(rows) @ g @ interp_matrix(cols).T


class Anatomy:
    """Geometry of one chest: lung/heart shapes as signed-distance functions on a Frame."""

    def __init__(self, fr: Frame, ctr: float, habitus: float, inspiration: float, view: str):
        self.fr = fr
        self.hab = habitus
        self.lmax = 0.335 * habitus           # lateral lung edge (half the thoracic diameter)
        self.y_top = 0.125 - 0.5 * inspiration
        # image left is patient right: right hemidiaphragm sits a little higher
        self.dome = {-1: 0.655 + inspiration, 1: 0.68 + inspiration}
        self.a_dome = 0.16 * habitus
        self.kd = 3.3 / habitus**2
        self.medial = 0.05
        self.ctr = ctr
        self.view = view
        self.y_cpa = {s: self.dome[s] + self.kd * (self.lmax - self.a_dome) ** 2 for s in (-1, 1)}

    # ---- lungs -----------------------------------------------------------------------------
    def lateral_edge(self, y, lat_shift: float = 0.0):
        return F32(self.lmax - lat_shift) * (1 - F32(0.45) * np.exp(-(y - F32(self.y_top)) / F32(0.12)))

    def dome_y(self, side: int, a):
        return F32(self.dome[side]) + F32(self.kd) * (a - F32(self.a_dome)) ** 2

    def lung_sdf(self, side: int, top_shift: float = 0.0, lat_shift: float = 0.0) -> np.ndarray:
        """Approximate signed distance to one lung (side -1: image left, +1: image right).

        `top_shift`/`lat_shift` shrink the apex/lateral margins (a collapsed lung)."""
        x, y = self.fr.x, self.fr.y
        a = x if side > 0 else -x
        ua = a - F32(0.17 * self.hab)
        d_apex = (F32(self.y_top + top_shift) + F32(5.0) * ua * ua - y) / np.sqrt(1 + F32(100.0) * ua * ua)
        d_lat = a - self.lateral_edge(y, lat_shift)
        d_med = F32(self.medial) - a
        ud = a - F32(self.a_dome)
        d_dome = (y - self.dome_y(side, a)) / np.sqrt(1 + (F32(2 * self.kd) * ud) ** 2)
        sdf = np.maximum(np.maximum(d_apex, d_lat), np.maximum(d_med, d_dome))
        # mediastinal contour: aortic knob and main pulmonary artery (left), SVC/right atrium (right)
        bumps = ((0.03, 0.28, 0.04), (0.016, 0.37, 0.03)) if side > 0 else ((0.01, 0.3, 0.09),)
        for amp, cy, sig in bumps:
            sdf = np.maximum(sdf, F32(self.medial + amp) * np.exp(-((y - F32(cy)) / F32(sig)) ** 2) - a)
        return sdf

    def lung_point(self, side: int, t: float, frac: float) -> tuple[float, float]:
        """Canonical (x, y) of a point inside a lung: t from apex (0) to base (1), frac medial->lateral."""
        y = self.y_top + 0.06 + t * (self.dome[side] - 0.02 - self.y_top - 0.06)
        lat = float(self.lateral_edge(np.float32(y)))
        a = self.medial + 0.02 + frac * (lat - self.medial - 0.04)
        if side > 0 and y > 0.45:  # keep left-lung points lateral to the heart
            a = max(a, 0.68 * self.ctr * 2 * self.lmax + 0.03)
        return side * a, y

    # ---- heart ---------------------------------------------------------------------------------
    def heart(self) -> tuple[np.ndarray, np.ndarray]:
        """(coverage, thickness profile) of the cardiac silhouette; transverse width = ctr * 2 * lmax."""
        x, y = self.fr.x, self.fr.y
        w = self.ctr * 2 * self.lmax
        tilt = 0.38
        hw = w / (2 * math.sqrt(1 + tilt**2))
        hh = 0.165
        yc = self.dome[-1] - 0.06
        xc = F32(0.18 * w) + F32(tilt * hw / hh) * (y - F32(yc))
        r2 = ((x - xc) / F32(hw)) ** 2 + ((y - F32(yc)) / F32(hh)) ** 2
        r = np.sqrt(r2)
        sdf = (r - 1) * F32(min(hw, hh))
        # vascular pedicle: smooth union with the mediastinum above the heart
        ped = np.maximum(np.abs(x - F32(0.004)) - F32(self.medial + 0.004), y - F32(0.52))
        k = F32(0.04)
        hmix = np.clip(F32(0.5) + F32(0.5) * (ped - sdf) / k, 0, 1)
        sdf = ped * (1 - hmix) + sdf * hmix - k * hmix * (1 - hmix)
        cover = soft(sdf, self.fr.edge * 1.5)
        thick = np.sqrt(np.clip(1 - r2, 0, 1))
        return cover, thick

    # ---- bones ---------------------------------------------------------------------------------
    def ribs(self, rng: np.random.Generator) -> np.ndarray:
        """Posterior rib arcs (bright, with cortical rims) plus fainter anterior ribs."""
        x, y, edge = self.fr.x, self.fr.y, self.fr.edge
        out = np.zeros_like(x)
        a = np.abs(x)
        an = np.maximum(a - F32(0.035), 0)
        # posterior ribs: rise briefly from the spine, then arc down laterally
        hab = F32(self.hab)
        bend = np.maximum(an - F32(0.19) * hab, 0)
        g = F32(-0.26) * an + F32(1.1) * an * an / hab + F32(6.0) * bend * bend / hab
        q = y - g
        n, y0, sp, acc = 11, 0.062 + rng.normal(0, 0.006), 0.054, 0.0012
        # invert y0 + sp*k + acc*k^2 = q for the (continuous) rib number
        disc = np.maximum(F32(sp * sp) + F32(4 * acc) * (q - F32(y0)), 0)
        kc = (np.sqrt(disc) - F32(sp)) / F32(2 * acc)
        k = np.clip(np.rint(kc), 0, n - 1)
        centre = F32(y0) + F32(sp) * k + F32(acc) * k * k
        half = F32(0.0095) + F32(0.0006) * k
        slope = F32(-0.26) + F32(2.2) * an / hab + F32(12.0) * bend / hab
        d = np.abs(q - centre) / np.sqrt(1 + slope * slope)
        band = soft(d - half, edge)
        rim = soft(np.abs(d - half + F32(0.003)) - F32(0.0025), edge)
        lateral_end = soft(a - F32(self.lmax + 0.028) - F32(0.01) * k / n, F32(0.015))
        medial_end = soft(F32(0.03) - a, F32(0.01))
        out += (F32(0.055) * band + F32(0.04) * rim) * lateral_end * medial_end
        # anterior ribs: faint, sloping down towards the midline, ending at the costal cartilage
        qa = y - F32(0.5) * (F32(self.lmax) - a)
        ka = np.clip(np.rint((qa - F32(0.16)) / F32(0.072)), 0, 5)
        da = np.abs(qa - F32(0.16) - F32(0.072) * ka) / F32(1.12)
        band_a = soft(da - F32(0.012), edge * 2)
        ends = soft(F32(0.13) - a, F32(0.03)) * soft(a - F32(self.lmax + 0.01), F32(0.02))
        out += F32(0.045) * band_a * ends
        return out

    def clavicles_and_shoulders(self) -> np.ndarray:
        x, y, edge = self.fr.x, self.fr.y, self.fr.edge
        a = np.abs(x)
        lift = 0.035 if self.view == "AP" else 0.0
        u = np.maximum(a - F32(0.03), 0)
        cy = F32(0.145 - lift) - F32(0.3) * u + F32(0.55) * u * u
        d = np.abs(y - cy) / F32(1.03)
        half = F32(0.011) + F32(0.004) * np.exp(-u / F32(0.03))
        clav = soft(d - half, edge) * soft(u - F32(0.28 * self.hab), F32(0.01)) * soft(F32(0.002) - u, F32(0.01))
        rim = soft(np.abs(d - half + F32(0.0025)) - F32(0.002), edge)
        hx = F32(0.475 * self.hab)
        hum = np.hypot(a - hx, y - F32(0.16 - lift))
        head = soft(hum - F32(0.058), edge * 2) * (F32(0.5) + F32(0.5) * np.sqrt(np.clip(1 - (hum / F32(0.058)) ** 2, 0, 1)))
        return F32(0.13) * clav + F32(0.05) * rim * clav + F32(0.11) * head

    def spine(self) -> np.ndarray:
        x, y, edge = self.fr.x, self.fr.y, self.fr.edge
        a = np.abs(x)
        col = soft(a - F32(0.036), edge * 2)
        period = F32(0.056)
        ph = (y - F32(0.02)) / period
        frac = ph - np.floor(ph)
        body = np.clip(np.abs(frac - F32(0.5)) * F32(-6) + F32(2.6), 0, 1)  # dark disc spaces
        ped_y = (frac - F32(0.35)) * period
        ped = soft(np.hypot((a - F32(0.026)) / F32(1.6), ped_y) - F32(0.007), edge)
        proc = soft(np.hypot(x / F32(0.5), (frac - F32(0.75)) * period) - F32(0.006), edge)
        return col * (F32(0.03) + F32(0.018) * body) + F32(0.02) * ped + F32(0.012) * proc
