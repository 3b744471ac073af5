"""A synthetic "toy world" of coloured shapes with known concepts, for training and benchmarking.

Every image shows one shape (:data:`SHAPES`) in one colour (:data:`COLOURS`) on a flat background
(:data:`BACKGROUNDS`), with a random size and position. Each image carries its concept labels
(:class:`ToyScene`) and a prompt built only from the world's vocabulary
(``"a red circle on a black background"``), so a model trained on the world has known concepts
and a feature found inside it can be scored against ground truth.

A second, richer world (``ToyWorldConfig(world="shapes-rich")``, :data:`RICH_CONCEPTS`) adds colours and
a shape and names each shape's size and quadrant in the prompt
(``"a small red circle at the top left on a black background"``): 576 prompts, 19 concept values, designed
from a power simulation (:mod:`ddr_core.toy_training.power`, docs/TOY_WORLD.md). The original world
(``"shapes"``) and its byte-exact draws are unchanged.

Everything is deterministic: :func:`sample_scenes` draws scenes from a seeded NumPy generator and
:func:`render_scenes` renders them with anti-aliasing by supersampling (pure NumPy, no fonts or
image libraries), so the same seed always gives byte-identical images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import product

import numpy as np
import torch

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 215, 30),
}
"""Nominal RGB of each shape colour (a scene may jitter it by up to ``colour_jitter``)."""

BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}

PROMPT_TEMPLATE = "a {colour} {shape} on a {background} background"

CONCEPTS: dict[str, tuple[str, ...]] = {"colour": COLOURS, "shape": SHAPES, "background": BACKGROUNDS}
"""Concept family -> its values in label-index order (the ``"shapes"`` world, the shipped model's)."""

WORLDS: tuple[str, ...] = ("shapes", "shapes-rich", "shapes-no-yellow")
ABLATED_WORLDS: dict[str, tuple[str, str, str]] = {"shapes-no-yellow": ("shapes", "colour", "yellow")}
"""A world with one concept value removed -> (parent world, family, removed value). Its scenes and prompts never
show the value; its vocabulary is the parent's (the word stays known to the tokenizer but is never trained), so a
model trained on it can be run on the parent's prompts and compared with the parent's model
(:mod:`ddr_core.feature_matching`, docs/MATCHING.md)."""
RICH_COLOURS: tuple[str, ...] = (*COLOURS, "orange", "purple")
RICH_SHAPES: tuple[str, ...] = (*SHAPES, "diamond")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
RICH_CONCEPTS: dict[str, tuple[str, ...]] = {"colour": RICH_COLOURS, "shape": RICH_SHAPES,
                                             "background": BACKGROUNDS, "size": SIZES, "position": POSITIONS}
"""The ``"shapes-rich"`` world's families: 6 x 4 x 3 x 2 x 4 = 576 prompts (docs/TOY_WORLD.md)."""
RICH_PROMPT_TEMPLATE = "a {size} {colour} {shape} at the {position} on a {background} background"
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.15, 0.2), "large": (0.25, 0.3)}
"""Radius range (fraction of the image side) of each ``"shapes-rich"`` size; the gap keeps them apart."""
COLOUR_RGB.update({"orange": (245, 135, 20), "purple": (140, 50, 200)})


MODEL_WORLDS: dict[str, str] = {"toy-world": "shapes", "toy-world-rich": "shapes-rich",
                                "toy-world-no-yellow": "shapes-no-yellow"}
"""A model's ``world`` in the project config -> the :data:`WORLDS` it was trained on."""


def world_concepts(world: str = "shapes") -> dict[str, tuple[str, ...]]:
    """Concept family -> values of a world (:data:`WORLDS`).

    Raises:
        ValueError: an unknown world (names the known ones).
    """
    if world == "shapes":
        return dict(CONCEPTS)
    if world == "shapes-rich":
        return dict(RICH_CONCEPTS)
    if world in ABLATED_WORLDS:
        parent, family, removed = ABLATED_WORLDS[world]
        concepts = world_concepts(parent)
        concepts[family] = tuple(value for value in concepts[family] if value != removed)
        return concepts
    raise ValueError(f"Unknown toy world {world!r}; expected one of {WORLDS}.")


def world_prompts(world: str = "shapes") -> tuple[str, ...]:
    """Every prompt of the world: 36 for ``"shapes"`` (one per background, colour, shape), 576 for
    ``"shapes-rich"`` (background, colour, shape, size, position); an :data:`ABLATED_WORLDS` world: its parent's
    prompts without the removed value (27 for ``"shapes-no-yellow"``)."""
    if world in ABLATED_WORLDS:
        parent, family, removed = ABLATED_WORLDS[world]
        return tuple(prompt for prompt in world_prompts(parent) if parse_prompt(prompt)[family] != removed)
    if world != "shapes":
        world_concepts(world)
        return tuple(
            RICH_PROMPT_TEMPLATE.format(colour=c, shape=s, background=b, size=z, position=p)
            for b, c, s, z, p in product(BACKGROUNDS, RICH_COLOURS, RICH_SHAPES, SIZES, POSITIONS)
        )
    return tuple(
        PROMPT_TEMPLATE.format(colour=colour, shape=shape, background=background)
        for background, colour, shape in product(BACKGROUNDS, COLOURS, SHAPES)
    )


def world_vocabulary(world: str = "shapes") -> list[str]:
    """The world's words in first-seen order over :func:`world_prompts` (the tokenizer vocabulary); an
    :data:`ABLATED_WORLDS` world has its parent's vocabulary (the removed word is known, never trained)."""
    from ddr_core.tokenizer import prompt_words

    if world in ABLATED_WORLDS:
        return world_vocabulary(ABLATED_WORLDS[world][0])

    return prompt_words(world_prompts(world))


def parse_prompt(prompt: str) -> dict[str, str]:
    """Concept labels named by a world prompt, e.g. ``{"colour": "red", "shape": "circle", ...}`` (a
    ``"shapes-rich"`` prompt, :data:`RICH_PROMPT_TEMPLATE`, also names ``size`` and ``position``).

    Raises:
        ValueError: if the prompt is not of the form of :data:`PROMPT_TEMPLATE` (or
            :data:`RICH_PROMPT_TEMPLATE`) with world words.
    """
    words = prompt.strip().lower().split()
    if len(words) == 12 and words[4:6] == ["at", "the"]:
        return _parse_rich_prompt(prompt, words)
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(
            f"Prompt {prompt!r} is not a toy-world prompt; expected the form {PROMPT_TEMPLATE!r}."
        )
    labels = {"colour": words[1], "shape": words[2], "background": words[5]}
    for family, value in labels.items():
        if value not in CONCEPTS[family]:
            raise ValueError(
                f"Prompt {prompt!r} names {family} {value!r}, which is not one of {CONCEPTS[family]}."
            )
    return labels


def _parse_rich_prompt(prompt: str, words: list[str]) -> dict[str, str]:
    if words[0] != "a" or words[8:10] != ["on", "a"] or words[11] != "background":
        raise ValueError(f"Prompt {prompt!r} is not a toy-world prompt; expected the form {RICH_PROMPT_TEMPLATE!r}.")
    labels = {"colour": words[2], "shape": words[3], "background": words[10], "size": words[1],
              "position": f"{words[6]} {words[7]}"}
    for family, value in labels.items():
        if value not in RICH_CONCEPTS[family]:
            raise ValueError(
                f"Prompt {prompt!r} names {family} {value!r}, which is not one of {RICH_CONCEPTS[family]}."
            )
    return labels


@dataclass(frozen=True)
class ToyWorldConfig:
    """How scenes are drawn and rendered.

    Attributes:
        image_size: Image side in pixels.
        min_size_fraction: Smallest shape radius as a fraction of ``image_size``.
        max_size_fraction: Largest shape radius as a fraction of ``image_size``.
        colour_jitter: Maximum per-channel RGB offset (0-255 scale) added to a shape's colour.
        supersample: Anti-aliasing factor: each pixel is the mean of ``supersample**2`` samples.
        world: Which world (:data:`WORLDS`): ``"shapes"`` (the shipped model's) or ``"shapes-rich"``
            (sizes from :data:`SIZE_FRACTIONS`, centres in the named quadrant; the size fractions above
            are then unused).
    """

    image_size: int = 32
    min_size_fraction: float = 0.2
    max_size_fraction: float = 0.34
    colour_jitter: int = 12
    supersample: int = 4
    world: str = "shapes"

    @property
    def concepts(self) -> dict[str, tuple[str, ...]]:
        """The world's concept families (:func:`world_concepts`)."""
        return world_concepts(self.world)

    def __post_init__(self) -> None:
        world_concepts(self.world)
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}.")
        if not 0 < self.min_size_fraction <= self.max_size_fraction < 0.5:
            raise ValueError(
                "Need 0 < min_size_fraction <= max_size_fraction < 0.5 so a shape fits the image, got "
                f"{self.min_size_fraction} and {self.max_size_fraction}."
            )
        if not 0 <= self.colour_jitter <= 40:
            raise ValueError(
                f"colour_jitter must be in [0, 40] so colours stay distinct, got {self.colour_jitter}."
            )
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}.")


@dataclass(frozen=True)
class ToyScene:
    """One image's content and its concept labels.

    Attributes:
        colour: Shape colour, one of :data:`COLOURS`.
        shape: One of :data:`SHAPES`.
        background: One of :data:`BACKGROUNDS`.
        radius: Shape radius in pixels (circle radius; half the square's side; the triangle's
            circumradius).
        center_x: Shape centre, pixels from the left edge.
        center_y: Shape centre, pixels from the top edge.
        rgb: The shape's actual RGB after jitter (0-255).
        size: ``"shapes-rich"`` only: one of :data:`SIZES` (``None`` in the ``"shapes"`` world).
        position: ``"shapes-rich"`` only: the quadrant of the centre, one of :data:`POSITIONS`.
    """

    colour: str
    shape: str
    background: str
    radius: float
    center_x: float
    center_y: float
    rgb: tuple[int, int, int]
    size: str | None = None
    position: str | None = None

    @property
    def world(self) -> str:
        return "shapes" if self.size is None else "shapes-rich"

    @property
    def prompt(self) -> str:
        """The scene described with the world's vocabulary (:data:`PROMPT_TEMPLATE` or
        :data:`RICH_PROMPT_TEMPLATE`)."""
        if self.size is not None:
            return RICH_PROMPT_TEMPLATE.format(colour=self.colour, shape=self.shape, background=self.background,
                                               size=self.size, position=self.position)
        return PROMPT_TEMPLATE.format(colour=self.colour, shape=self.shape, background=self.background)

    def label_indices(self) -> dict[str, int]:
        """Index of each concept value in its world's order (:func:`world_concepts`), e.g. ``{"colour": 0, ...}``."""
        concepts = world_concepts(self.world)
        return {family: concepts[family].index(getattr(self, family)) for family in concepts}

    def to_json_dict(self) -> dict:
        """Plain dict of every field plus the prompt (JSON/Parquet friendly; ``size``/``position`` only in
        the ``"shapes-rich"`` world)."""
        data = asdict(self)
        if self.size is None:
            del data["size"], data["position"]
        data["rgb"] = list(self.rgb)
        data["prompt"] = self.prompt
        return data


def sample_scenes(count: int, seed: int, config: ToyWorldConfig = ToyWorldConfig()) -> list[ToyScene]:
    """``count`` scenes, balanced over every (background, colour, shape) combination.

    Scene ``i`` has combination ``permutation[i % 36]`` (a seeded shuffle of the 36 combinations,
    redrawn every 36 scenes), so any 36 consecutive scenes hold each combination once; radius,
    position and colour jitter are drawn uniformly (an :data:`ABLATED_WORLDS` world of ``"shapes"``: the same over
    its fewer combinations, e.g. 27 for ``"shapes-no-yellow"``). Deterministic in ``(count, seed, config)``.

    Raises:
        ValueError: for a negative ``count``.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}.")
    if config.world == "shapes-rich":
        return _sample_rich_scenes(count, seed, config)
    concepts = world_concepts(config.world)
    rng = np.random.Generator(np.random.PCG64(seed))
    combos = list(product(concepts["background"], concepts["colour"], concepts["shape"]))
    size = config.image_size
    scenes: list[ToyScene] = []
    order: np.ndarray = np.arange(0)
    for index in range(count):
        if index % len(combos) == 0:
            order = rng.permutation(len(combos))
        background, colour, shape = combos[int(order[index % len(combos)])]
        radius = float(rng.uniform(config.min_size_fraction, config.max_size_fraction) * size)
        margin = radius + 1.0
        center_x = float(rng.uniform(margin, size - margin))
        center_y = float(rng.uniform(margin, size - margin))
        jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOUR_RGB[colour], jitter, strict=True))
        scenes.append(ToyScene(colour, shape, background, radius, center_x, center_y, rgb))  # type: ignore[arg-type]
    return scenes


def _sample_rich_scenes(count: int, seed: int, config: ToyWorldConfig) -> list[ToyScene]:
    """``"shapes-rich"`` scenes balanced over its 576 combinations (a seeded shuffle redrawn every 576); the
    radius is drawn in the size's :data:`SIZE_FRACTIONS` range, the centre uniformly in the named quadrant
    (clipped so the shape stays inside the image)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    combos = list(product(BACKGROUNDS, RICH_COLOURS, RICH_SHAPES, SIZES, POSITIONS))
    size = config.image_size
    half = size / 2.0
    scenes: list[ToyScene] = []
    order: np.ndarray = np.arange(0)
    for index in range(count):
        if index % len(combos) == 0:
            order = rng.permutation(len(combos))
        background, colour, shape, size_name, position = combos[int(order[index % len(combos)])]
        low, high = SIZE_FRACTIONS[size_name]
        radius = float(rng.uniform(low, high) * size)
        margin = radius + 1.0
        vertical, horizontal = position.split()
        x_range = (margin, half) if horizontal == "left" else (half, size - margin)
        y_range = (margin, half) if vertical == "top" else (half, size - margin)
        center_x = float(rng.uniform(*x_range))
        center_y = float(rng.uniform(*y_range))
        jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOUR_RGB[colour], jitter, strict=True))
        scenes.append(ToyScene(colour, shape, background, radius, center_x, center_y, rgb,  # type: ignore[arg-type]
                               size=size_name, position=position))
    return scenes


def _shape_mask(scene: ToyScene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean coverage of the shape at sample coordinates ``xs``, ``ys`` (same shape arrays)."""
    dx = xs - scene.center_x
    dy = ys - scene.center_y
    r = scene.radius
    if scene.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if scene.shape == "square":
        half = r * 0.85  # area close to the circle's, so size alone does not tell the shape
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if scene.shape == "triangle":
        # Upward equilateral triangle with circumradius 1.2 r centred on (center_x, center_y).
        rc = r * 1.2
        apex = (0.0, -rc)
        left = (-rc * np.sqrt(3) / 2, rc / 2)
        right = (rc * np.sqrt(3) / 2, rc / 2)

        def edge(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
            return (b[0] - a[0]) * (dy - a[1]) - (b[1] - a[1]) * (dx - a[0])

        e1, e2, e3 = edge(apex, right), edge(right, left), edge(left, apex)
        return ((e1 >= 0) & (e2 >= 0) & (e3 >= 0)) | ((e1 <= 0) & (e2 <= 0) & (e3 <= 0))
    if scene.shape == "diamond":
        # A square standing on a corner, half-diagonal 1.2 r (area 2.9 r^2, close to the circle's 3.1 r^2).
        return np.abs(dx) + np.abs(dy) <= 1.2 * r
    raise ValueError(f"Unknown shape {scene.shape!r}; expected one of {RICH_SHAPES}.")


def shape_coverage(shape: str, radius: float, center_x: np.ndarray | float, center_y: np.ndarray | float,
                   size: int, supersample: int = 4) -> np.ndarray:
    """The renderer's exact shape mask as pixel coverage in ``[0, 1]`` (the fraction of a pixel's ``supersample**2``
    samples inside the shape, as :func:`render_scene` blends it), for one shape and radius at one or many centres:
    ``center_x`` / ``center_y`` scalars give ``(size, size)``, arrays of shape ``(k,)`` give ``(k, size, size)``."""
    offsets = (np.arange(size * supersample) + 0.5) / supersample
    ys, xs = np.meshgrid(offsets, offsets, indexing="ij")
    cx, cy = np.asarray(center_x, dtype=np.float64), np.asarray(center_y, dtype=np.float64)
    many = cx.ndim == 1
    probe = ToyScene("red", shape, "black", float(radius), cx[:, None, None] if many else cx,  # type: ignore[arg-type]
                     cy[:, None, None] if many else cy, (0, 0, 0))
    inside = _shape_mask(probe, xs, ys).astype(np.float64)
    return inside.reshape(*inside.shape[:-2], size, supersample, size, supersample).mean(axis=(-3, -1))


def render_scene(scene: ToyScene, config: ToyWorldConfig = ToyWorldConfig()) -> np.ndarray:
    """Render one scene as ``(height, width, 3)`` uint8 RGB (anti-aliased by supersampling)."""
    size, factor = config.image_size, config.supersample
    offsets = (np.arange(size * factor) + 0.5) / factor
    ys, xs = np.meshgrid(offsets, offsets, indexing="ij")
    coverage = _shape_mask(scene, xs, ys).astype(np.float64)
    coverage = coverage.reshape(size, factor, size, factor).mean(axis=(1, 3))[..., None]
    background = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float64)
    foreground = np.asarray(scene.rgb, dtype=np.float64)
    image = background * (1.0 - coverage) + foreground * coverage
    return np.round(image).astype(np.uint8)


def render_scenes(scenes: Sequence[ToyScene], config: ToyWorldConfig = ToyWorldConfig()) -> np.ndarray:
    """Render scenes as ``(batch, height, width, 3)`` uint8 RGB."""
    if not scenes:
        return np.zeros((0, config.image_size, config.image_size, 3), dtype=np.uint8)
    return np.stack([render_scene(scene, config) for scene in scenes])


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(batch, height, width, 3)`` -> float32 ``(batch, 3, height, width)`` in ``[-1, 1]``.

    Also accepts float arrays in ``[0, 1]`` (what ``StableDiffusionPipeline(output_type="np")`` returns).
    """
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"Expected images of shape (batch, height, width, 3), got {array.shape}.")
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    return torch.from_numpy(scaled).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


@dataclass
class ToyDataset:
    """Rendered scenes with their prompts and labels.

    Attributes:
        scenes: One :class:`ToyScene` per image.
        images: ``(batch, 3, height, width)`` float32 in ``[-1, 1]``.
        prompts: One prompt per image.
        labels: Concept family -> ``(batch,)`` int64 label indices in :data:`CONCEPTS` order.
    """

    scenes: list[ToyScene]
    images: torch.Tensor
    prompts: list[str]
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.scenes)


def make_dataset(count: int, seed: int, config: ToyWorldConfig = ToyWorldConfig()) -> ToyDataset:
    """Sample, render and label ``count`` scenes (see :func:`sample_scenes`)."""
    scenes = sample_scenes(count, seed, config)
    images = images_to_tensor(render_scenes(scenes, config))
    labels = {
        family: torch.tensor([scene.label_indices()[family] for scene in scenes], dtype=torch.int64)
        for family in config.concepts
    }
    return ToyDataset(scenes=scenes, images=images, prompts=[s.prompt for s in scenes], labels=labels)


REFERENCE_RENDERS = 4000
"""Renders :func:`nearest_render_rmse` compares an image with by default (111 per combination)."""
REFERENCE_SEED = 20261127
RECOGNISABLE_RMSE = 0.15
"""An image within this RMSE (0-1 pixel scale) of some render "looks like the world": 98% of the shipped
model's own prompted generations are (median 0.073), a washed-out prior or a colour field is not (~0.2)."""


def reference_renders(count: int = REFERENCE_RENDERS, seed: int = REFERENCE_SEED,
                      config: ToyWorldConfig = ToyWorldConfig()) -> np.ndarray:
    """``(count, image_size, image_size, 3)`` uint8 renders of every combination, sizes and positions."""
    return render_scenes(sample_scenes(count, seed, config), config)


def nearest_render_rmse(images: np.ndarray, renders: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Per image, the RMSE (pixels scaled to 0-1) to the nearest render: how much the image looks like
    *some* picture of the world, whatever its concepts.

    Args:
        images: ``(n, height, width, 3)`` uint8.
        renders: ``(m, height, width, 3)`` uint8 (:func:`reference_renders`), the same image size.

    Returns:
        ``(n,)`` float64.

    Raises:
        ValueError: images and renders differ in size (name both shapes).
    """
    images, renders = np.asarray(images), np.asarray(renders)
    if images.ndim != 4 or renders.ndim != 4 or images.shape[1:] != renders.shape[1:]:
        raise ValueError(f"images {images.shape} and renders {renders.shape} must both be (n, height, width, 3) "
                         f"of one size; render the world at the images' size (ToyWorldConfig(image_size=...))")
    if len(images) == 0:
        return np.zeros(0)
    reference = torch.from_numpy(renders.reshape(len(renders), -1)).double() / 255.0
    reference_sq = (reference * reference).sum(dim=1)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start:start + batch_size].reshape(-1, reference.shape[1])).double() / 255.0
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b finds the nearest render fast, but its cancellation leaves residues
        # of ~1e-9 whose sign depends on the BLAS kernel: the RMSE itself is taken directly on the nearest one,
        # so an exact match is exactly 0 on every machine
        squared = (chunk * chunk).sum(dim=1, keepdim=True) + reference_sq[None, :] - 2.0 * chunk @ reference.T
        nearest = reference[squared.argmin(dim=1)]
        out.append(torch.sqrt(((chunk - nearest) ** 2).mean(dim=1)))
    return torch.cat(out).numpy()
