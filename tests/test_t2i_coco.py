"""MS-COCO for text-to-image (Appendix C): `ahpa extract --coco`, training from its cache and from raw COCO, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ahpa.cli import main
from ahpa.build import build_source
from ahpa.data.coco import draw_caption_rows
from ahpa.priors.text import load_clip_text_encoder
from ahpa.train import Trainer
from test_t2i import _fake_coco, _t2i_cfg, no_grids, tiny_clip  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
LONG = "word " * 90  # 92 CLIP tokens: truncated to 77, counted, reported


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """4 train2014 images (ids 100..97) with 1..4 captions; image 0 has one caption longer than 77 tokens."""
    root = _fake_coco(tmp_path_factory.mktemp("coco"), "train2014", n=4)
    file = root / "annotations" / "captions_train2014.json"
    data = json.loads(file.read_text())
    data["annotations"].append({"image_id": 100, "id": 999, "caption": LONG})
    file.write_text(json.dumps(data))
    return root


def _extract(coco: Path, out: Path, clip: Path, *extra: str) -> int:
    return main(["extract", str(coco), "--coco", "--coco-split", "train2014", "--out", str(out), "--config",
                 str(ROOT / "configs" / "toy-t2i.yaml"), "--resolution", "32", "--text-encoder", str(clip),
                 "--shard-size", "2", "--batch", "2", "--workers", "0", *extra])


@pytest.fixture(scope="module")
def cache(coco, tiny_clip, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco-cache") / "cache"
    assert _extract(coco, out, tiny_clip) == 0
    return out


def _files(root: Path) -> dict[str, str]:
    from ahpa.io import file_sha256

    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*.safetensors"))}


def test_extract_coco_caches_latents_features_and_every_caption(coco, cache, tiny_clip, capsys):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["count"] == 4 and len(manifest["shards"]) == 2 and set(manifest["features"]) == {"G3", "G4"}
    assert manifest["images"]["y"] == "image_index" and manifest["labels"]["counts"] == [4]
    text = json.loads((cache / "text" / "text.json").read_text())
    # the caption table in image-id order (ids 97, 98, 99, 100: 4, 3, 2, 1 + the long one), offsets per image
    assert text["offsets"] == [0, 4, 7, 9, 11] and text["captions"][0] == "image 3 caption 0"
    assert text["captions"][-1] == LONG.strip() and text["truncated"] == 1 and text["count"] == 11
    from safetensors.torch import load_file

    stored = torch.cat([load_file(cache / "text" / s["file"])["context"] for s in text["shards"]]).float()
    enc = load_clip_text_encoder(str(tiny_clip))
    direct, report = enc.encode(text["captions"])
    assert report.truncated == 1
    torch.testing.assert_close(stored, direct, rtol=1e-2, atol=2e-3)  # float16 storage
    torch.testing.assert_close(load_file(cache / "text" / "null.safetensors")["context"], enc.null_embedding())
    # the cached images are the U-ViT preprocessing of the files in id order (y = the image's index)
    cached = {int(i): int(y) for s in manifest["shards"] for i, y in
              zip(load_file(cache / s["file"])["index"], load_file(cache / s["file"])["labels"])}
    assert cached == {0: 0, 1: 1, 2: 2, 3: 3}

    # killed after one image shard and before the text manifest: the rerun finishes exactly that, same bytes
    before = _files(cache)
    for f in ("manifest.json", "progress/000001.json", "shards/000001.safetensors", "text/text.json",
              "text/progress/000000.json", "text/shards/000000.safetensors", "text/null.safetensors"):
        (cache / f).unlink()
    capsys.readouterr()
    assert _extract(coco, cache, tiny_clip) == 0
    assert "1 to do" in capsys.readouterr().out and _files(cache) == before

    # --verify checks the feature cache and its text cache
    assert main(["extract", "--verify", str(cache)]) == 0
    assert "ok: 11 caption embeddings" in capsys.readouterr().out
    shard = cache / "text" / "shards" / "000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        assert main(["extract", "--verify", str(cache)]) == 2
        said = capsys.readouterr()
        assert "text/shards/000000.safetensors: sha256 mismatch" in said.out
        assert "failed verification" in said.err and len(said.err.strip().splitlines()) == 1
    finally:
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))


def test_text_cache_resumes_after_a_kill_with_the_same_bytes(coco, tiny_clip, tmp_path):
    from ahpa.data.captions import extract_text_cache, read_text_manifest, verify_text_cache
    from ahpa.data.coco import CocoCaptions

    captions = CocoCaptions(coco, "train2014")
    enc = load_clip_text_encoder(str(tiny_clip))
    whole = extract_text_cache(captions.flat, captions.offsets, enc, tmp_path / "whole", shard_size=3, progress=False)
    assert len(whole["shards"]) == 4
    assert extract_text_cache(captions.flat, captions.offsets, enc, tmp_path / "killed", shard_size=3, progress=False,
                              stop_after=2) is None
    assert not (tmp_path / "killed" / "text.json").exists()  # not a text cache yet
    again = extract_text_cache(captions.flat, captions.offsets, enc, tmp_path / "killed", shard_size=3, progress=False)
    assert again == whole == read_text_manifest(tmp_path / "killed") and verify_text_cache(tmp_path / "killed") == []
    assert _files(tmp_path / "killed") == _files(tmp_path / "whole")


def _batch_check(trainer: Trainer, enc, exact: bool) -> None:
    """Step 0's batch: one caption of each batch image, drawn from the step's generator, embedded as CLIP does."""
    src = trainer.source
    src.inner.start(0)
    images = src.inner.next_batch()["y"]  # the batch's image indices
    src.start(0)
    batch = src.next_batch()
    rows = draw_caption_rows(images, src.offsets, trainer.cfg.train.seed, 0, trainer.cfg.train.global_batch)
    assert torch.equal(batch["caption_rows"], rows)
    assert ((rows >= src.offsets[images]) & (rows < src.offsets[images + 1])).all()
    direct = enc.encode([src.captions[r] for r in rows.tolist()])[0][:, :8]
    torch.testing.assert_close(batch["y"], direct, **({"rtol": 0, "atol": 0} if exact else {"rtol": 1e-2, "atol": 2e-3}))


@pytest.mark.parametrize("source", ["cache", "coco"])
def test_training_from_the_coco_cache_and_from_raw_coco(coco, cache, tiny_clip, no_grids, tmp_path, source):
    data = ([f"data.path={cache}", f"text.cache={cache / 'text'}"] if source == "cache"
            else [f"data.path={coco}", "text.split=train2014"])
    cfg = _t2i_cfg(tmp_path / "run", tiny_clip, f"data.source={source}", *data, "train.global_batch=4", "train.steps=1",
                   "data.num_workers=0")
    trainer = Trainer(cfg, show_progress=False)
    assert trainer.objective.groups == ["G3", "G4"] and trainer.source.context_shape == (8, 32)
    metrics = trainer.run()
    assert metrics["steps"] == 1 and np.isfinite(metrics["history"][-1]["loss"]) and metrics["history"][-1]["loss_align"] != 0
    _batch_check(trainer, load_clip_text_encoder(str(tiny_clip)), exact=source == "coco")


def _bad_coco(root: Path, kind: str) -> Path:
    root = _fake_coco(root, "train2014", n=2)
    file = root / "annotations" / "captions_train2014.json"
    if kind == "no captions":
        file.unlink()
    else:  # image id 99 loses its caption
        data = json.loads(file.read_text())
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 99]
        file.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("command, case, message", [
    ("extract", "no captions", "has no annotations/captions_train2014.json"),
    ("extract", "orphan image", "image id 99 has no caption"),
    ("extract", "no clip", "is neither a local directory nor in the Hugging Face cache"),
    ("train", "no captions", "has no annotations/captions_train2014.json"),
    ("train", "no clip", "is neither a local directory nor in the Hugging Face cache"),
    ("train", "other text cache", "was made for another image list than the feature cache"),
])
def test_bad_coco_input_is_one_line_and_writes_nothing(coco, cache, tiny_clip, tmp_path, capsys, command, case, message):
    root = coco if case in ("no clip", "other text cache") else _bad_coco(tmp_path / "coco", case)
    clip = tmp_path / "no-such-clip" if case == "no clip" else tiny_clip
    out = tmp_path / "out"
    if command == "extract":
        rc = _extract(root, out, clip)
    else:
        if case == "other text cache":  # the text cache of another COCO image list beside this feature cache
            other = tmp_path / "other"
            from ahpa.data.captions import extract_text_cache
            from ahpa.data.coco import CocoCaptions

            caps = CocoCaptions(coco, "train2014")
            extract_text_cache(caps.flat, caps.offsets, load_clip_text_encoder(str(tiny_clip)), other, progress=False,
                               describe={"split": "train2014", "file_list_sha256": "0" * 64})
            data = ["data.source=cache", f"data.path={cache}", f"text.cache={other}"]
        else:
            data = ["data.source=coco", f"data.path={root}"]
        rc = main(["train", "--config", str(ROOT / "configs" / "toy-t2i.yaml"), "--out", str(out), f"text.encoder={clip}",
                   "text.context_tokens=8", "train.global_batch=2", "data.num_workers=0", *data])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
