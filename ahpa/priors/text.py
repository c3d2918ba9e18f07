"""Text encoder of the text-to-image setting (paper Appendix C): CLIP ViT-L/14's text tower.

U-ViT's and REPA's protocol (docs/baselines.md "Text-to-image"):
``openai/clip-vit-large-patch14``, prompts tokenised to 77 tokens with padding to
the maximum length, the condition is ``last_hidden_state`` ``[77, 768]``; the
empty prompt's embedding is the null condition.  Prompts longer than 77 tokens
are truncated (as CLIP must); :meth:`CLIPTextEncoder.encode` counts them.

Weights come from a local directory or the Hugging Face cache, never a download
(``local_files_only``).  For the offline demo and the tests,
:func:`random_clip_text_encoder` builds a randomly initialised text model of the
real ViT-L/14 architecture with CLIP's real BPE tokenizer, whose vocabulary is
read from the ``bpe_simple_vocab_16e6.txt.gz`` that the ``open_clip_torch``
package ships (MIT; a dependency, not copied here).  Its embeddings are distinct
and deterministic but carry no language knowledge.
"""

from __future__ import annotations

import gzip
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from torch import Tensor, nn

from ahpa.errors import AhpaError

CLIP_L14 = "openai/clip-vit-large-patch14"
MAX_TOKENS = 77
RANDOM = "random"  # text.encoder value for the random-init encoder of the real architecture
# CLIP ViT-L/14's text tower (its config.json "text_config"); transformers' defaults are ViT-B/32's.
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=49407)
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER = (("vocab.json", "merges.txt"), ("tokenizer.json",))


@dataclass
class TruncationReport:
    """Prompts longer than 77 CLIP tokens (they are cut to 77)."""

    total: int = 0
    truncated: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, other: "TruncationReport") -> None:
        self.total += other.total
        self.truncated += other.truncated
        self.examples = (self.examples + other.examples)[:3]

    def line(self) -> str | None:
        if not self.truncated:
            return None
        return (f"{self.truncated} of {self.total} prompts exceed {MAX_TOKENS} CLIP tokens and were truncated "
                f"to {MAX_TOKENS} (first: {self.examples[0][:80]!r})")


class CLIPTextEncoder(nn.Module):
    """Prompts -> CLIP token embeddings ``[B, 77, 768]`` (``last_hidden_state``), frozen."""

    def __init__(self, model: nn.Module, tokenizer, source: str):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, TruncationReport]:
        """``input_ids [B, 77]`` (padded to 77, truncated) and which prompts were longer."""
        # verbose=False: the count below replaces transformers' "sequence length is longer" warning
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
        report = TruncationReport(total=len(prompts))
        for prompt, n in zip(prompts, lengths):
            if n > MAX_TOKENS:
                report.truncated += 1
                if len(report.examples) < 3:
                    report.examples.append(prompt)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt")["input_ids"]
        return ids, report

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> tuple[Tensor, TruncationReport]:
        """Embeddings ``[len(prompts), 77, width]`` (float32, on the encoder's device) and the truncation report."""
        outs, report = [], TruncationReport()
        for i in range(0, len(prompts), batch_size):
            ids, part = self.tokenize(prompts[i : i + batch_size])
            report.add(part)
            # No attention mask: U-ViT/REPA feed the padded ids alone (CLIP's causal mask covers the rest).
            outs.append(self.model(input_ids=ids.to(self.device)).last_hidden_state.float())
        return (torch.cat(outs) if outs else torch.zeros(0, MAX_TOKENS, self.width)), report

    def forward(self, prompts: list[str]) -> Tensor:
        return self.encode(prompts)[0]

    def null_embedding(self) -> Tensor:
        """The empty prompt's embedding ``[1, 77, width]``: the null condition (CFG, dropout)."""
        return self.encode([""])[0]

    def describe(self) -> dict:
        """What identifies the encoder's output (cached text embeddings are keyed on it)."""
        return {"source": self.source, "width": self.width, "tokens": MAX_TOKENS}


def _hub_snapshot(repo_id: str, probe: str = "config.json") -> Path | None:
    found = try_to_load_from_cache(repo_id, probe, cache_dir=constants.HF_HUB_CACHE)
    return Path(found).parent if isinstance(found, str) else None


def resolve_local_model(path: str, what: str, need_tokenizer: bool = True, processor: bool = False) -> Path:
    """A local directory (or cached HF snapshot) holding config, weights and tokenizer files, else one clear error.

    ``processor``: a processor directory (preprocessor_config.json + tokenizer) instead of a model.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        probe = "preprocessor_config.json" if processor else "config.json"
        snapshot = _hub_snapshot(path, probe) if "/" in path and not path.startswith((".", "/")) else None
        if snapshot is None:
            raise AhpaError(f"{what} '{path}' is neither a local directory nor in the Hugging Face cache; on a machine with "
                            f"internet run `hf download {path}` and copy the cache here (HF_HOME), or pass a local directory "
                            f"with config.json, {' or '.join(_WEIGHTS)} and the tokenizer files")
        directory = snapshot
    if processor:  # a processor needs its image settings and the tokenizer, no weights
        found = any((directory / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
        missing = [] if found else ["preprocessor_config.json"]
    else:
        missing = [] if (directory / "config.json").is_file() else ["config.json"]
        if not any((directory / w).is_file() for w in _WEIGHTS):
            missing.append(" or ".join(_WEIGHTS))
    if need_tokenizer and not any(all((directory / f).is_file() for f in files) for files in _TOKENIZER):
        missing.append("vocab.json + merges.txt (or tokenizer.json)")
    if missing:
        raise AhpaError(f"{what} directory {directory} lacks {', '.join(missing)}; download the complete repository")
    return directory


def load_clip_text_encoder(path: str = CLIP_L14, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> CLIPTextEncoder:
    """CLIP's text tower from a local directory, a cached HF repo id, or ``"random"`` (demo/tests)."""
    if path == RANDOM:
        return random_clip_text_encoder().to(device)
    from transformers import CLIPTextModel, CLIPTokenizer  # transformers: slow to import, only text-to-image needs it

    directory = resolve_local_model(path, "CLIP text encoder")
    try:
        with quiet_transformers():
            tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
            model = CLIPTextModel.from_pretrained(directory, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise AhpaError(f"cannot load a CLIP text model from {directory}: {err}") from None
    return CLIPTextEncoder(model.to(device), tokenizer, source=str(path))


@contextmanager
def quiet_transformers():
    """No "Loading weights" progress bar from transformers' from_pretrained (it would garble one-line errors)."""
    from transformers.utils import logging  # transformers: slow to import, only text-to-image needs it

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _open_clip_bpe() -> Path:
    spec = importlib.util.find_spec("open_clip")  # located, not imported (open_clip imports much)
    if spec is None or not spec.submodule_search_locations:
        raise AhpaError("the offline CLIP tokenizer needs the vocabulary shipped by open_clip_torch; pip install open_clip_torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise AhpaError(f"{path} is missing from the open_clip_torch installation; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the base of the BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges from the BPE file, in OpenAI's order (49408 tokens)."""
    with gzip.open(_open_clip_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def offline_clip_tokenizer():
    """``transformers.CLIPTokenizer`` with CLIP's real vocabulary, built without any download."""
    from transformers import CLIPTokenizer  # transformers: slow to import, only text-to-image needs it

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS)


def random_clip_text_encoder(seed: int = 0) -> CLIPTextEncoder:
    """A randomly initialised CLIP ViT-L/14 text model (seeded, deterministic) with CLIP's tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel  # transformers: slow to import, only text-to-image needs it

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
    finally:
        torch.random.set_rng_state(state)
    return CLIPTextEncoder(model, offline_clip_tokenizer(), source=f"{RANDOM}(seed={seed})")
