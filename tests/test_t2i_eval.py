"""Text-to-image sampling and metrics (Table 5): prompts in the sample file, PickScore, COCO FID reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ahpa.cli import main
from ahpa.errors import AhpaError
from ahpa.evaluation.t2i import PickScorer, coco_reference_statistics, load_pickscore, pickscore_of_file, sample_prompts
from test_t2i import _fake_coco, _t2i_cfg, no_grids, small_toy, tiny_clip  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    """A random-init CLIPModel (CLIP-H's layout at tiny widths) and a CLIP processor, saved as local dirs."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ahpa.priors.text import offline_clip_tokenizer

    root = tmp_path_factory.mktemp("pickscore")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16, logit_scale_init_value=3.0)
    model = CLIPModel(cfg)
    model.save_pretrained(root / "model")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=offline_clip_tokenizer())
    proc.save_pretrained(root / "processor")
    return root


def test_pickscore_equals_the_formula_by_hand(tiny_pickscore):
    scorer = load_pickscore(str(tiny_pickscore / "model"), str(tiny_pickscore / "processor"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red bus", "two cats on a sofa", "a plate of food"]
    ours = scorer.scores(images, prompts)
    m, proc = scorer.model, scorer.processor
    pix = proc(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    ids = proc(text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output).double().numpy()
        txt = m.text_projection(m.text_model(**ids).pooler_output).double().numpy()
        logits = m(pixel_values=pix, **ids).logits_per_image  # transformers' own image-text logits
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    hand = np.exp(3.0) * cos  # exp(logit_scale) * cos(text, image), logit_scale = 3.0
    np.testing.assert_allclose(ours.double().numpy(), hand, rtol=1e-5)
    np.testing.assert_allclose(ours.numpy(), logits.diag().numpy(), rtol=1e-5)
    assert not np.allclose(hand, hand[0])


def test_coco_reference_statistics_equal_direct(tmp_path):
    from ahpa.evaluation.inception import InceptionFeatures, random_state_dict

    coco = _fake_coco(tmp_path / "coco", "val2014", n=4)
    extractor = InceptionFeatures(random_state_dict(seed=0), source="random init (test)")
    mu, sigma, entry = coco_reference_statistics(coco, extractor, resolution=16, cache_dir=tmp_path / "cache", progress=False)
    # direct: images in id order (ids 100, 99, 98, 97 -> files 3, 2, 1, 0), U-ViT crop + LANCZOS, pool3, np.cov
    crops = []
    for i in (3, 2, 1, 0):
        arr = np.asarray(Image.open(coco / "val2014" / f"COCO_val2014_{i:012d}.jpg").convert("RGB"))
        s = min(arr.shape[:2])
        t, l = (arr.shape[0] - s) // 2, (arr.shape[1] - s) // 2
        crops.append(np.asarray(Image.fromarray(arr[t : t + s, l : l + s]).resize((16, 16), Image.LANCZOS)))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
    feats = extractor(x)["pool"].double().numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-8)
    again = coco_reference_statistics(coco, extractor, resolution=16, cache_dir=tmp_path / "cache", progress=False)
    assert again[2] == entry and (entry / "stats.npz").is_file()  # built once, then read from the cache


@pytest.mark.slow
def test_t2i_sample_carries_prompts_and_pickscore_reads_them(tmp_path, tiny_clip, small_toy, no_grids, tiny_pickscore, capsys):
    from ahpa.train import Trainer

    Trainer(_t2i_cfg(tmp_path / "run", tiny_clip, "train.steps=0"), show_progress=False).run()
    ckpt = tmp_path / "run" / "checkpoints" / "0000000"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bold seven\nthe digit 3 written in thin strokes\n" + "word " * 90 + "\n")
    args = ["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--prompts", str(prompts), "--steps", "2",
            "--cfg-scale", "2.0", "--batch", "2", "--text-encoder", str(tiny_clip)]
    assert main(args) == 0
    assert "1 prompts of this run exceed 77 CLIP tokens" in capsys.readouterr().out
    npz = tmp_path / "s" / "samples_3.npz"
    with np.load(npz, allow_pickle=False) as data:
        assert data["arr_0"].shape == (3, 32, 32, 3) and data["arr_0"].dtype == np.uint8
        assert list(data["prompts"]) == prompts.read_text().splitlines()
    assert sample_prompts(npz)[0] == "a bold seven"
    scorer = load_pickscore(str(tiny_pickscore / "model"), str(tiny_pickscore / "processor"))
    result = pickscore_of_file(npz, scorer, batch_size=2, progress=False)
    with np.load(npz) as data:
        direct = scorer.scores(data["arr_0"], list(data["prompts"])).double().mean().item()
    assert result["pickscore_pairs"] == 3 and result["pickscore"] == pytest.approx(direct, rel=1e-6)
    # the CLI path writes SAMPLES.t2i.json
    assert main(["evaluate", str(npz), "--pickscore", str(tiny_pickscore / "model"),
                 "--pickscore-processor", str(tiny_pickscore / "processor")]) == 0
    assert json.loads(npz.with_suffix(".t2i.json").read_text())["pickscore"] == pytest.approx(direct, rel=1e-6)


def test_t2i_bad_input_one_line_nothing_written(tmp_path, tiny_pickscore, capsys):
    no_prompts = tmp_path / "plain.npz"
    np.savez(no_prompts, arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    cases = [
        (["evaluate", str(no_prompts), "--pickscore", str(tiny_pickscore / "model")], "holds no 'prompts' array"),
        (["evaluate", str(no_prompts), "--coco-ref", str(tmp_path / "nococo")], "has no annotations/captions_val2014.json"),
    ]
    with_prompts = tmp_path / "p.npz"
    np.savez(with_prompts, arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8), prompts=np.asarray(["a", "b"]))
    cases.append((["evaluate", str(with_prompts), "--pickscore", str(tmp_path / "no-weights")], "neither a local directory"))
    for argv, message in cases:
        before = sorted(tmp_path.rglob("*"))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert sorted(tmp_path.rglob("*")) == before  # nothing written
    with pytest.raises(AhpaError, match="needs --coco"):
        from ahpa.generate.conditions import read_prompts

        read_prompts("coco-val", None, None, 0)
