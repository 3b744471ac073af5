"""The zero-shot CLIP labeller (kind ``clip``), for models without ground truth.

Weights are provisioned like a model (:func:`ddr_core.catalog.provision_source`: HF hub, Google Drive or a local
folder, with the manifest and checks of :mod:`ddr_core.provisioning`) into ``<data_root>/assets/labellers/<name>``
and checked against their manifest before loading. A folder in the layout of ``openai/clip-vit-base-patch32``:
``config.json``, ``model.safetensors`` and the ``CLIPTokenizer`` files (``preprocessor_config.json`` optional: its
``image_mean`` / ``image_std``). Images are preprocessed here with PIL and numpy (resize the short side to the
vision tower's ``image_size``, bicubic; centre crop; normalise), no torchvision.

Every image gets CLIP's softmax over the candidate ``vocabulary`` (one row); a feature's label is the entry whose
mean probability over its labelling images most exceeds its mean over all images, and an image is detected when
that entry is among its ``top_k`` most probable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ddr_core.labels.protocol import LabellerContext, lift_choice

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: Sequence[np.ndarray], size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """``(n, 3, size, size)`` float32 of RGB uint8 images: short side resized to ``size`` (bicubic), centre crop,
    scaled to 0-1 and normalised with ``mean`` / ``std``."""
    from PIL import Image

    out = np.zeros((len(images), 3, size, size), dtype=np.float32)
    for index, array in enumerate(images):
        image = Image.fromarray(np.asarray(array, dtype=np.uint8)).convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        crop = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out[index] = ((crop - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).transpose(2, 0, 1)
    return out


def _features(output: Any) -> Any:
    """The projected embeddings of ``get_text_features`` / ``get_image_features``: a tensor (transformers 4) or
    the ``pooler_output`` of the output object (transformers 5)."""
    return output if hasattr(output, "norm") else output.pooler_output


class ClipLabeller:
    kind = "clip"

    def __init__(self, folder: str | Path, vocabulary: Sequence[str], top_k: int = 1, batch_size: int = 32) -> None:
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if len(vocabulary) < 2:
            raise ValueError("a clip labeller needs 2 or more candidate labels in its vocabulary")
        self.vocabulary = list(vocabulary)
        self.top_k = max(1, min(int(top_k), len(self.vocabulary)))
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self.size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.is_file():
            settings = json.loads(preprocessor.read_text(encoding="utf-8"))
            self.mean = tuple(settings.get("image_mean", CLIP_MEAN))
            self.std = tuple(settings.get("image_std", CLIP_STD))
        tokens = tokenizer(self.vocabulary, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            text = _features(self.model.get_text_features(**tokens))
        self.text = torch.nn.functional.normalize(text, dim=-1)

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """CLIP's probabilities over the vocabulary, ``(n, len(vocabulary))``."""
        import torch

        rows = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.from_numpy(preprocess(images[start:start + self.batch_size], self.size, self.mean, self.std))
            with torch.no_grad():
                features = torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pixels)),
                                                       dim=-1)
                logits = self.model.logit_scale.exp() * features @ self.text.T
            rows.append(torch.softmax(logits, dim=-1).double().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.vocabulary)))

    def label(self, encoded: np.ndarray, rows: np.ndarray) -> str | None:
        return lift_choice(encoded, rows, self.vocabulary)

    def detect(self, label: str, encoded: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if label not in self.vocabulary:
            raise ValueError(f"label {label!r} is not in the vocabulary")
        column = self.vocabulary.index(label)
        rank = (encoded[rows] > encoded[rows, column][:, None]).sum(axis=1)  # entries more probable than the label
        return rank < self.top_k


def labeller_dir(layout: Any, name: str) -> Path:
    """``<data_root>/assets/labellers/<name>`` (``name`` a safe folder name)."""
    from ddr_core.paths import check_name

    return layout.assets_dir / "labellers" / check_name(name, "labeller")


def provision_labeller(layout: Any, name: str, config: Any, log: Any = None) -> Path:
    """Provision the labeller's weights (skipped when an intact copy is there) and check them; returns the folder."""
    from ddr_core.catalog import provision_source
    from ddr_core.provisioning import verify_provisioned

    if config.source is None:
        raise ValueError(f"labeller {name!r} has no `source:` to provision its weights from")
    folder = labeller_dir(layout, name)
    provision_source(config.source, folder, log=log)
    verify_provisioned(folder, what=f"labeller {name!r} folder")
    return folder


def clip_labeller(context: LabellerContext) -> ClipLabeller:
    """The CLIP labeller of a ``labellers`` entry: its weights provisioned, its vocabulary from the config."""
    folder = provision_labeller(context.layout, context.name, context.config)
    return ClipLabeller(folder, context.config.vocabulary, top_k=context.config.top_k)
