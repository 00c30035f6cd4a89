"""A procedurally generated, captioned world of flat shapes, checkable exactly (issue 8, part 1).

World: one to four (five in counterfactual scenes) non-overlapping flat shapes on a plain white
background. White because it is the easiest background for both sides: the checker finds
objects as pixels with a palette color's opacity over white and some chroma (white, greys and
compression noise have almost none), and a model only has to learn one constant. Colors are six saturated hues spaced around the hue circle
(see PALETTE); shapes are drawn upright with fixed proportions, so a shape is a pure function of
its bounding box (`shape_mask`), shared by the renderer and the checker's shape templates.

Captions follow GenEval's six categories (Ghosh et al. 2023). The evaluation prompts mirror
GenEval's wording: only the colors and color-attribution prompts name colors ("a circle",
"a circle and a square", "three triangles", "a red circle", "a circle to the left of a square",
"a red circle and a blue square"). Training prompts also name colors in the other categories
half of the time ("three yellow triangles"), so a model learns color words everywhere.

A Scene stores normalized geometry (centers and sizes as fractions of the image side), so one
scene renders at any resolution. Everything random takes an explicit numpy Generator.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

# ---- the world's constants (the checker imports these; nothing is defined twice) ----

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
# Six saturated hues, at least 25 degrees apart (red 0, orange 30, yellow 55, green 131,
# blue 223, purple 280), each with chroma >= 135/255, far above what noise gives white.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 125, 0),
    "yellow": (235, 215, 0),
    "green": (30, 165, 55),
    "blue": (35, 85, 215),
    "purple": (145, 45, 195),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# GenEval's relation names; a position prompt reads "<A> <phrase> <B>" and means A <relation> B.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES: dict[str, str] = {"left of": "to the left of", "right of": "to the right of",
                                    "above": "above", "below": "below"}
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}  # GenEval counts 2..4
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

IMAGE_SIZE = 128
TRIANGLE_ASPECT = float(np.sqrt(3) / 2)  # height / width of an upright equilateral triangle
CROSS_ARM = 1 / 3                        # arm width of a cross, as a fraction of its size
# Layout, as fractions of the image side. The gap keeps objects apart after blur or compression,
# so that counting is well defined; sizes shrink when more objects must fit.
GAP = 0.04
BORDER = 0.03
SIZE_RANGE_FEW = (0.15, 0.27)   # one or two objects
SIZE_RANGE_MANY = (0.13, 0.21)  # three or more
# A position scene keeps the cross-axis offset below this fraction of the main-axis offset, so
# exactly the captioned relation holds, with room to spare, under GenEval's rule.
POSITION_SKEW = 0.25
SUPERSAMPLE = 4  # antialiasing: 4x4 coverage samples per pixel


# ---- data types ----

@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One flat shape; x, y = bounding-box center, size = bounding-box width (fractions of the image side)."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    @property
    def extent(self) -> tuple[float, float]:
        return shape_extent(self.shape, self.size)


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """A required object: `count` of `shape`, all of `color` if one is given."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A structured prompt; `text` is derived from it. Position: objects[0] <relation> objects[1]."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        n = {"single_object": 1, "colors": 1, "counting": 1}.get(self.category, 2)
        if self.category not in CATEGORIES or len(self.objects) != n:
            raise ValueError(f"bad prompt spec: {self}")
        if (self.relation is not None) != (self.category == "position") or (
                self.relation is not None and self.relation not in RELATIONS):
            raise ValueError(f"bad relation in {self}")
        for o in self.objects:
            if o.shape not in SHAPES or (o.color is not None and o.color not in PALETTE):
                raise ValueError(f"unknown shape or color in {self}")
            if o.count not in (NUMBER_WORDS if self.category == "counting" else (1,)):
                raise ValueError(f"bad count in {self}")
            if o.color is None and self.category in ("colors", "color_attr"):
                raise ValueError(f"{self.category} prompts name every object's color: {self}")

    @property
    def text(self) -> str:
        return caption(self)


# ---- geometry and rendering ----

def shape_extent(shape: str, size: float) -> tuple[float, float]:
    """(width, height) of a shape's bounding box."""
    return (size, size * TRIANGLE_ASPECT) if shape == "triangle" else (size, size)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in bounding-box coordinates u (right), v (down) in [0, 1]; broadcasts."""
    du, dv = np.abs(u - 0.5), np.abs(v - 0.5)
    if shape == "circle":
        return du**2 + dv**2 <= 0.25
    if shape == "square":
        return (du <= 0.5) & (dv <= 0.5)
    if shape == "triangle":  # apex at the top center, base along the bottom
        return (du <= v / 2) & (v <= 1)
    if shape == "diamond":
        return du + dv <= 0.5
    if shape == "cross":
        return ((du <= CROSS_ARM / 2) & (dv <= 0.5)) | ((dv <= CROSS_ARM / 2) & (du <= 0.5))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene_or_spec: Scene | PromptSpec, rng: np.random.Generator | None = None,
           size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene (or a random scene satisfying a prompt; needs rng) as (size, size, 3) uint8."""
    if isinstance(scene_or_spec, PromptSpec):
        if rng is None:
            raise ValueError("rendering a PromptSpec needs an rng to lay the scene out")
        scene_or_spec = scene_for_prompt(scene_or_spec, rng)
    img = np.empty((size, size, 3), np.float64)
    img[:] = BACKGROUND
    offsets = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    for obj in scene_or_spec.objects:
        w, h = obj.extent
        x0, y0 = (obj.x - w / 2) * size, (obj.y - h / 2) * size  # box corner in pixels
        c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x0 + w * size)), size)
        r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y0 + h * size)), size)
        # Coverage = fraction of subpixel samples inside the shape.
        u = ((np.arange(c0, c1)[:, None] + offsets).ravel() - x0) / (w * size)
        v = ((np.arange(r0, r1)[:, None] + offsets).ravel() - y0) / (h * size)
        inside = shape_mask(obj.shape, u[None, :], v[:, None])
        alpha = inside.reshape(r1 - r0, SUPERSAMPLE, c1 - c0, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        patch = img[r0:r1, c0:c1]
        patch[:] = patch * (1 - alpha) + np.asarray(PALETTE[obj.color], np.float64) * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Mimic a generated image: slight smooth warp, gaussian blur, pixel noise and JPEG compression."""
    img = image.astype(np.float64)
    h, w = img.shape[:2]
    # A smooth random displacement field (up to ~1.5 px: a 4x4 grid of random offsets,
    # cubic-interpolated) bends edges the way a small decoder might.
    field = np.stack([ndimage.zoom(f, (h / 4, w / 4), order=3, mode="nearest") for f in rng.standard_normal((2, 4, 4))])
    field *= 1.5 * strength / max(np.abs(field).max(), 1e-9)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = [rows + field[0], cols + field[1]]
    img = np.stack([ndimage.map_coordinates(img[..., c], coords, order=1, mode="nearest") for c in range(3)], -1)
    img = ndimage.gaussian_filter(img, sigma=(rng.uniform(0, 1.0 * strength),) * 2 + (0,))
    img += rng.normal(0, rng.uniform(0, 6 * strength), img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=int(round(95 - 35 * strength * rng.uniform())))
    return np.asarray(Image.open(buf).convert("RGB"))


# ---- captions ----

def _noun_phrase(o: ObjectSpec) -> str:
    words = ([o.color] if o.color else []) + [o.shape if o.count == 1 else _plural(o.shape)]
    if o.count == 1:
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return NUMBER_WORDS[o.count] + " " + " ".join(words)


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def caption(spec: PromptSpec) -> str:
    """The prompt text: "a red circle", "a circle and a square", "three triangles",
    "a circle to the left of a square", "a red circle and a blue square"."""
    a = _noun_phrase(spec.objects[0])
    if len(spec.objects) == 1:
        return a
    b = _noun_phrase(spec.objects[1])
    return f"{a} {RELATION_PHRASES[spec.relation]} {b}" if spec.relation else f"{a} and {b}"


def _vocabulary() -> tuple[str, ...]:
    words = {"and"} | {w for p in RELATION_PHRASES.values() for w in p.split()}
    for shape in SHAPES:
        for color in (None, *COLORS):
            for count in (1, *NUMBER_WORDS):
                words.update(_noun_phrase(ObjectSpec(shape, color, count)).split())
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()  # every word any caption can use


# ---- prompts ----

def sample_prompt(rng: np.random.Generator, color_prob: float = 0.5) -> PromptSpec:
    """A random training prompt: category uniform; colors named always in colors / color_attr,
    with probability `color_prob` elsewhere. Two-object prompts name two different shapes."""
    category = CATEGORIES[rng.integers(len(CATEGORIES))]
    s = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:2]]
    c = [COLORS[i] for i in rng.permutation(len(COLORS))[:2]]
    named = category in ("colors", "color_attr") or rng.uniform() < color_prob
    if category in ("single_object", "colors"):
        return PromptSpec(category, (ObjectSpec(s[0], c[0] if named else None),))
    if category == "counting":
        n = int(rng.choice(list(NUMBER_WORDS)))
        return PromptSpec(category, (ObjectSpec(s[0], c[0] if named else None, n),))
    if category == "two_object" or category == "position":
        # Colors of two_object / position prompts may repeat; color_attr's differ (as GenEval's).
        c[1] = COLORS[rng.integers(len(COLORS))]
    objs = (ObjectSpec(s[0], c[0] if named else None), ObjectSpec(s[1], c[1] if named else None))
    relation = RELATIONS[rng.integers(len(RELATIONS))] if category == "position" else None
    return PromptSpec(category, objs, relation)


def geneval_prompts(category: str) -> list[PromptSpec]:
    """Every distinct GenEval-style prompt of a category, in a fixed order."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if category == "single_object":
        return [PromptSpec(category, (ObjectSpec(s),)) for s in SHAPES]
    if category == "two_object":
        return [PromptSpec(category, (ObjectSpec(a), ObjectSpec(b))) for a, b in pairs]
    if category == "counting":
        return [PromptSpec(category, (ObjectSpec(s, None, n),)) for s in SHAPES for n in NUMBER_WORDS]
    if category == "colors":
        return [PromptSpec(category, (ObjectSpec(s, c),)) for s in SHAPES for c in COLORS]
    if category == "position":
        return [PromptSpec(category, (ObjectSpec(a), ObjectSpec(b)), r) for a, b in pairs for r in RELATIONS]
    if category == "color_attr":
        return [PromptSpec(category, (ObjectSpec(a, ca), ObjectSpec(b, cb)))
                for a, b in pairs for ca in COLORS for cb in COLORS if ca != cb]
    raise ValueError(f"unknown category {category!r}")


def evaluation_prompts(n_per_category: int = 64, seed: int = 0) -> list[PromptSpec]:
    """The fixed evaluation set: n_per_category prompts per category, category by category.

    Categories with fewer distinct prompts than n (single_object has 5, counting 15) repeat them
    in seeded rounds, each prompt equally often, as GenEval scores several images per prompt:
    give each list entry its own generation seed."""
    rng = np.random.default_rng(seed)
    out: list[PromptSpec] = []
    for category in CATEGORIES:
        pool = geneval_prompts(category)
        order: list[int] = []
        while len(order) < n_per_category:
            order.extend(int(i) for i in rng.permutation(len(pool)))
        out.extend(pool[i] for i in order[:n_per_category])
    return out


# ---- layout ----

def _separated(a: SceneObject, b: SceneObject) -> bool:
    """Bounding boxes at least GAP apart along some axis."""
    (wa, ha), (wb, hb) = a.extent, b.extent
    return abs(a.x - b.x) >= (wa + wb) / 2 + GAP or abs(a.y - b.y) >= (ha + hb) / 2 + GAP


def _clear_relation(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """a <relation> b along the main axis, with a small cross-axis offset."""
    dx, dy = a.x - b.x, a.y - b.y  # image y grows downwards
    main, cross = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return main > 0 and abs(cross) <= POSITION_SKEW * main


def layout(items: Sequence[tuple[str, str]], rng: np.random.Generator, relation: str | None = None) -> Scene:
    """Place (shape, color) items at random sizes and positions, non-overlapping, inside the image.
    With `relation`, items[0] <relation> items[1] holds clearly."""
    lo, hi = SIZE_RANGE_FEW if len(items) <= 2 else SIZE_RANGE_MANY
    for _ in range(1000):
        placed: list[SceneObject] = []
        for shape, color in items:
            size = rng.uniform(lo, hi)
            w, h = shape_extent(shape, size)
            for _ in range(200):
                obj = SceneObject(shape, color, rng.uniform(BORDER + w / 2, 1 - BORDER - w / 2),
                                  rng.uniform(BORDER + h / 2, 1 - BORDER - h / 2), size)
                if all(_separated(obj, p) for p in placed) and (
                        relation is None or len(placed) != 1 or _clear_relation(placed[0], obj, relation)):
                    placed.append(obj)
                    break
            else:
                break  # crowded: start over with new sizes
        if len(placed) == len(items):
            return Scene(tuple(placed))
    raise RuntimeError(f"could not lay out {items}")


def scene_for_prompt(spec: PromptSpec, rng: np.random.Generator) -> Scene:
    """A random scene showing exactly what the prompt asks (unnamed colors drawn at random)."""
    items = [(o.shape, o.color or COLORS[rng.integers(len(COLORS))]) for o in spec.objects for _ in range(o.count)]
    return layout(items, rng, spec.relation)


def counterfactual_scene(spec: PromptSpec, rng: np.random.Generator) -> tuple[Scene, str]:
    """A random scene that violates the prompt, and how: a required object missing (another shape
    drawn instead), a wrong color, swapped colors, a wrong count, or a wrong relation."""
    kinds = ["missing"]
    if any(o.color for o in spec.objects):
        kinds.append("wrong color")
    if spec.category == "color_attr":
        kinds.append("swapped colors")
    if spec.category == "counting":
        kinds += ["wrong count"] * 2
    if spec.relation:
        kinds += ["wrong relation"] * 2
    kind = kinds[rng.integers(len(kinds))]
    objs = list(spec.objects)
    relation = spec.relation
    k = int(rng.integers(len(objs)))  # the object to spoil
    if kind == "missing":
        others = [s for s in SHAPES if s not in {o.shape for o in objs}]
        objs[k] = dataclasses.replace(objs[k], shape=others[rng.integers(len(others))])
    elif kind == "wrong color":
        colored = [i for i, o in enumerate(objs) if o.color]
        k = colored[rng.integers(len(colored))]
        others = [c for c in COLORS if c != objs[k].color]
        objs[k] = dataclasses.replace(objs[k], color=others[rng.integers(len(others))])
    elif kind == "swapped colors":
        objs = [dataclasses.replace(objs[0], color=objs[1].color), dataclasses.replace(objs[1], color=objs[0].color)]
    elif kind == "wrong count":
        n = objs[0].count
        objs[0] = dataclasses.replace(objs[0], count=n + 1 if rng.uniform() < 0.5 else n - 1)
    elif kind == "wrong relation":
        others = [r for r in RELATIONS if r != relation]
        relation = others[rng.integers(len(others))]
    items = [(o.shape, o.color or COLORS[rng.integers(len(COLORS))]) for o in objs for _ in range(o.count)]
    return layout(items, rng, relation), kind


# ---- training data ----

def sample_training_example(rng: np.random.Generator, size: int = IMAGE_SIZE,
                            color_prob: float = 0.5) -> tuple[np.ndarray, str, str]:
    """(image uint8 (size, size, 3), caption, category) for training; clean, undegraded renders."""
    spec = sample_prompt(rng, color_prob)
    return render(scene_for_prompt(spec, rng), size=size), spec.text, spec.category
