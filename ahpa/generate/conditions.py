"""What a sample is conditioned on: the one difference between class-conditional and text-to-image
sampling in the engine (:mod:`ahpa.generate.engine`).

A condition gives, for the sample indices of a batch, the model's condition input and the per-sample
arrays a part file keeps; it says what ``sampling.json`` records about it, what the assembled ``.npz``
holds besides the images, and whether the model has the null condition classifier-free guidance needs.

- :class:`ClassCondition`: sample i has label ``i % num_classes`` (docs/design.md section 10); the null
  condition is the extra class row of the label embedding; the ``.npz`` holds the labels as ``arr_1``,
  as guided-diffusion's class-conditional samples.
- :class:`PromptCondition`: sample i has prompt i, encoded by a CLIP text encoder (paper Appendix C);
  the null condition is the empty prompt's embedding the MMDiT holds; the ``.npz`` holds the prompts
  under :data:`~ahpa.evaluation.npz.PROMPTS_KEY` (a unicode array, readable without pickle), so PickScore
  needs no side file.  Prompts longer than 77 CLIP tokens are truncated, and a note counts them.

Prompt lists (:func:`read_prompts`, ``ahpa sample --prompts``):

- ``coco-val``: one prompt per val2014 image in image-id order, its first caption (REPA's protocol:
  40,504 samples, compared with the 256 px val2014 reference);
- ``coco-random``: ``--num`` captions drawn at random from all val2014 captions (U-ViT's protocol: 30K),
  seeded by ``--seed``;
- a text file: one prompt per line.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ahpa.data.coco import CocoCaptions
from ahpa.errors import AhpaError
from ahpa.evaluation.npz import PROMPTS_KEY
from ahpa.priors.text import CLIPTextEncoder

PROTOCOLS = ("coco-val", "coco-random")
COCO_RANDOM_DEFAULT = 30_000  # U-ViT's protocol (docs/baselines.md "Text-to-image")


class Condition(Protocol):
    """What the sampling engine asks of a condition (see the module docstring)."""

    # per-sample arrays of a part file -> their name in the assembled .npz
    gathered: dict[str, str]
    # whether the bf16 / torch.compile levers of ahpa.sampling_speed apply to its models
    speed_levers: bool

    @property
    def count(self) -> int | None:
        """How many samples it conditions (None: any number)."""

    def manifest(self) -> dict:
        """What ``sampling.json`` records of it (a rerun with another value is refused)."""

    def batch(self, indices: Sequence[int], device: torch.device) -> tuple[Tensor, dict[str, np.ndarray]]:
        """(the model's condition input for these sample indices, their per-sample part-file arrays)."""

    def archive(self) -> dict[str, np.ndarray]:
        """Arrays of the assembled ``.npz`` besides the images and the gathered per-sample arrays."""

    def check_guidance(self, model: nn.Module, cfg_scale: float, where: str | os.PathLike) -> None:
        """AhpaError when ``cfg_scale`` asks for guidance and ``model`` has no null condition."""

    def note(self) -> str | None:
        """A line for the user about the batches drawn so far (then forgotten), or None."""


class ClassCondition:
    """Sample i has class label ``i % num_classes``: the classes are balanced for any N."""

    gathered = {"labels": "arr_1"}
    speed_levers = True
    count = None

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise AhpaError(f"--num-classes must be at least 1 (got {num_classes})")
        self.num_classes = num_classes

    def manifest(self) -> dict:
        return {"num_classes": self.num_classes}

    def batch(self, indices: Sequence[int], device: torch.device) -> tuple[Tensor, dict[str, np.ndarray]]:
        labels = [i % self.num_classes for i in indices]
        return torch.tensor(labels, dtype=torch.long, device=device), {"labels": np.asarray(labels, dtype=np.int64)}

    def archive(self) -> dict[str, np.ndarray]:
        return {}

    def check_guidance(self, model: nn.Module, cfg_scale: float, where: str | os.PathLike) -> None:
        # The null class is the label embedding's extra row, present when trained with label dropout.
        if cfg_scale != 1.0 and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
            raise AhpaError(f"{where} was trained without a null class, so it cannot use guidance; use --cfg-scale 1")

    def note(self) -> str | None:
        return None


class PromptCondition:
    """Sample i has prompt i; its CLIP token embeddings, cut to the model's ``context_tokens``, condition it."""

    gathered: dict[str, str] = {}
    speed_levers = False  # not measured on an MMDiT yet (ahpa.sampling_speed wraps class-conditional models)

    def __init__(self, prompts: list[str], encoder: CLIPTextEncoder, context_tokens: int):
        self.prompts, self.encoder, self.context_tokens = list(prompts), encoder, context_tokens
        self.truncated = 0

    @property
    def count(self) -> int:
        return len(self.prompts)

    def manifest(self) -> dict:
        return {"text_encoder": self.encoder.source, "num": len(self.prompts),
                "prompts_sha256": hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()}

    def batch(self, indices: Sequence[int], device: torch.device) -> tuple[Tensor, dict[str, np.ndarray]]:
        context, report = self.encoder.encode([self.prompts[i] for i in indices])
        self.truncated += report.truncated
        return context[:, : self.context_tokens].to(device), {}

    def archive(self) -> dict[str, np.ndarray]:
        return {PROMPTS_KEY: np.asarray(self.prompts, dtype=np.str_)}

    def check_guidance(self, model: nn.Module, cfg_scale: float, where: str | os.PathLike) -> None:
        if cfg_scale != 1.0 and not hasattr(model, "null_condition"):
            raise AhpaError(f"{where} holds no null text condition, so it cannot use guidance; use --cfg-scale 1")

    def note(self) -> str | None:
        truncated, self.truncated = self.truncated, 0
        if not truncated:
            return None
        return f"note: {truncated} prompts of this run exceed 77 CLIP tokens and were truncated to 77"


def read_prompts(spec: str, coco: str | None, num: int | None, seed: int) -> list[str]:
    """The prompt list of a protocol or a file (validated before anything is written); ``num``: the first
    ``num`` prompts (``coco-random``: ``num`` random captions, default 30K), all when None."""
    if spec in PROTOCOLS:
        if not coco:
            raise AhpaError(f"--prompts {spec} needs --coco /path/to/coco (annotations/captions_val2014.json)")
        captions = CocoCaptions(coco, "val2014")
        if spec == "coco-val":
            prompts = captions.first_captions()
            return prompts[:num] if num else prompts
        return captions.random_captions(num or COCO_RANDOM_DEFAULT, seed=seed)
    path = Path(spec)
    if not path.is_file():
        raise AhpaError(f"--prompts {spec!r} is neither {' nor '.join(PROTOCOLS)} nor a text file (one prompt per line)")
    prompts = [line.rstrip("\n") for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise AhpaError(f"prompt file {path} holds no prompt (one per line)")
    return prompts[:num] if num else prompts
