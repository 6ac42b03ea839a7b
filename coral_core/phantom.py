"""Synthetic cardiac short-axis MRI phantoms: the built-in cohort when no data is at hand.

Each subject is a stack of 6-18 short-axis slices from base to apex with ACDC's labels
(0 background, 1 right-ventricle cavity, 2 left-ventricle myocardium, 3 left-ventricle
cavity). Cavities shrink toward the apex and the right ventricle vanishes before it. To be
hard enough that a segmenter must learn anatomy rather than a threshold, every subject
varies in heart position, rotation, size, wall thickness and slice count; the image has
a blood pool about as bright as the aorta, pulmonary artery and fat, a myocardium about
as dark as the chest wall and liver, papillary muscles inside the cavity, a smooth bias
field, blur and Rician noise. A seed fixes a subject completely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from coral_core.volume import Volume

__all__ = ["PhantomConfig", "make_phantom", "make_cohort", "LABEL_NAMES"]

LABEL_NAMES = ("background", "RV", "myocardium", "LV")


@dataclass
class PhantomConfig:
    """Acquisition settings shared by a cohort (anatomy is drawn per subject)."""

    size: int = 128  # in-plane pixels
    pixel_mm: float = 1.8  # in-plane spacing
    slice_mm: float = 10.0  # slice spacing
    min_slices: int = 6
    max_slices: int = 18
    noise: tuple[float, float] = (0.03, 0.08)  # Rician sigma, fraction of blood-pool signal
    bias: float = 0.35  # peak-to-peak multiplicative bias field
    # each subject's field of view, a factor of size x pixel_mm drawn from this range (at the same spacing): the
    # centre cut out, or the slices padded with background noise, as scanners' protocols differ; (1, 1): none
    field_of_view: tuple[float, float] = (1.0, 1.0)
    # slices added above the base and below the apex, holding no heart (great vessels above it, liver below), as a
    # scan reaches past the structures segmented; 0: the stack is the heart alone, as in the published cohorts
    beyond_heart: int = 0


def _ellipse(yy, xx, cy, cx, ry, rx, angle):
    """Boolean ellipse and its normalised radius map (1 on the border)."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    r = np.sqrt(u * u + v * v)
    return r <= 1.0, r


def make_phantom(seed: int, n_slices: int | None = None, config: PhantomConfig | None = None) -> tuple[Volume, Volume]:
    """One synthetic subject.

    Parameters
    ----------
    seed : int
        Fixes anatomy, acquisition and noise.
    n_slices : int, optional
        Slices from base to apex; drawn from [min_slices, max_slices] when omitted.
    config : PhantomConfig, optional
        Shared acquisition settings.

    Returns
    -------
    image, labels : Volume
        (z, y, x) float32 image and uint8 labels with a 1.8 x 1.8 x 10 mm geometry;
        slice 0 is the base.
    """
    cfg = config or PhantomConfig()
    rng = np.random.default_rng(seed)
    n = int(n_slices or rng.integers(cfg.min_slices, cfg.max_slices + 1))
    size = cfg.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # --- subject anatomy (fixed over the stack)
    scale = rng.uniform(0.8, 1.2)
    body_ry, body_rx = size * rng.uniform(0.36, 0.42), size * rng.uniform(0.45, 0.49)
    body_cy, body_cx = size * 0.5 + rng.normal(0, 3), size * 0.5 + rng.normal(0, 3)
    heart_cy = body_cy + rng.normal(-2, 5)
    heart_cx = body_cx + rng.normal(6, 5)
    rv_angle = np.pi + rng.uniform(-0.5, 0.5)  # RV sits to the image left of the LV, roughly
    r_lv_base = 12.5 * scale * rng.uniform(0.85, 1.15)
    wall = rng.uniform(3.0, 5.5) * scale
    lv_ecc = rng.uniform(0.8, 1.0)
    lv_tilt = rng.uniform(0, np.pi)
    rv_end = rng.uniform(0.6, 0.85)  # fraction of the stack where the RV disappears
    rv_size = rng.uniform(0.75, 1.05)
    apex_drift = rng.normal(0, 3, size=2)  # the long axis is not exactly through-plane
    liver_start = rng.uniform(0.3, 0.6)
    pap_angles = rng.uniform(0, 2 * np.pi, size=2)

    # --- acquisition
    blood = rng.uniform(0.8, 1.0)
    tissue = rng.uniform(0.25, 0.4)
    myo = tissue * rng.uniform(0.8, 1.1)
    fat = rng.uniform(0.7, 0.95)
    liver_int = rng.uniform(0.35, 0.55)
    noise_sigma = rng.uniform(*cfg.noise) * blood
    blur_sigma = rng.uniform(0.6, 1.3)

    m = cfg.beyond_heart
    extra_rng = np.random.default_rng([seed, 2])  # the slices beyond the heart draw from their own stream
    image = np.zeros((n + 2 * m, size, size), np.float32)
    labels = np.zeros((n + 2 * m, size, size), np.uint8)
    for k in range(-m, n + m):
        t = k / max(n - 1, 1)  # 0 at the base, 1 at the apex (beyond them: no heart)
        if not 0 <= k < n:
            sl = _beyond_heart(yy, xx, t, scale, (body_cy, body_cx, body_ry, body_rx), (heart_cy, heart_cx), liver_start,
                               tissue, fat, blood, liver_int)
            image[k + m] = sl * extra_rng.uniform(0.93, 1.07)
            continue
        cy = heart_cy + apex_drift[0] * t
        cx = heart_cx + apex_drift[1] * t
        r_lv = r_lv_base * max(0.0, 1.0 - 0.9 * t**1.6)
        w = wall * (1.0 + 0.3 * t)

        body, sl = _torso(yy, xx, scale, (body_cy, body_cx, body_ry, body_rx), (heart_cy, heart_cx), tissue, fat, blood)
        if t < 0.25:  # ascending aorta and pulmonary trunk near the base
            for dy, dx, r in ((-22, 6, 6.5), (-20, -12, 6.0)):
                vessel, _ = _ellipse(yy, xx, cy + dy * scale, cx + dx * scale, r * scale, r * scale, 0.0)
                sl[vessel] = blood
        if t > liver_start:  # liver enters below the heart toward the apex
            grow = (t - liver_start) / (1 - liver_start + 1e-6)
            liver, _ = _ellipse(yy, xx, body_cy + 30 - 8 * grow, body_cx + 20, 14 * grow + 4, 24 * grow + 6, 0.3)
            sl[liver & body] = liver_int

        outer_lv, _ = _ellipse(yy, xx, cy, cx, r_lv + w, (r_lv + w) * lv_ecc, lv_tilt)
        lv, _ = _ellipse(yy, xx, cy, cx, r_lv, r_lv * lv_ecc, lv_tilt) if r_lv > 1.0 else (np.zeros_like(body), None)
        if t >= 0.97 and r_lv < 2.0:  # the apical cap: myocardium only
            outer_lv, _ = _ellipse(yy, xx, cy, cx, w * 1.2, w * 1.2, 0.0)
        rv = np.zeros_like(body)
        if t < rv_end:
            shrink = 1.0 - (t / rv_end) ** 2
            r_rv = (r_lv_base + wall) * rv_size * max(shrink, 0.15)
            d = r_lv + w + r_rv * 0.05
            rv_ell, _ = _ellipse(
                yy, xx, cy + d * np.sin(rv_angle), cx + d * np.cos(rv_angle), r_rv * 1.25, r_rv * 0.55, rv_angle
            )
            rv = rv_ell & ~ndimage.binary_dilation(outer_lv, iterations=2)

        sl[outer_lv] = myo
        sl[lv] = blood
        sl[rv] = blood * rng.uniform(0.9, 1.0)
        if r_lv > 5:  # papillary muscles: dark dots inside the cavity, labelled LV as in ACDC
            for a in pap_angles:
                pap, _ = _ellipse(yy, xx, cy + 0.55 * r_lv * np.sin(a), cx + 0.55 * r_lv * np.cos(a), 1.8, 1.8, 0.0)
                sl[pap & lv] = myo * 1.1

        lab = np.zeros((size, size), np.uint8)
        lab[rv] = 1
        lab[outer_lv] = 2
        lab[lv] = 3
        image[k + m] = sl * rng.uniform(0.93, 1.07)  # slice-to-slice intensity drift
        labels[k + m] = lab

    image = ndimage.gaussian_filter(image, sigma=(0, blur_sigma, blur_sigma))
    image *= _bias_field(rng, size, cfg.bias)[None]
    real = image + rng.normal(0, noise_sigma, image.shape)
    imag = rng.normal(0, noise_sigma, image.shape)
    image = np.sqrt(real * real + imag * imag).astype(np.float32)  # Rician magnitude
    gain = rng.uniform(200, 1200)  # arbitrary scanner units
    image = (image * gain).astype(np.float32)

    affine = np.diag([cfg.pixel_mm, cfg.pixel_mm, cfg.slice_mm, 1.0])
    affine[:3, 3] = rng.normal(0, 20, size=3)
    if tuple(cfg.field_of_view) != (1.0, 1.0):
        fov_rng = np.random.default_rng([seed, 1])  # draws of its own: the anatomy and the rest stay as they were
        image, labels = _at_field_of_view(image, labels, fov_rng.uniform(*cfg.field_of_view), noise_sigma * gain, fov_rng)
    return Volume(image, affine), Volume(labels, affine.copy())


def _torso(yy, xx, scale, body_ellipse, heart_centre, tissue, fat, blood) -> tuple[np.ndarray, np.ndarray]:
    """(body mask, slice) of what every slice holds: the body with its subcutaneous fat ring, the lungs, and the
    descending aorta, a bright disc behind the heart (a cavity look-alike)."""
    body_cy, body_cx, body_ry, body_rx = body_ellipse
    body, body_r = _ellipse(yy, xx, body_cy, body_cx, body_ry, body_rx, 0.0)
    sl = np.where(body, tissue, 0.0).astype(np.float32)
    sl[body & (body_r > 0.9)] = fat
    for side in (-1, 1):
        lung, _ = _ellipse(yy, xx, body_cy - 4, body_cx + side * body_rx * 0.5, body_ry * 0.65, body_rx * 0.33, side * 0.2)
        sl[lung] = 0.05
    heart_cy, heart_cx = heart_centre
    aorta, _ = _ellipse(yy, xx, heart_cy + 26 * scale, heart_cx - 4, 5.5 * scale, 5.5 * scale, 0.0)
    sl[aorta] = blood * 0.95
    return body, sl


def _beyond_heart(yy, xx, t, scale, body_ellipse, heart_centre, liver_start, tissue, fat, blood, liver_int) -> np.ndarray:
    """A slice beyond the heart (``t`` < 0 above the base, > 1 below the apex): the torso; the ascending aorta and
    pulmonary trunk above the base; the liver, grown on, below."""
    body, sl = _torso(yy, xx, scale, body_ellipse, heart_centre, tissue, fat, blood)
    body_cy, body_cx = body_ellipse[:2]
    heart_cy, heart_cx = heart_centre
    if t < 0:
        for dy, dx, r in ((-22, 6, 6.5), (-20, -12, 6.0)):
            vessel, _ = _ellipse(yy, xx, heart_cy + dy * scale, heart_cx + dx * scale, r * scale, r * scale, 0.0)
            sl[vessel] = blood
    else:
        grow = min(1.5, (t - liver_start) / (1 - liver_start + 1e-6))
        liver, _ = _ellipse(yy, xx, body_cy + 30 - 8 * grow, body_cx + 20, 14 * grow + 4, 24 * grow + 6, 0.3)
        sl[liver & body] = liver_int
    return sl


def _at_field_of_view(image: np.ndarray, labels: np.ndarray, factor: float, sigma: float, rng: np.random.Generator):
    """The slices as acquired with ``factor`` times their field of view at the same spacing: the centre cut
    out, or padded with the Rician background noise (``sigma``) that surrounds the body."""
    n = image.shape[1]
    side = max(1, int(round(n * factor)))
    if side <= n:
        start = (n - side) // 2
        cut = (slice(None), slice(start, start + side), slice(start, start + side))
        return np.ascontiguousarray(image[cut]), np.ascontiguousarray(labels[cut])
    before = (side - n) // 2
    shape = (image.shape[0], side, side)
    wide = (np.hypot(rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))).astype(np.float32)
    wide[:, before : before + n, before : before + n] = image
    wide_labels = np.zeros(shape, np.uint8)
    wide_labels[:, before : before + n, before : before + n] = labels
    return wide, wide_labels


def _bias_field(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field with a peak-to-peak range of about ``amplitude``."""
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    c = rng.normal(0, 1, size=6)
    field = c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx**2 + c[4] * yy**2 + c[5] * np.sin(2 * xx + yy)
    span = field.max() - field.min()
    field = (field - field.mean()) / (span if span > 0 else 1.0)
    return np.exp(amplitude * field).astype(np.float32)


def make_cohort(n_subjects: int, seed: int = 0, config: PhantomConfig | None = None) -> list[tuple[Volume, Volume]]:
    """``n_subjects`` phantoms with seeds ``seed, seed + 1, ...``."""
    return [make_phantom(seed + i, config=config) for i in range(n_subjects)]
