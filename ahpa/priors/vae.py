"""Loading the frozen VAE (docs/design.md section 2) and fingerprinting its encoder.

Any diffusers autoencoder whose ``encoder`` is diffusers' convolutional
``Encoder`` (conv_in, DownEncoderBlock2D stages, mid block) and whose
``encode()`` returns a ``latent_dist`` is a prior (App. B): ``AutoencoderKL``
(SD-VAE, SDXL-VAE, the 16-channel SD3/FLUX VAEs), ``ConsistencyDecoderVAE``
(OpenAI's consistency decoder, SD-VAE's encoder), or another class of that
structure named by ``_class_name`` in ``config.json``.  A VAE whose config
sets ``force_upcast`` (SDXL-VAE: its activations overflow float16) is loaded in
float32 when float16 is asked for, as diffusers' pipelines do, and encodes in
float32 under float16 autocast (:mod:`ahpa.priors.hierarchy`).

``load_vae`` accepts three kinds of ``path`` and never touches the network:

- ``"tiny"``: the project's own tiny VAE in ``ahpa/assets/tiny_vae/`` (``ahpa train-vae``);
- a local diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``
  or ``.bin``), or a pipeline directory holding such a ``vae/`` folder;
- a Hugging Face repo id (``stabilityai/sd-vae-ft-ema``), looked up in the local
  Hugging Face cache only (``HF_HOME`` / ``HF_HUB_CACHE`` respected).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from ahpa.errors import AhpaError
from ahpa.io import file_sha256

TINY_VAE_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_vae"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def load_vae(
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load a frozen diffusers VAE (eval mode, no gradients) from a local source (module docstring)."""
    directory = vae_directory(path)
    cls = vae_class(directory)
    if dtype == torch.float16 and _config(directory).get("force_upcast", True):
        dtype = torch.float32  # SDXL-VAE overflows in float16 (its config: force_upcast)
    try:
        vae = cls.from_pretrained(directory, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise AhpaError(f"cannot load a {cls.__name__} from {directory}: {e}") from e
    check_encoder(vae, str(directory))
    return vae.requires_grad_(False).eval().to(device=device)


def vae_directory(path: str | os.PathLike) -> Path:
    """The local folder ``load_vae(path)`` reads (AhpaError when it is not there)."""
    path = str(path)
    if path == "tiny":
        return _diffusers_dir(TINY_VAE_DIR, "the bundled tiny VAE is missing; create it with `ahpa train-vae` or reinstall ahpa")
    if _REPO_ID.fullmatch(path) and not os.path.exists(path):
        return _hub_cache_dir(path)
    return _diffusers_dir(Path(path).expanduser(), "pass a diffusers AutoencoderKL directory, a Hugging Face repo id in the local cache, or 'tiny'")


_WEIGHTS_SHA256: dict[tuple, str] = {}


def vae_weights_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of the VAE's weights file (``diffusion_pytorch_model.*``): its identity in a weights file's meta,
    whatever name reached it (a repo id, a local copy).  None when the VAE is not on this machine.
    Cached per file (size, mtime): SD-VAE's 335 MB take about a second once."""
    try:
        directory = vae_directory(path)
    except AhpaError:
        return None
    file = next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)
    if file is None:
        return None
    stat = file.resolve().stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _WEIGHTS_SHA256:
        _WEIGHTS_SHA256[key] = file_sha256(file)
    return _WEIGHTS_SHA256[key]


def _config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AhpaError(f"{directory / 'config.json'} is not readable JSON ({e}); re-download the VAE") from None


def vae_class(directory: Path) -> type:
    """The diffusers class named by ``config.json`` (``_class_name``; default ``AutoencoderKL``)."""
    import diffusers  # the whole package: the class is looked up by name (AutoencoderKL is imported above)

    name = _config(directory).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise AhpaError(f"{directory / 'config.json'} names class {name!r}, which diffusers does not provide; "
                        "pass a diffusers autoencoder such as AutoencoderKL or ConsistencyDecoderVAE")
    return cls


def check_encoder(vae: torch.nn.Module, where: str = "the VAE") -> None:
    """Refuse autoencoders without diffusers' convolutional ``Encoder`` (the layers the priors hook)."""
    if not isinstance(getattr(vae, "encoder", None), Encoder) or not hasattr(vae, "encode"):
        raise AhpaError(f"{where} ({type(vae).__name__}) has no diffusers convolutional Encoder (conv_in, down_blocks, "
                        "mid_block) and encode(); hierarchical priors need one (App. B), e.g. AutoencoderKL")


def _diffusers_dir(directory: Path, hint: str) -> Path:
    """The folder holding config.json + weights: ``directory`` itself or its ``vae/`` subfolder."""
    if not (directory / "config.json").is_file() and (directory / "vae" / "config.json").is_file():
        directory = directory / "vae"
    if not directory.is_dir():
        raise AhpaError(f"VAE directory {directory} not found; {hint}")
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise AhpaError(f"VAE directory {directory} lacks {' and '.join(missing)}; {hint}")
    return directory


def _hub_cache_dir(repo_id: str) -> Path:
    """The cached snapshot folder of ``repo_id`` (root or ``vae/`` subfolder), never downloading."""
    cache = hf_constants.HF_HUB_CACHE
    for config in ("config.json", "vae/config.json"):
        found = try_to_load_from_cache(repo_id, config, cache_dir=cache)
        if isinstance(found, str):
            snapshot = Path(found).parent.parent if config.startswith("vae/") else Path(found).parent
            return _diffusers_dir(snapshot, f"complete the download with `hf download {repo_id}`")
    raise AhpaError(
        f"VAE '{repo_id}' is not in the local Hugging Face cache {cache} (set HF_HOME to use another cache); "
        f"on a machine with internet run `hf download {repo_id}` (older huggingface_hub: "
        f"`huggingface-cli download {repo_id}`) and copy the cache here, or set vae.path to a local directory "
        f"with config.json and diffusion_pytorch_model.safetensors, or to 'tiny'"
    )


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along one side: 2 ** (number of encoder downsamplers), 8 for SD-VAE."""
    return 2 ** sum(1 for block in vae.encoder.down_blocks if block.downsamplers)


def vae_scaling_factor(vae: AutoencoderKL) -> float:
    """The latent scaling factor of the VAE config (0.18215 SD-VAE, 0.13025 SDXL, 1.5305 SD3, 0.3611 FLUX)."""
    return float(vae.config.scaling_factor)


def vae_shift_factor(vae: AutoencoderKL) -> float:
    """The latent shift of the VAE config (0 when absent; 0.0609 SD3, 0.1159 FLUX): z = (x - shift) * scale."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_in_channels(vae: AutoencoderKL) -> int:
    """Image channels the encoder takes (3)."""
    return int(vae.encoder.conv_in.in_channels)


def encoder_hash(vae: AutoencoderKL) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of the encoder + quant_conv weights.

    Identifies the teacher in feature-cache manifests: any changed weight changes it.
    """
    digest = hashlib.sha256()
    quant_conv = getattr(vae, "quant_conv", None)
    parts = [("encoder", vae.encoder)] + ([("quant_conv", quant_conv)] if quant_conv is not None else [])
    tensors = {f"{prefix}.{k}": v for prefix, module in parts for k, v in module.state_dict().items()}
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
