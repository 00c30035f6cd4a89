"""GenEval-mini: a deterministic prompt-fidelity checker for the flat-shape world (issue 8, part 2).

In place of GenEval's object detector and CLIP color classifier (Ghosh et al. 2023), objects are
found by color and geometry:
1. Each pixel gets the palette color of nearest hue, and an opacity (alpha) of that color over
   the background: its offset from the background projected on the color's. It is foreground if
   alpha >= 0.5, which on a white background is where an antialiased or blurred edge truly lies,
   and it has some chroma (greys and dark smudges are not objects).
2. Foreground pixels form 8-connected components; tiny ones (noise) are dropped. A component
   takes its majority color (none if most of its pixels are more than HUE_TOLERANCE off every
   palette hue); one holding two substantial colors (objects touching) is split by color. Components are labelled before colors are assigned so that a few edge pixels of drifting
   hue cannot make objects of their own.
3. A component's shape is the SHAPES template (scenes.shape_mask) with the highest IoU, if that
   IoU reaches MIN_SHAPE_IOU; else it is unrecognized. Templates are matched to the component's
   area and centroid, and blurred as much as its edges are (estimated from its alpha map), so
   blur and slight distortion, which round corners and fill in concave ones, hardly matter.
4. Prompt rules follow GenEval's `evaluate`: a required object is matched by shape, and by color
   where the prompt names one; extra objects are allowed except that counting needs exactly N;
   relations use GenEval's `relative_position` (threshold 0.1), here on component centroids,
   and hold if some matching pair satisfies them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .scenes import BACKGROUND, CATEGORIES, COLORS, PALETTE, RELATIONS, SHAPES, PromptSpec, shape_extent, shape_mask

HUE_TOLERANCE = 30.0       # degrees; beyond it a hue belongs to no palette color
CHROMA_GATE = 0.2          # foreground needs this fraction of its palette color's chroma
MIN_AREA = 0.002           # of the image area: smaller components are noise (smallest object ~0.007)
SPLIT_SHARE = 0.2          # a second color holding this share of a component splits it
MIN_SHAPE_IOU = 0.7        # template IoU needed to recognize a shape (circle vs square templates: 0.83)
MAX_ASPECT = 2.0           # bounding boxes more elongated than this are not any of the shapes
MAX_BLUR = 3.0             # px; a cap on the estimated edge blur
PIXEL_SIGMA = 0.3          # px; the blur that antialiasing alone gives an edge
POSITION_THRESHOLD = 0.1   # GenEval's: offsets shrink by this fraction of the summed box sizes


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360) and chroma (max - min, same units as rgb) of (..., 3) colors."""
    rgb = np.asarray(rgb, np.float64)
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    c = np.where(chroma > 0, chroma, 1.0)
    r, g, b = np.moveaxis(rgb, -1, 0)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return hue * 60.0, chroma


_RGB = np.array([PALETTE[c] for c in COLORS]) / 255.0  # row k is COLORS[k]
_BG = np.array(BACKGROUND) / 255.0
_PALETTE_HUE, _PALETTE_CHROMA = _hue_chroma(_RGB)


@dataclasses.dataclass(frozen=True)
class Detection:
    """A found object; shape / color None when unrecognized. Pixel units, x right, y down."""

    shape: str | None
    color: str | None
    centroid: tuple[float, float]          # (x, y)
    box: tuple[int, int, int, int]          # (x0, y0, x1, y1), exclusive end
    area: int
    shape_iou: float

    @property
    def dims(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    def __str__(self) -> str:
        x, y = self.centroid
        return f"{self.color or '?'} {self.shape or '?'}@({x:.0f},{y:.0f})"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    passed: bool
    category: str
    prompt: str
    reason: str                             # "ok", or what failed (for debugging)
    detections: tuple[Detection, ...]


def as_float_image(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from uint8 or float [0, 1] input."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got {image.dtype}")
    return np.clip(image.astype(np.float64), 0.0, 1.0)


def _template_stats(shape: str, n: int = 512) -> tuple[float, float]:
    """(fill fraction of its bounding box, centroid height in box units) of a shape."""
    t = (np.arange(n) + 0.5) / n
    m = shape_mask(shape, t[None, :], t[:, None])
    return float(m.mean()), float((m * t[:, None]).sum() / m.sum())


_TEMPLATE_STATS = {s: _template_stats(s) for s in SHAPES}


def _blur_sigma(mask: np.ndarray, alpha: np.ndarray) -> float:
    """Gaussian blur (px) of an object's edges, beyond a pixel's own antialiasing. A blurred edge
    of length L has alpha between 0.16 and 0.84 over a band of area 2 sigma L, and the alpha
    gradient integrates to L (each alpha level set is about L long). Only alpha within 3 px of
    the mask counts, away from other objects."""
    near = ndimage.binary_dilation(mask, iterations=3)
    a = np.where(near, np.clip(alpha, 0, 1), 0.0)
    band = ((a > 0.16) & (a < 0.84)).sum()
    length = max(np.hypot(*np.gradient(a)).sum(), 1.0)
    sigma = min(band / (2 * length), MAX_BLUR)
    return float(np.sqrt(max(sigma**2 - PIXEL_SIGMA**2, 0.0)))


def classify_shape(mask: np.ndarray, alpha: np.ndarray | None = None) -> tuple[str | None, float]:
    """Best-matching shape of an object, and its template IoU: `mask` is its foreground (with a
    margin of background around it), `alpha` its opacity map (default: the mask itself).

    Each upright template is scaled to the object's area and centered on its centroid, not
    fitted to its bounding box: blur rounds off corners and tips, which moves the box a lot but
    the area and centroid hardly at all. Each template is then blurred as much as the object's
    edges are and compared with the object's alpha (soft IoU), so a blurred cross is compared
    with a blurred cross, not with a sharp cross or diamond."""
    rows, cols = np.nonzero(mask)
    h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
    if min(h, w) < 3 or max(h / w, w / h) > MAX_ASPECT:
        return None, 0.0
    if alpha is None:
        alpha = mask.astype(np.float64)
    sigma = _blur_sigma(mask, alpha)
    soft = np.where(ndimage.binary_dilation(mask, iterations=3), np.clip(alpha, 0, 1), 0.0)
    area, cy, cx = soft.sum(), rows.mean() + 0.5, cols.mean() + 0.5  # blur keeps total alpha
    # Templates are drawn with 2x2 samples per pixel: antialiased like the renderer, only coarser.
    offsets = np.array([0.25, 0.75])
    y = (np.arange(mask.shape[0])[:, None] + offsets).reshape(-1, 1)
    x = (np.arange(mask.shape[1])[:, None] + offsets).reshape(1, -1)
    ious = []
    for shape in SHAPES:
        fill, centroid_v = _TEMPLATE_STATS[shape]
        tw, th = shape_extent(shape, 1.0)
        width = np.sqrt(area / (fill * tw * th))  # template area == object area
        inside = shape_mask(shape, (x - cx) / (width * tw) + 0.5, (y - cy) / (width * th) + centroid_v)
        t = inside.reshape(mask.shape[0], 2, mask.shape[1], 2).mean(axis=(1, 3))
        if sigma > 0:
            t = ndimage.gaussian_filter(t, sigma)
        ious.append(np.minimum(soft, t).sum() / np.maximum(soft, t).sum())
    best = int(np.argmax(ious))
    return (SHAPES[best] if ious[best] >= MIN_SHAPE_IOU else None), float(ious[best])


def _detection(mask: np.ndarray, color: str | None, alpha: np.ndarray) -> Detection:
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    # A margin around the crop leaves room for the fitted templates' corners and blurred edges.
    pad = max(r1 - r0, c1 - c0) // 2 + 2
    crop = np.pad(ndimage.binary_fill_holes(mask[r0:r1, c0:c1]), pad)
    alpha_crop = np.pad(alpha, pad)[r0:r1 + 2 * pad, c0:c1 + 2 * pad]
    shape, iou = classify_shape(crop, alpha_crop)
    return Detection(shape, color, (float(cols.mean() + 0.5), float(rows.mean() + 0.5)),
                     (int(c0), int(r0), int(c1), int(r1)), int(rows.size), iou)


def detect(image: np.ndarray) -> list[Detection]:
    """All objects in an image, in a deterministic (label) order."""
    img = as_float_image(image)
    hue, chroma = _hue_chroma(img)
    dist = np.abs(hue[..., None] - _PALETTE_HUE)
    dist = np.minimum(dist, 360.0 - dist)
    nearest = np.argmin(dist, -1)
    # Opacity of the nearest palette color over the background: the pixel's offset from the
    # background projected on that color's. It uses luminance as well as chroma, so edges stay
    # sharp where compression blurs chroma (JPEG's 4:2:0 subsampling).
    deficit = (_BG - _RGB)[nearest]
    alpha = ((_BG - img) * deficit).sum(-1) / (deficit**2).sum(-1)
    # The chroma gate rejects neutral pixels (greys, dark smudges) whatever their opacity.
    fg = (alpha >= 0.5) & (chroma >= CHROMA_GATE * _PALETTE_CHROMA[nearest])
    cls = np.where(dist.min(-1) <= HUE_TOLERANCE, nearest, -1)  # -1: off-palette hue
    labels, _ = ndimage.label(fg, structure=np.ones((3, 3), bool))
    min_area = MIN_AREA * img.shape[0] * img.shape[1]
    found: list[Detection] = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == i
        if comp.sum() < min_area:
            continue
        counts = np.bincount(cls[sl][comp] + 1, minlength=len(COLORS) + 1)[1:]
        major = [k for k in range(len(COLORS)) if counts[k] >= max(SPLIT_SHARE * comp.sum(), min_area)]
        if len(major) <= 1:
            best = int(np.argmax(counts))
            color = COLORS[best] if counts[best] >= 0.5 * comp.sum() else None
            parts = [(comp, color)]
        else:  # touching objects of different colors: one object per color piece
            parts = []
            for k in major:
                sub, m = ndimage.label(comp & (cls[sl] == k), structure=np.ones((3, 3), bool))
                parts += [(sub == j, COLORS[k]) for j in range(1, m + 1) if (sub == j).sum() >= min_area]
        for part, color in parts:
            full = np.zeros(labels.shape, bool)
            full[sl] = part
            found.append(_detection(full, color, alpha))
    return found


def relations(a: Detection, b: Detection) -> set[str]:
    """Relations of a to b (GenEval's relative_position): the centroid offset shrinks by
    POSITION_THRESHOLD x the summed box sizes per axis; a relation holds where the shrunk offset
    keeps more than half the offset's length along its axis."""
    offset = np.subtract(a.centroid, b.centroid)
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * np.add(a.dims, b.dims), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {r for r in RELATIONS if found[r]}


def check(image: np.ndarray, spec: PromptSpec) -> CheckResult:
    """Does the image show what the prompt asks? GenEval's rules, see the module docstring."""
    dets = detect(image)
    reasons: list[str] = []
    matches = []
    for req in spec.objects:
        want = f"{req.color + ' ' if req.color else ''}{req.shape}"
        hits = [d for d in dets if d.shape == req.shape and (req.color is None or d.color == req.color)]
        matches.append(hits)
        if spec.category == "counting" and len(hits) != req.count:
            reasons.append(f"expected exactly {req.count} {want}, found {len(hits)}")
        elif len(hits) < req.count:
            same_shape = [d.color or "?" for d in dets if d.shape == req.shape]
            reasons.append(f"expected {want}, found none" + (f" (colors of {req.shape}s: {same_shape})" if req.color and same_shape else ""))
    if spec.relation and not reasons:
        pairs = {f"{a} vs {b}": relations(a, b) for a in matches[0] for b in matches[1]}
        if not any(spec.relation in r for r in pairs.values()):
            reasons.append(f"no pair with relation {spec.relation!r}: " + "; ".join(f"{k}: {sorted(v)}" for k, v in pairs.items()))
    reason = "; ".join(reasons) if reasons else "ok"
    if reasons:
        reason += " | detected: " + (", ".join(map(str, dets)) or "nothing")
    return CheckResult(not reasons, spec.category, spec.text, reason, tuple(dets))


def score(results: Sequence[CheckResult]) -> dict[str, float]:
    """Per-category pass rates and "overall" = mean of the category means (GenEval's aggregate).
    Categories with no results are left out of both."""
    out: dict[str, float] = {}
    for category in CATEGORIES:
        passed = [r.passed for r in results if r.category == category]
        if passed:
            out[category] = float(np.mean(passed))
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out
