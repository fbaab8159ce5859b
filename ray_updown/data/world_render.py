"""The synthetic world's pictures: scenes of coloured, textured shapes on cluttered backgrounds.

A `Scene` is sampled first (everything the annotations need: classes, colours, textures, sizes,
boxes, background kind), then drawn by `render_scene`. Both take a numpy Generator, so a world
seeded per image is reproducible image by image, whatever order the images are made in.

Shapes are drawn 4x supersampled and box-filtered down, so edges are anti-aliased like a photo;
every shape gets a thin darker outline so two touching shapes of one colour stay separable, and
later shapes may cover earlier ones only up to `max_occlusion` of their box (so every object
stays detectable).
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (class name, aliases, WordNet synset) — objects_vocab.txt lists "name,alias,...".
SHAPE_CLASSES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("circle", (), "circle.n.01"),
    ("square", ("box",), "square.n.01"),
    ("triangle", (), "triangle.n.01"),
    ("diamond", ("rhombus",), "rhombus.n.01"),
    ("star", (), "star.n.05"),
    ("cross", ("plus",), "cross.n.01"),
    ("hexagon", (), "hexagon.n.01"),
    ("ring", ("donut",), "ring.n.08"),
)
CLASS_NAMES: tuple[str, ...] = tuple(c[0] for c in SHAPE_CLASSES)

# Saturated colours plus white and black; backgrounds are desaturated mid tones, so each of
# these differs from any background in hue, saturation or brightness.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 80, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
SIZES: tuple[str, ...] = ("small", "large")
BACKGROUNDS: tuple[str, ...] = ("noise", "gradient", "lines")

# Shapes whose width and height may differ (a stretched circle or square would change class).
_STRETCHABLE = {"triangle", "diamond", "hexagon", "cross"}
_SUPERSAMPLE = 4


@dataclass
class WorldObject:
    """One shape: its class, attributes and tight box (x, y, w, h) in pixels."""

    cls: str
    colour: str
    texture: str
    size: str
    x: int
    y: int
    w: int
    h: int
    stripe_angle: int = 45  # degrees, for striped shapes

    @property
    def cx(self) -> float:
        return self.x + self.w / 2.0

    @property
    def cy(self) -> float:
        return self.y + self.h / 2.0

    @property
    def area(self) -> int:
        return self.w * self.h


@dataclass
class Scene:
    """A picture's content; `objects` are in drawing order (later ones on top)."""

    width: int
    height: int
    background: str
    objects: list[WorldObject] = field(default_factory=list)
    base_colour: tuple[int, int, int] = (128, 128, 128)
    second_colour: tuple[int, int, int] = (128, 128, 128)

    def covered_fraction(self, index: int) -> float:
        """Fraction of object `index`'s box hidden by the boxes of objects drawn after it."""
        o = self.objects[index]
        mask = np.zeros((o.h, o.w), dtype=bool)
        for later in self.objects[index + 1:]:
            _cover(mask, o, later)
        return float(mask.mean()) if mask.size else 0.0


def _cover(mask: np.ndarray, below: WorldObject, above: WorldObject) -> None:
    x1, y1 = max(below.x, above.x), max(below.y, above.y)
    x2, y2 = min(below.x + below.w, above.x + above.w), min(below.y + below.h, above.y + above.h)
    if x2 > x1 and y2 > y1:
        mask[y1 - below.y:y2 - below.y, x1 - below.x:x2 - below.x] = True


def overlap_fraction(below: WorldObject, above: WorldObject) -> float:
    """Fraction of `below`'s box that `above`'s box covers."""
    iw = min(below.x + below.w, above.x + above.w) - max(below.x, above.x)
    ih = min(below.y + below.h, above.y + above.h) - max(below.y, above.y)
    return max(iw, 0) * max(ih, 0) / float(below.area) if below.area else 0.0


def object_pixel_range(width: int, height: int, min_fraction: float,
                       max_fraction: float) -> tuple[int, int, int, int]:
    """(small_lo, small_hi, large_lo, large_hi) object sides in pixels for an image size."""
    side = min(width, height)
    lo, hi = side * min_fraction, side * max_fraction
    split = lo + (hi - lo) * 0.45  # a gap between small and large keeps the size words honest
    gap = (hi - lo) * 0.1
    return (round(lo), round(split - gap / 2), round(split + gap / 2), round(hi))


def sample_scene(rng: np.random.Generator, width: int, height: int, min_objects: int,
                 max_objects: int, min_fraction: float, max_fraction: float,
                 max_occlusion: float) -> Scene:
    """Sample a scene whose every object is at most `max_occlusion` covered (box-wise)."""
    small_lo, small_hi, large_lo, large_hi = object_pixel_range(width, height, min_fraction,
                                                                max_fraction)
    hue = rng.random()
    base = _muted(hue, rng)
    second = _muted((hue + rng.uniform(0.1, 0.5)) % 1.0, rng)
    scene = Scene(width, height, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], [], base, second)
    target = int(rng.integers(min_objects, max_objects + 1))
    for _attempt_scene in range(20):
        scene.objects = []
        for _ in range(target):
            for _attempt in range(80):
                size = SIZES[rng.integers(2)]
                lo, hi = (small_lo, small_hi) if size == "small" else (large_lo, large_hi)
                cls = CLASS_NAMES[rng.integers(len(CLASS_NAMES))]
                w = int(rng.integers(lo, hi + 1))
                h = w
                if cls in _STRETCHABLE:
                    h = int(np.clip(round(w * rng.uniform(0.8, 1.25)), lo, hi))
                if w > width or h > height:
                    continue
                obj = WorldObject(
                    cls=cls, colour=list(COLOURS)[rng.integers(len(COLOURS))],
                    texture=TEXTURES[rng.integers(len(TEXTURES))], size=size,
                    x=int(rng.integers(0, width - w + 1)), y=int(rng.integers(0, height - h + 1)),
                    w=w, h=h, stripe_angle=int(rng.choice([45, -45, 0, 90])))
                scene.objects.append(obj)
                if all(scene.covered_fraction(i) <= max_occlusion
                       for i in range(len(scene.objects) - 1)):
                    break
                scene.objects.pop()
        if len(scene.objects) >= min_objects:
            return scene
    # Crowded configurations: keep what fits (validated configs always reach min_objects).
    return scene


def _muted(hue: float, rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.06, 0.22), rng.uniform(0.45, 0.62))
    return (int(r * 255), int(g * 255), int(b * 255))


def shape_polygons(cls: str, w: float, h: float) -> tuple[list[list[tuple[float, float]]], bool]:
    """Outline(s) of a class filling the box [0, w] x [0, h]; True means "draw as ellipses"
    (circle, ring: the outer ellipse and, for a ring, the hole)."""
    if cls == "circle":
        return [[(0, 0), (w, h)]], True
    if cls == "ring":
        t = 0.25  # ring thickness as a fraction of the box
        return [[(0, 0), (w, h)], [(w * t, h * t), (w * (1 - t), h * (1 - t))]], True
    if cls == "square":
        unit = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif cls == "triangle":
        unit = [(0.5, 0), (1, 1), (0, 1)]
    elif cls == "diamond":
        unit = [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    elif cls == "cross":
        a, b = 0.33, 0.67
        unit = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b),
                (0, a), (a, a)]
    elif cls == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(ang), r * math.sin(ang)))
        unit = _fill_box(pts)
    elif cls == "hexagon":
        unit = _fill_box([(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)])
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    return [[(x * w, y * h) for x, y in unit]], False


def _fill_box(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0, sx, sy = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [((x - x0) / sx, (y - y0) / sy) for x, y in pts]


def _shape_alpha(obj: WorldObject) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, outline) in [0, 1], each h x w, anti-aliased by supersampling."""
    s = _SUPERSAMPLE
    big = Image.new("L", (obj.w * s, obj.h * s), 0)
    draw = ImageDraw.Draw(big)
    outlines, ellipse = shape_polygons(obj.cls, obj.w * s - 1, obj.h * s - 1)
    if ellipse:
        draw.ellipse(outlines[0], fill=255)
        if len(outlines) > 1:
            draw.ellipse(outlines[1], fill=0)
    else:
        draw.polygon(outlines[0], fill=255)
    inner = big.filter(ImageFilter.MinFilter(2 * s - 1))  # ~1 px outline after downsampling
    size = (obj.w, obj.h)
    cover = np.asarray(big.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0
    core = np.asarray(inner.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0
    return cover, np.clip(cover - core, 0.0, 1.0)


def _texture_fill(obj: WorldObject, period: int) -> np.ndarray:
    """The shape's paint (h x w x 3): its colour, with stripes or dots in a shade of it."""
    colour = np.array(COLOURS[obj.colour], dtype=np.float32)
    fill = np.broadcast_to(colour, (obj.h, obj.w, 3)).copy()
    if obj.texture == "plain":
        return fill
    shade = np.array((95, 95, 95), np.float32) if obj.colour == "black" else colour * 0.5
    yy, xx = np.mgrid[0:obj.h, 0:obj.w].astype(np.float32)
    if obj.texture == "striped":
        coord = {45: xx + yy, -45: xx - yy, 0: yy, 90: xx}[obj.stripe_angle]
        pattern = (np.floor(coord / (period / 2.0)) % 2) == 1
    else:
        spacing = period * 1.5  # sparse dots, so they read as dots and not as a grid
        dx = (xx % spacing) - spacing / 2.0 + 0.5
        dy = (yy % spacing) - spacing / 2.0 + 0.5
        pattern = dx * dx + dy * dy <= (spacing * 0.24) ** 2
    fill[pattern] = shade
    return fill


def render_scene(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw a scene: background clutter, then the shapes in order, then mild sensor noise."""
    w, h = scene.width, scene.height
    canvas = _background(scene, rng)
    period = max(4, round(min(w, h) / 26))
    for obj in scene.objects:
        cover, outline = _shape_alpha(obj)
        fill = _texture_fill(obj, period)
        edge_colour = (np.array((70, 70, 70), np.float32) if obj.colour == "black"
                       else np.array(COLOURS[obj.colour], np.float32) * 0.35)
        region = canvas[obj.y:obj.y + obj.h, obj.x:obj.x + obj.w]
        a = cover[..., None]
        region[:] = region * (1 - a) + fill * a
        e = outline[..., None]
        region[:] = region * (1 - e) + edge_colour * e
    canvas += rng.normal(0.0, 3.0, canvas.shape).astype(np.float32)
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


def _background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    w, h = scene.width, scene.height
    base = np.array(scene.base_colour, np.float32)
    canvas = np.broadcast_to(base, (h, w, 3)).copy()
    if scene.background == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (xx / max(w - 1, 1) - 0.5) * math.cos(angle) + (yy / max(h - 1, 1) - 0.5) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        canvas = base * (1 - t[..., None]) + np.array(scene.second_colour, np.float32) * t[..., None]
    elif scene.background == "noise":
        # Coarse blotches plus fine grain.
        coarse = rng.normal(0.0, 14.0, (max(h // 8, 2), max(w // 8, 2), 1)).astype(np.float32)
        coarse_img = Image.fromarray(np.clip(coarse[..., 0] + 128, 0, 255).astype(np.uint8), "L")
        blotch = np.asarray(coarse_img.resize((w, h), Image.Resampling.BILINEAR), np.float32) - 128
        canvas += blotch[..., None] + rng.normal(0.0, 12.0, (h, w, 3)).astype(np.float32)
    else:  # thin random lines in muted shades of the background
        img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(6, 15))):
            shift = rng.uniform(-45, 45)
            colour = tuple(int(np.clip(c + shift, 0, 255)) for c in scene.base_colour)
            pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(2)]
            draw.line(pts, fill=colour, width=1)
        canvas = np.asarray(img, np.float32).copy()
    canvas += rng.normal(0.0, 4.0, canvas.shape).astype(np.float32)
    return canvas


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes; the same pixels and quality give the same bytes (no timestamps, no EXIF)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()
