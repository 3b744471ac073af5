"""A small CNN that reads the toy world's concepts (colour, shape, background) off an image.

It is the judge of the toy model: generated images are classified and compared with the concepts
their prompt asked for. Trained on rendered :mod:`ddr_core.toy_world` images with light
augmentation (Gaussian noise, blur, brightness), so it also reads the slightly blurry, noisy
images a small diffusion model makes. Saved as ``classifier.safetensors`` + ``classifier_config.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ddr_core.atomic import widen_to_umask
from ddr_core.toy_world import CONCEPTS, ToyWorldConfig, images_to_tensor, make_dataset

CONFIG_FILENAME = "classifier_config.json"
WEIGHTS_FILENAME = "classifier.safetensors"


@dataclass(frozen=True)
class ConceptClassifierConfig:
    """Architecture and label sets of the classifier.

    Attributes:
        image_size: Side of the (square) input images in pixels.
        channels: Conv widths; each level is conv3x3 + GroupNorm + ReLU + stride-2 conv3x3 +
            GroupNorm + ReLU (GroupNorm makes shape learnable in a few hundred steps).
        norm_groups: GroupNorm groups; must divide every width.
        heads: Concept family -> its label names, in label-index order.
    """

    image_size: int = 32
    channels: tuple[int, ...] = (16, 32, 64)
    norm_groups: int = 4
    heads: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(CONCEPTS))

    def __post_init__(self) -> None:
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be positive widths, got {self.channels}.")
        if any(c % self.norm_groups for c in self.channels):
            raise ValueError(f"norm_groups={self.norm_groups} must divide every width in {self.channels}.")
        if not self.heads or any(len(names) < 2 for names in self.heads.values()):
            raise ValueError(f"Every head needs at least two labels, got {self.heads}.")

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["heads"] = {name: list(labels) for name, labels in self.heads.items()}
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> ConceptClassifierConfig:
        try:
            return cls(
                image_size=int(data["image_size"]),
                channels=tuple(int(c) for c in data["channels"]),
                norm_groups=int(data["norm_groups"]),
                heads={str(name): tuple(str(v) for v in labels) for name, labels in data["heads"].items()},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(
                f"Classifier config is missing or has a malformed field ({error}); rewrite it with "
                "save_concept_classifier."
            ) from error


class ConceptClassifier(nn.Module):
    """Conv trunk + global mean and max pool + one linear head per concept family.

    Input ``(batch, 3, image_size, image_size)`` in ``[-1, 1]``; output: family -> logits
    ``(batch, len(labels))``.
    """

    def __init__(self, config: ConceptClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width_in = 3
        for width in config.channels:
            layers += [
                nn.Conv2d(width_in, width, 3, padding=1),
                nn.GroupNorm(config.norm_groups, width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                nn.GroupNorm(config.norm_groups, width),
                nn.ReLU(),
            ]
            width_in = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(2 * width_in, len(labels)) for name, labels in config.heads.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images (batch, 3, height, width), got {tuple(images.shape)}.")
        trunk = self.trunk(images)
        features = torch.cat([trunk.mean(dim=(2, 3)), trunk.amax(dim=(2, 3))], dim=1)
        return {name: head(features) for name, head in self.heads.items()}


@dataclass(frozen=True)
class ClassifierTrainingConfig:
    """Training run of the classifier.

    Attributes:
        seed: Seeds the data, the initialisation and the batch order.
        num_images: Rendered training images.
        steps: Optimiser steps (Adam).
        batch_size: Images per step.
        learning_rate: Adam learning rate.
        noise_std: Max std of Gaussian noise added per image (in the ``[-1, 1]`` scale).
        blur_probability: Chance an image is blurred with a 3x3 box filter.
        num_eval_images: Held-out rendered images (another seed) for the reported accuracy.
    """

    seed: int = 0
    num_images: int = 2880
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 5e-3
    noise_std: float = 0.15
    blur_probability: float = 0.5
    num_eval_images: int = 360


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _augment(
    images: torch.Tensor, config: ClassifierTrainingConfig, generator: torch.Generator
) -> torch.Tensor:
    """Random blur, brightness scaling and noise, per image; ``(batch, 3, H, W)`` in and out."""
    batch = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    use_blur = (torch.rand(batch, 1, 1, 1, generator=generator) < config.blur_probability).float()
    images = use_blur * blurred + (1 - use_blur) * images
    gain = 1.0 + 0.1 * (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1)
    noise_std = config.noise_std * torch.rand(batch, 1, 1, 1, generator=generator)
    noise = torch.randn(images.shape, generator=generator) * noise_std
    return ((images + 1) * gain - 1 + noise).clamp(-1.2, 1.2)


def train_concept_classifier(
    config: ConceptClassifierConfig = ConceptClassifierConfig(),
    training: ClassifierTrainingConfig = ClassifierTrainingConfig(),
    world: ToyWorldConfig | None = None,
) -> tuple[ConceptClassifier, dict[str, Any]]:
    """Train a classifier on rendered toy-world images.

    Returns:
        The model (eval mode) and a report: ``accuracy`` per head on held-out images, ``steps``,
        ``seconds``, ``final_loss``.

    Raises:
        ValueError: if the world's image size differs from the classifier's.
    """
    world = world or ToyWorldConfig(image_size=config.image_size)
    if world.image_size != config.image_size:
        raise ValueError(
            f"World image_size {world.image_size} differs from classifier image_size {config.image_size}."
        )
    concepts = world.concepts
    for name, labels in config.heads.items():
        if concepts.get(name) != tuple(labels):
            raise ValueError(
                f"Head {name!r} labels {labels} are not the world's {name} labels {concepts.get(name)} "
                f"(world {world.world!r}; pass heads=ToyWorldConfig(world=...).concepts)."
            )
    started = time.perf_counter()
    data = make_dataset(training.num_images, seed=training.seed, config=world)
    held_out = make_dataset(training.num_eval_images, seed=training.seed + 10_000, config=world)
    with _seeded(training.seed):
        model = ConceptClassifier(config)
    generator = torch.Generator().manual_seed(training.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, training.learning_rate, total_steps=max(training.steps, 1)
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(training.steps):
        index = torch.randint(0, len(data), (training.batch_size,), generator=generator)
        images = _augment(data.images[index], training, generator)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[name], data.labels[name][index]) for name in config.heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    predictions = predict_concepts(model, held_out.images)
    accuracy = {
        name: float((torch.as_tensor(predictions[name]) == held_out.labels[name]).float().mean())
        for name in config.heads
    }
    report = {
        "accuracy": accuracy,
        "steps": training.steps,
        "seconds": time.perf_counter() - started,
        "final_loss": float(loss.detach()),
        "training": asdict(training),
    }
    return model, report


@torch.no_grad()
def predict_concept_probabilities(
    model: ConceptClassifier, images: torch.Tensor | np.ndarray, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Per-head softmax probabilities ``(batch, len(labels))``.

    Args:
        images: float ``(batch, 3, H, W)`` in ``[-1, 1]``, or an array ``(batch, H, W, 3)``
            (uint8, or float in ``[0, 1]`` as diffusers' ``output_type="np"`` gives).
    """
    tensor = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    size = model.config.image_size
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(
            tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in model.config.heads}
    for start in range(0, tensor.shape[0], batch_size):
        logits = model(tensor[start : start + batch_size].float())
        for name, values in logits.items():
            chunks[name].append(values.softmax(dim=1).numpy())
    return {
        name: np.concatenate(parts) if parts else np.zeros((0, len(model.config.heads[name])), np.float32)
        for name, parts in chunks.items()
    }


def predict_concepts(model: ConceptClassifier, images: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-head predicted label index ``(batch,)`` (int64); see :func:`predict_concept_probabilities`."""
    return {
        name: probs.argmax(axis=1) for name, probs in predict_concept_probabilities(model, images).items()
    }


def save_concept_classifier(model: ConceptClassifier, folder: str | Path, report: dict | None = None) -> Path:
    """Write ``classifier.safetensors`` and ``classifier_config.json`` (plus ``training_report`` in it)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILENAME))
    widen_to_umask(out / WEIGHTS_FILENAME)  # safetensors writes 0600 whatever the umask
    payload = model.config.to_json_dict()
    if report is not None:
        payload["training_report"] = report
    (out / CONFIG_FILENAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def load_concept_classifier(folder: str | Path) -> ConceptClassifier:
    """Load a classifier written by :func:`save_concept_classifier` (eval mode, CPU, float32).

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: for a config/weights mismatch.
    """
    root = Path(folder)
    for name in (CONFIG_FILENAME, WEIGHTS_FILENAME):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"Concept classifier folder {root} has no {name}; train and save one with "
                "ddr_core.concept_classifier.save_concept_classifier."
            )
    fix = "re-provision the model folder that holds it, or rewrite it with save_concept_classifier"
    config_path = root / CONFIG_FILENAME
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"Classifier config {config_path} is not valid JSON ({error}); {fix}.") from error
    if not isinstance(raw, dict):
        raise ValueError(f"Classifier config {config_path} holds a JSON {type(raw).__name__}, not an object; {fix}.")
    try:
        config = ConceptClassifierConfig.from_json_dict(raw)
    except ValueError as error:
        raise ValueError(f"Classifier config {config_path}: {error}") from error
    model = ConceptClassifier(config)
    try:
        tensors = load_file(str(root / WEIGHTS_FILENAME))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"Classifier weights {root / WEIGHTS_FILENAME} are corrupt ({error}); {fix}.") from error
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"Weights in {root / WEIGHTS_FILENAME} do not match {CONFIG_FILENAME}: {error}"
        ) from error
    return model.eval()


def model_concept_classifier(project: Any, layout: Any, model_name: str) -> ConceptClassifier | None:
    """The concept classifier a provisioned model declares (``models.<name>.concept_classifier``, a folder inside
    the model folder), or ``None`` where it declares none. The model's provisioned files are checked first (the
    classifier came with them: unchanged?) and neither file may lead out of the model folder through a link, at any
    level. One definition for every stage that classifies images (feature_concepts, visual_benchmark,
    dose_response)."""
    from ddr_core.paths import file_inside
    from ddr_core.pipeline import check_provisioned_model

    model = project.models[model_name]
    if not model.concept_classifier:
        return None
    field = f"models.{model_name}.concept_classifier"
    model_dir = layout.model_dir(model_name)
    check_provisioned_model(model_dir)
    for name in (CONFIG_FILENAME, WEIGHTS_FILENAME):
        file_inside(model_dir, f"{model.concept_classifier.rstrip('/')}/{name}", field)
    return load_concept_classifier(file_inside(model_dir, model.concept_classifier, field))
