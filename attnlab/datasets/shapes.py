"""Procedural shape scenes and questions for the ``organism-vlm`` model organism.

A scene is a few coloured shapes (circle, square, triangle, star, cross in six colours) on a dark
background, one object per cell of a 3x3 grid, rendered with PIL. Every scene comes with its object
list, so every question is answered correctly by construction:

- existence: ``"Is there a red circle in the image?"`` -> ``"yes"`` / ``"no"`` (the POPE phrasing);
- attribute: ``"What color is the circle?"`` -> ``"red"`` (asked only when that shape occurs once);
- count: ``"How many squares are there?"`` -> ``"0"`` ... ``"6"``;
- position: ``"Where is the blue triangle?"`` -> ``"top left"``, ``"center"``, ``"bottom"``, ...

**Deliberate co-occurrence bias.** ``SceneConfig.pairs`` lists (trigger, partner) objects. Whenever a
trigger is in a scene, its partner is in the scene with probability exactly ``cooccur_p`` (default
0.95) and absent otherwise; partners also appear on their own at their base rate. A model trained on
this distribution can learn the shortcut "red circle, so there is a blue square", which shows up as
a measurable object hallucination on the adversarial POPE split (absent partners of present
triggers), the phenomenon VHR and VAR try to fix. To make the shortcut worth learning, a partner
that comes with its trigger is drawn "in the background" (small, semi-transparent) with probability
``faint_p`` (default 0.5): weak visual evidence plus a strong contextual prior, the usual recipe of
object hallucination in real LVLMs. A model that looks carefully can still tell such a partner from
no partner at all.

**POPE-style splits** (`pope_questions`): per scene up to 3 present objects (answer yes) and as many
absent ones (answer no). Negatives are drawn uniformly from the absent objects (``random``), from the
most frequent absent objects (``popular``), or first from absent partners of present triggers, then
popular ones (``adversarial``; scenes for that split are drawn conditioned on containing at least one
trigger whose partner is absent).

Everything is a pure function of a seed (``numpy.random.Generator``), returns plain tuples, strings
and PIL images, and imports nothing beyond numpy and PIL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (50, 180, 70),
    "blue": (60, 100, 235),
    "yellow": (240, 215, 40),
    "purple": (165, 70, 210),
    "white": (240, 240, 240),
}
# Cell index (row-major over the 3x3 grid) -> answer to "Where is ...?".
CELL_NAMES: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
ANSWER_YES, ANSWER_NO = "yes", "no"
QUESTION_KINDS: tuple[str, ...] = ("exist", "attribute", "count", "position")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")

ObjectKey = tuple[str, str]  # (color, shape), e.g. ("red", "circle")

# Object popularity order (most frequent first); frequencies follow a Zipf law over this order.
# The six paired objects sit in the upper half so that the bias is seen often in training.
_ALL_OBJECTS: tuple[ObjectKey, ...] = tuple((c, s) for s in SHAPES for c in COLORS)
_PAIR_OBJECTS: tuple[ObjectKey, ...] = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "star"),
    ("purple", "cross"),
    ("white", "circle"),
)
DEFAULT_PAIRS: tuple[tuple[ObjectKey, ObjectKey], ...] = (
    (("red", "circle"), ("blue", "square")),
    (("green", "triangle"), ("yellow", "star")),
    (("purple", "cross"), ("white", "circle")),
)


def _default_popularity() -> tuple[ObjectKey, ...]:
    """Deterministic popularity order: interleave paired objects with the others, paired first."""
    rest = [o for o in _ALL_OBJECTS if o not in _PAIR_OBJECTS]
    order: list[ObjectKey] = []
    for i in range(max(len(_PAIR_OBJECTS), len(rest))):
        if i < len(rest):
            order.append(rest[i])
        if i < len(_PAIR_OBJECTS):
            order.append(_PAIR_OBJECTS[i])
    return tuple(order)


@dataclass(frozen=True)
class SceneConfig:
    """Parameters of the scene distribution (all sizes in output pixels)."""

    image_size: int = 64
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 4
    cooccur_p: float = 0.95
    faint_p: float = 0.5
    faint_size_range: tuple[int, int] = (8, 11)
    faint_alpha_range: tuple[float, float] = (0.4, 0.6)
    pairs: tuple[tuple[ObjectKey, ObjectKey], ...] = DEFAULT_PAIRS
    popularity: tuple[ObjectKey, ...] = field(default_factory=_default_popularity)
    zipf: float = 0.6
    size_range: tuple[int, int] = (13, 18)
    jitter: int = 2
    supersample: int = 2

    def weights(self) -> np.ndarray:
        """Sampling probability of each object in ``popularity`` order (Zipf with exponent ``zipf``)."""
        w = 1.0 / np.arange(1, len(self.popularity) + 1) ** self.zipf
        return w / w.sum()

    def partner_of(self) -> dict[ObjectKey, ObjectKey]:
        """Map trigger object -> partner object."""
        return {t: p for t, p in self.pairs}


class SceneObject(NamedTuple):
    """One rendered object: colour name, shape name, grid cell, centre (px), size (px) and opacity."""

    color: str
    shape: str
    cell: int
    cx: float
    cy: float
    size: float
    alpha: float = 1.0

    @property
    def key(self) -> ObjectKey:
        return (self.color, self.shape)


class Scene(NamedTuple):
    """A scene: its objects and background colour."""

    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]

    def keys(self) -> set[ObjectKey]:
        return {o.key for o in self.objects}

    def to_dict(self) -> dict:
        """Plain JSON-serialisable description."""
        return {"background": list(self.background), "objects": [o._asdict() for o in self.objects]}


class Question(NamedTuple):
    """A question about a scene, with its ground-truth answer.

    ``kind`` is one of ``QUESTION_KINDS``; ``target`` names the object or shape asked about;
    ``negative`` is ``""`` for non-existence questions and positives, else the POPE negative type
    (``"random"``, ``"popular"``, ``"adversarial"``, ``"cooccur"`` for an absent partner of a present trigger).
    """

    kind: str
    text: str
    answer: str
    target: tuple[str, ...]
    negative: str = ""


# ----------------------------------------------------------------------------------------------
# scene sampling
# ----------------------------------------------------------------------------------------------


def _sample_keys(rng: np.random.Generator, cfg: SceneConfig) -> tuple[list[ObjectKey], set[ObjectKey]]:
    """Sample the objects of a scene, applying the co-occurrence rule exactly.

    Returns the object keys and the set of partners that were added because of their trigger.
    """
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    idx = rng.choice(len(cfg.popularity), size=k, replace=False, p=cfg.weights())
    keys = [cfg.popularity[i] for i in idx]
    partner = cfg.partner_of()
    added: set[ObjectKey] = set()
    for trigger in list(keys):
        if trigger not in partner or trigger not in keys:
            continue
        mate = partner[trigger]
        if rng.random() < cfg.cooccur_p:
            if mate not in keys:
                keys.append(mate)
                added.add(mate)
        elif mate in keys:
            keys.remove(mate)
    return keys, added


def sample_scene(rng: np.random.Generator, cfg: SceneConfig = SceneConfig(), *, force_break: bool = False) -> Scene:
    """Sample one scene.

    A partner added because its trigger is present is drawn "in the background" with probability
    ``cfg.faint_p``: smaller (``faint_size_range``) and semi-transparent (``faint_alpha_range``).
    Weak visual evidence for an object that the context predicts is what lets a language prior win,
    so the model learns to lean on the trigger; when the partner is really absent it may still say yes.

    With ``force_break`` the scene is redrawn until it holds a trigger whose partner is absent (the
    scenes of the adversarial POPE split); the rest of the distribution is unchanged.
    """
    partner = cfg.partner_of()
    while True:
        keys, added = _sample_keys(rng, cfg)
        if not force_break or any(t in keys and p not in keys for t, p in partner.items()):
            break
    cells = rng.choice(cfg.grid * cfg.grid, size=len(keys), replace=False)
    cell_px = cfg.image_size / cfg.grid
    objects = []
    for (color, shape), cell in zip(keys, cells):
        row, col = divmod(int(cell), cfg.grid)
        faint = (color, shape) in added and rng.random() < cfg.faint_p
        size = float(rng.uniform(*(cfg.faint_size_range if faint else cfg.size_range)))
        alpha = float(rng.uniform(*cfg.faint_alpha_range)) if faint else 1.0
        cx = (col + 0.5) * cell_px + float(rng.uniform(-cfg.jitter, cfg.jitter))
        cy = (row + 0.5) * cell_px + float(rng.uniform(-cfg.jitter, cfg.jitter))
        objects.append(SceneObject(color, shape, int(cell), cx, cy, size, alpha))
    g = int(rng.integers(20, 75))
    tint = rng.integers(-8, 9, size=3)
    background = tuple(int(np.clip(g + t, 0, 255)) for t in tint)
    return Scene(tuple(objects), background)  # type: ignore[arg-type]


def object_rgb(obj: SceneObject, background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Fill colour of an object: its colour blended over the background by its opacity."""
    c = COLORS[obj.color]
    return tuple(int(round(obj.alpha * c[i] + (1 - obj.alpha) * background[i])) for i in range(3))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of half-size ``r`` centred on (cx, cy)."""
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.05 * r + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [
            (cx - w, cy - r),
            (cx + w, cy - r),
            (cx + w, cy - w),
            (cx + r, cy - w),
            (cx + r, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + r),
            (cx - w, cy + r),
            (cx - w, cy + w),
            (cx - r, cy + w),
            (cx - r, cy - w),
            (cx - w, cy - w),
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene, cfg: SceneConfig = SceneConfig()) -> Image.Image:
    """Render a scene to an RGB PIL image of ``cfg.image_size`` pixels (supersampled, box-filtered)."""
    s = cfg.supersample
    size = cfg.image_size * s
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.cx * s, o.cy * s, o.size * s / 2
        fill = object_rgb(o, scene.background)
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    if s > 1:
        img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BOX)
    return img


def render_array(scene: Scene, cfg: SceneConfig = SceneConfig()) -> np.ndarray:
    """Render a scene as a ``uint8`` array of shape (H, W, 3)."""
    return np.asarray(render_scene(scene, cfg), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# questions
# ----------------------------------------------------------------------------------------------


def exist_question(key: ObjectKey, present: bool, negative: str = "") -> Question:
    """``Is there a <color> <shape> in the image?`` (POPE phrasing)."""
    color, shape = key
    return Question(
        "exist",
        f"Is there a {color} {shape} in the image?",
        ANSWER_YES if present else ANSWER_NO,
        (color, shape),
        "" if present else negative,
    )


def attribute_question(scene: Scene, shape: str) -> Question:
    """``What color is the <shape>?``; the shape must occur exactly once in the scene."""
    found = [o for o in scene.objects if o.shape == shape]
    if len(found) != 1:
        raise ValueError(f"attribute question needs exactly one {shape}, scene has {len(found)}")
    return Question("attribute", f"What color is the {shape}?", found[0].color, (shape,))


def count_question(scene: Scene, shape: str) -> Question:
    """``How many <shapes> are there?`` -> a digit."""
    n = sum(o.shape == shape for o in scene.objects)
    return Question("count", f"How many {PLURALS[shape]} are there?", str(n), (shape,))


def position_question(scene: Scene, key: ObjectKey) -> Question:
    """``Where is the <color> <shape>?`` -> a cell name such as ``top left``."""
    for o in scene.objects:
        if o.key == key:
            return Question("position", f"Where is the {key[0]} {key[1]}?", CELL_NAMES[o.cell], key)
    raise ValueError(f"position question about an absent object {key}")


def absent_objects(scene: Scene, cfg: SceneConfig = SceneConfig()) -> list[ObjectKey]:
    """Absent objects in popularity order (most frequent first)."""
    present = scene.keys()
    return [k for k in cfg.popularity if k not in present]


def cooccur_absent(scene: Scene, cfg: SceneConfig = SceneConfig()) -> list[ObjectKey]:
    """Absent partners of triggers that are present (the objects a biased model hallucinates)."""
    present = scene.keys()
    return [p for t, p in cfg.pairs if t in present and p not in present]


def sample_question(
    rng: np.random.Generator,
    scene: Scene,
    cfg: SceneConfig = SceneConfig(),
    kind_probs: tuple[float, float, float, float] = (0.5, 0.15, 0.15, 0.2),
) -> Question:
    """Sample one training question about ``scene``.

    ``kind_probs`` weights (exist, attribute, count, position). Existence questions are half present,
    half absent objects; absent ones are drawn uniformly (POPE-random style), so absent partners of
    present triggers are asked about only as often as chance makes them. An attribute question falls
    back to a count question when no shape occurs exactly once.
    """
    kind = QUESTION_KINDS[int(rng.choice(len(QUESTION_KINDS), p=np.asarray(kind_probs) / sum(kind_probs)))]
    objs = scene.objects
    if kind == "exist":
        if rng.random() < 0.5:
            return exist_question(objs[int(rng.integers(len(objs)))].key, True)
        absent = absent_objects(scene, cfg)
        return exist_question(absent[int(rng.integers(len(absent)))], False, "random")
    if kind == "attribute":
        single = [s for s in SHAPES if sum(o.shape == s for o in objs) == 1]
        if single:
            return attribute_question(scene, single[int(rng.integers(len(single)))])
        kind = "count"
    if kind == "count":
        # Half the time ask about a shape in the scene, else any shape (zero counts included).
        pool = sorted({o.shape for o in objs}) if rng.random() < 0.5 else list(SHAPES)
        return count_question(scene, pool[int(rng.integers(len(pool)))])
    return position_question(scene, objs[int(rng.integers(len(objs)))].key)


def pope_questions(
    split: str, n_scenes: int, seed: int, cfg: SceneConfig = SceneConfig(), per_scene: int = 3
) -> list[tuple[Scene, Question]]:
    """POPE-style yes/no set: ``n_scenes`` scenes, each with up to ``per_scene`` present and as many absent objects.

    Negatives: ``random`` uniform over absent objects; ``popular`` the most frequent absent objects;
    ``adversarial`` the absent partners of present triggers first (scenes are conditioned to have
    one), then popular absent objects. Absent partners are tagged ``negative="cooccur"``.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    rng = np.random.default_rng([seed, POPE_SPLITS.index(split), 7919])
    out: list[tuple[Scene, Question]] = []
    for _ in range(n_scenes):
        scene = sample_scene(rng, cfg, force_break=split == "adversarial")
        present = [o.key for o in scene.objects]
        pos = [present[i] for i in rng.permutation(len(present))[:per_scene]]
        absent = absent_objects(scene, cfg)
        if split == "random":
            neg = [absent[i] for i in rng.permutation(len(absent))[: len(pos)]]
        elif split == "popular":
            neg = absent[: len(pos)]
        else:
            mates = cooccur_absent(scene, cfg)
            neg = (mates + [a for a in absent if a not in mates])[: len(pos)]
        mates = set(cooccur_absent(scene, cfg))
        for key in pos:
            out.append((scene, exist_question(key, True)))
        for key in neg:
            out.append((scene, exist_question(key, False, "cooccur" if key in mates else split)))
    return out


def task_questions(kind: str, n: int, seed: int, cfg: SceneConfig = SceneConfig()) -> list[tuple[Scene, Question]]:
    """``n`` (scene, question) pairs of one kind (``attribute``, ``count`` or ``position``) for evaluation."""
    if kind not in ("attribute", "count", "position"):
        raise ValueError(f"unknown question kind {kind!r}")
    rng = np.random.default_rng([seed, QUESTION_KINDS.index(kind), 104729])
    out: list[tuple[Scene, Question]] = []
    while len(out) < n:
        scene = sample_scene(rng, cfg)
        objs = scene.objects
        if kind == "attribute":
            single = [s for s in SHAPES if sum(o.shape == s for o in objs) == 1]
            if not single:
                continue
            q = attribute_question(scene, single[int(rng.integers(len(single)))])
        elif kind == "count":
            q = count_question(scene, SHAPES[int(rng.integers(len(SHAPES)))])
        else:
            q = position_question(scene, objs[int(rng.integers(len(objs)))].key)
        out.append((scene, q))
    return out


def shape_question_items(n: int, seed: int) -> list[tuple[Scene, Question]]:
    """About ``n`` (scene, question) pairs, a quarter of each kind (POPE-random existence, attribute, count,
    position)."""
    per = max(1, n // 4)
    exist = pope_questions("random", per // 6 + 2, seed)
    exist = [exist[i] for i in np.random.default_rng(seed).permutation(len(exist))[:per]]
    return exist + [x for kind in ("attribute", "count", "position") for x in task_questions(kind, per, seed)]


def vocabulary() -> list[str]:
    """Every lower-cased word the questions and answers use (for a closed word-level tokenizer)."""
    words: set[str] = {
        "is",
        "there",
        "a",
        "in",
        "the",
        "image",
        "what",
        "color",
        "how",
        "many",
        "are",
        "where",
        ANSWER_YES,
        ANSWER_NO,
        "?",
        ".",
        ",",
        ":",
    }
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(COLORS)
    for name in CELL_NAMES:
        words.update(name.split())
    words.update(str(d) for d in range(10))
    return sorted(words)


def training_chunk(job: tuple) -> tuple[np.ndarray, list[list[tuple[str, str]]]]:
    """Render one chunk of a training pool; a top-level function so worker processes can run it.

    ``job`` is ``(seed, stream, chunk_index, n_scenes, questions_per_scene, cfg)``; the chunk's
    random stream depends only on (seed, stream, chunk_index). Returns uint8 images (n, H, W, 3)
    and, per scene, its (question text, answer) pairs.
    """
    seed, stream, index, n, per_scene, cfg = job
    rng = np.random.default_rng([seed, stream, index])
    images = np.empty((n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    questions: list[list[tuple[str, str]]] = []
    for i in range(n):
        scene = sample_scene(rng, cfg)
        images[i] = render_array(scene, cfg)
        questions.append([(q.text, q.answer) for q in (sample_question(rng, scene, cfg) for _ in range(per_scene))])
    return images, questions


def config_to_dict(cfg: SceneConfig) -> dict:
    """JSON-serialisable form of a ``SceneConfig`` (tuples become lists)."""
    return asdict(cfg)


def config_from_dict(d: dict) -> SceneConfig:
    """Inverse of ``config_to_dict``: rebuild the tuples (unknown keys are an error)."""
    d = dict(d)
    if "pairs" in d:
        d["pairs"] = tuple((tuple(t), tuple(p)) for t, p in d["pairs"])
    if "popularity" in d:
        d["popularity"] = tuple(tuple(k) for k in d["popularity"])
    for key in ("size_range", "faint_size_range", "faint_alpha_range"):
        if key in d:
            d[key] = tuple(d[key])
    return SceneConfig(**d)
