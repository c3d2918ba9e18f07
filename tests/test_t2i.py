"""Text-to-image (Appendix C): CLIP text path, caption drawing, MMDiT training on captioned digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ahpa.checkpointing import latest_checkpoint
from ahpa.config import load_config
from ahpa.data.coco import CocoCaptions, draw_caption_rows
from ahpa.errors import AhpaError
from ahpa.priors.text import CLIP_L14_TEXT, MAX_TOKENS, load_clip_text_encoder, offline_clip_tokenizer
from ahpa.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A local CLIP text model directory (random init, width 32) with CLIP's real tokenizer files."""
    from transformers import CLIPTextConfig, CLIPTextModel

    path = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    cfg = dict(CLIP_L14_TEXT, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
               num_attention_heads=2)
    CLIPTextModel(CLIPTextConfig(**cfg)).save_pretrained(path)
    offline_clip_tokenizer().save_pretrained(path)
    return path


def _reference_ids(prompts: list[str]) -> torch.Tensor:
    """OpenAI CLIP's own tokenizer (open_clip's SimpleTokenizer): [SOT] bpe [EOT], padded with EOT (U-ViT/HF)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    rows = []
    for p in prompts:
        ids = [49406] + tok.encode(p)[: MAX_TOKENS - 2] + [49407]
        rows.append(ids + [49407] * (MAX_TOKENS - len(ids)))
    return torch.tensor(rows)


def test_clip_text_path_equals_transformers_on_the_real_architecture():
    from ahpa.priors.text import random_clip_text_encoder

    enc = random_clip_text_encoder(seed=0)
    cfg = enc.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.max_position_embeddings) == (768, 12, 12, 3072, 49408, 77)
    prompts = ["a photo of a cat", "", "two dogs, playing in the snow!", "word " * 90]
    emb, report = enc.encode(prompts)
    assert emb.shape == (4, 77, 768)
    assert report.truncated == 1 and report.total == 4 and "truncated" in report.line()
    with torch.no_grad():  # transformers' CLIPTextModel on CLIP's own token ids
        ref = enc.model(input_ids=_reference_ids(prompts)).last_hidden_state
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(emb[0], emb[2])  # distinct prompts, distinct embeddings


def test_local_clip_loading_and_missing_weights(tiny_clip, tmp_path):
    enc = load_clip_text_encoder(str(tiny_clip))
    assert enc.encode(["a cat"])[0].shape == (1, 77, 32)
    (tmp_path / "config.json").write_text((tiny_clip / "config.json").read_text())
    with pytest.raises(AhpaError, match=r"lacks model.safetensors or pytorch_model.bin, vocab.json") as err:
        load_clip_text_encoder(str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(AhpaError, match="neither a local directory nor in the Hugging Face cache"):
        load_clip_text_encoder("nobody/no-such-clip")


def test_caption_draw_is_deterministic_per_step_and_rank_sliced():
    offsets = torch.tensor([0, 5, 9, 14, 20])  # 4 images with 5, 4, 5, 6 captions
    images = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    a = draw_caption_rows(images, offsets, seed=3, step=7, global_batch=8)
    b = draw_caption_rows(images, offsets, seed=3, step=7, global_batch=8)
    assert torch.equal(a, b)
    assert ((a >= offsets[images]) & (a < offsets[images + 1])).all()
    other = torch.stack([draw_caption_rows(images, offsets, seed=3, step=s, global_batch=8) for s in range(8, 30)])
    assert (other != a).any(dim=1).all()  # another step draws other captions
    halves = [draw_caption_rows(images[r * 4 : (r + 1) * 4], offsets, 3, 7, 8, rank=r, per_rank=4) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a)  # two ranks draw the one-process batch
    counts = torch.zeros(5)  # every caption of an image gets drawn, uniformly
    for s in range(400):
        counts += torch.bincount(draw_caption_rows(torch.zeros(8, dtype=torch.long), offsets, 0, s, 8), minlength=5)[:5]
    assert counts.min() > 0.8 * counts.mean()


@pytest.fixture
def small_toy(monkeypatch):
    """The captioned digits cut to 2 images per caption class (the VAE encoding dominates the cost)."""
    from ahpa.data import coco

    full = coco.load_captioned_toy

    def subset(split="train", resolution=32):
        images, classes, captions = full(split, resolution)
        keep = torch.cat([torch.nonzero(classes == k).flatten()[:2] for k in range(20)])
        return images[keep], classes[keep], captions

    monkeypatch.setattr(coco, "load_captioned_toy", subset)


def skip_grids(monkeypatch) -> None:
    """Skip the sample grids and router plots (tested elsewhere): they cost more than a tiny step."""
    import ahpa.router_plot as router_plot

    monkeypatch.setattr(Trainer, "save_sample_grid", lambda self, path: None)
    monkeypatch.setattr(router_plot, "plot_router", lambda objective, path: None)


@pytest.fixture
def no_grids(monkeypatch):
    skip_grids(monkeypatch)


def _t2i_cfg(out: Path, clip: Path, *extra: str):
    return load_config(ROOT / "configs" / "toy-t2i.yaml", [
        f"train.out={out}", "train.global_batch=8", "train.log_every=1", "train.ckpt_every=0", "train.grid_steps=1",
        "train.max_minutes=0", f"text.encoder={clip}", "text.context_tokens=8", "sample.steps=1", *extra])


def _objective_of(preset: str, depth: int = 2) -> list[str]:
    """The prior/teacher/align sections of a real COCO config as overrides (aligned block moved into MMDiT-T/2;
    the teacher is the small random-init DINOv2-S/14 of the real architecture, as configs/toy-repa.yaml)."""
    import yaml

    data = yaml.safe_load((ROOT / "configs" / preset).read_text())
    out = [f"{section}.{key}={json.dumps(value) if isinstance(value, list) else value}"
           for section in ("prior", "teacher", "align") for key, value in (data.get(section) or {}).items()]
    return out + [f"align.depths=[{depth}]", "teacher.model=dinov2_vits14", "teacher.weights=random"]


def _weights(run: Path) -> dict:
    ckpt = latest_checkpoint(run)
    out = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    if (ckpt / "objective.safetensors").exists():
        out |= {f"objective.{k}": v for k, v in load_file(ckpt / "objective.safetensors").items()}
    return out


# method -> (overrides on configs/toy-t2i.yaml (AHPA), target groups)
OBJECTIVES = {
    "vanilla": (["align.method=vanilla"], None),
    "ahpa": ([], ["G3", "G4"]),
    "uniform": (["align.router=uniform"], ["G3", "G4"]),
    "repa": (_objective_of("mmdit-coco-repa.yaml"), ["dinov2"]),
    "sra2": (_objective_of("mmdit-coco-sra2.yaml"), ["latent"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(OBJECTIVES))
def test_one_training_step_of_each_objective_on_mmdit(tmp_path, tiny_clip, small_toy, monkeypatch, capsys, method):
    extra, groups = OBJECTIVES[method]
    if method != "ahpa":  # one run draws its grids (checked below); the others skip them
        skip_grids(monkeypatch)
    trainer = Trainer(_t2i_cfg(tmp_path / method, tiny_clip, "train.steps=1", *extra), show_progress=False)
    assert (trainer.objective is None) == (groups is None)
    if groups is not None:
        assert trainer.objective.groups == groups and trainer.objective.depths == [2]
    before = {k: v.clone() for k, v in trainer.sit.state_dict().items()}
    metrics = trainer.run()
    rec = metrics["history"][-1]
    assert metrics["steps"] == 1 and np.isfinite(rec["loss"])
    assert (rec["loss_align"] != 0) == (method != "vanilla")
    assert ("RANDOMLY INITIALISED" in capsys.readouterr().out) == (method == "repa")
    assert trainer.sit.name == "MMDiT-T/2" and trainer.sit.context_tokens == 8 and trainer.sit.context_dim == 32
    after = trainer.sit.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert "final_layer.linear.weight" in moved  # adaLN-Zero: a first step moves the output layer ...
    # ... and, with alignment, the blocks up to the aligned one through the head (vanilla: not yet)
    assert any(k.startswith("joint_blocks.0.") for k in moved) == (method != "vanilla")
    assert not any(k.startswith("joint_blocks.2.") for k in moved)  # nothing reaches past block 2 in one step
    # the null condition is the empty prompt's embedding, stored with the model
    enc = load_clip_text_encoder(str(tiny_clip))
    torch.testing.assert_close(after["null_context"], enc.null_embedding()[:, :8], rtol=1e-6, atol=1e-6)
    meta = json.loads(__import__("safetensors").safe_open(str(latest_checkpoint(tmp_path / method) / "ema.safetensors"), "pt").metadata()["ahpa_meta"])
    assert meta["model"] == "MMDiT-T/2" and meta["context_tokens"] == 8
    if method == "ahpa":  # one grid row per caption, the captions beside the grid
        prompts = (tmp_path / method / "samples.txt").read_text().splitlines()
        assert len(prompts) == 10 and prompts[0] == "a thin zero" and (tmp_path / method / "samples_step0.png").is_file()


@pytest.mark.slow
def test_t2i_resume_is_exact(tmp_path, tiny_clip, small_toy, no_grids):
    """Captions are drawn from the step's generator: 2 steps == 1 + resume + 1, bit for bit."""
    Trainer(_t2i_cfg(tmp_path / "full", tiny_clip, "train.steps=2"), show_progress=False).run()
    Trainer(_t2i_cfg(tmp_path / "half", tiny_clip, "train.steps=1"), show_progress=False).run()
    resumed = Trainer(_t2i_cfg(tmp_path / "half", tiny_clip, "train.steps=2"), show_progress=False)
    assert resumed.step == 1
    resumed.run()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _fake_coco(root: Path, split: str = "val2014", n: int = 3, captions: bool = True) -> Path:
    from PIL import Image

    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        name = f"COCO_{split}_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(root / split / name)
        images.append({"id": 100 - i, "file_name": name})
        for j in range(i + 1 if captions else 0):
            anns.append({"image_id": 100 - i, "id": 10 * i + j, "caption": f"image {i} caption {j} "})
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_coco_captions_and_bad_folders(tmp_path):
    coco = CocoCaptions(_fake_coco(tmp_path / "ok"), "val2014")
    assert coco.image_ids == [98, 99, 100]  # sorted by id
    assert coco.captions == [["image 2 caption 0", "image 2 caption 1", "image 2 caption 2"],
                             ["image 1 caption 0", "image 1 caption 1"], ["image 0 caption 0"]]
    assert coco.first_captions() == ["image 2 caption 0", "image 1 caption 0", "image 0 caption 0"]
    assert coco.offsets.tolist() == [0, 3, 5, 6]
    assert sorted(coco.random_captions(6, seed=1)) == sorted(coco.flat)
    with pytest.raises(AhpaError, match=r"has no annotations/captions_train2014.json"):
        CocoCaptions(tmp_path / "ok", "train2014")
    with pytest.raises(AhpaError, match="image id 98 has no caption"):
        CocoCaptions(_fake_coco(tmp_path / "nocap", captions=False), "val2014")


def test_coco_preprocessing_is_uvit_centre_crop_lanczos():
    from PIL import Image

    from ahpa.data.coco import center_crop_lanczos

    arr = np.random.default_rng(1).integers(0, 255, (30, 44, 3), dtype=np.uint8)
    ours = center_crop_lanczos(Image.fromarray(arr), 16)
    ref = np.asarray(Image.fromarray(arr[:, 7:37]).resize((16, 16), Image.LANCZOS))  # crop 30x30 at (0, 7)
    assert ours.shape == (16, 16, 3) and np.array_equal(ours, ref)
