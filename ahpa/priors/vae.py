"""Loading the frozen VAE (SPEC section 2) and fingerprinting its encoder.

``load_vae`` accepts three kinds of ``path`` and never touches the network:

- ``"tiny"``: the project's own tiny VAE in ``ahpa/assets/tiny_vae/`` (``ahpa train-vae``);
- a local diffusers directory (``config.json`` + ``diffusion_pytorch_model.safetensors``
  or ``.bin``), or a pipeline directory holding such a ``vae/`` folder;
- a Hugging Face repo id (``stabilityai/sd-vae-ft-ema``), looked up in the local
  Hugging Face cache only (``HF_HOME`` / ``HF_HUB_CACHE`` respected).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache

from ahpa.errors import AhpaError

TINY_VAE_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_vae"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def load_vae(
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load a frozen ``AutoencoderKL`` (eval mode, no gradients) from a local source."""
    path = str(path)
    if path == "tiny":
        directory = _diffusers_dir(
            TINY_VAE_DIR, "the bundled tiny VAE is missing; create it with `ahpa train-vae` or reinstall ahpa"
        )
    elif _REPO_ID.fullmatch(path) and not os.path.exists(path):
        directory = _hub_cache_dir(path)
    else:
        directory = _diffusers_dir(
            Path(path).expanduser(),
            "pass a diffusers AutoencoderKL directory, a Hugging Face repo id in the local cache, or 'tiny'",
        )
    try:
        vae = AutoencoderKL.from_pretrained(directory, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise AhpaError(f"cannot load an AutoencoderKL from {directory}: {e}") from e
    return vae.requires_grad_(False).eval().to(device=device)


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
    """Pixels per latent cell along one side: 2 ** (number of down blocks - 1), 8 for SD-VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_scaling_factor(vae: AutoencoderKL) -> float:
    """The latent scaling factor of the VAE config (0.18215 for SD-VAE)."""
    return float(vae.config.scaling_factor)


def encoder_hash(vae: AutoencoderKL) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of the encoder + quant_conv weights.

    Identifies the teacher in feature-cache manifests: any changed weight changes it.
    """
    digest = hashlib.sha256()
    parts = [("encoder", vae.encoder)] + ([("quant_conv", vae.quant_conv)] if vae.quant_conv is not None else [])
    tensors = {f"{prefix}.{k}": v for prefix, module in parts for k, v in module.state_dict().items()}
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
