"""bf16 against float32 sampling of one checkpoint: the same indices, both metrics, and their distance.

Draws the same samples (indices 0..N-1, the same per-index noise) from one checkpoint with
``ahpa sample``'s code path (``ahpa.generate.engine.generate_samples``) twice: float32, and
``--precision bf16`` (model forwards under bf16 autocast; the ODE/SDE state stays float64).  Then:

- the digits metric (``ahpa.evaluation.digits``: classifier-feature FID ``cfid`` to the training
  digits, per-class accuracy) of each set, for toy checkpoints;
- the distance between the two sets: cfid(bf16, float32), the mean and max absolute pixel
  difference (uint8), the share of samples the classifier labels differently;
- with ``--inception``, the Inception FID (pool3, the ADM evaluator's network; random weights
  when none are found offline, which the output says) between the two sets;
- the sampling time of each precision (CPU time of this process on the CPU; wall on CUDA).

    OMP_NUM_THREADS=1 python benchmarks/sampling_precision.py --ckpt RUN/checkpoints/0000600 --out /tmp/prec
    # defaults: the toy study's sampler (300 samples, ODE Euler 25 steps); --mode sde for SDE

Writes OUT/{float32,bf16}/samples_N.npz and prints one JSON object (also OUT/precision.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ahpa.evaluation.digits import classify, digits_metrics, load_classifier
from ahpa.evaluation.metrics import feature_statistics, frechet_distance
from ahpa.generate.engine import generate_samples, vae_decoder
from ahpa.io import write_json_atomic
from ahpa.priors.vae import load_vae
from ahpa.runs import load_backbone


def inception_fid(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    from ahpa.evaluation.inception import InceptionFeatures, load_inception, random_state_dict
    from ahpa.errors import AhpaError

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        net = load_inception(device=device, download=False)
    except AhpaError:
        net = InceptionFeatures(random_state_dict(0), "random init (no weights found)").to(device)
    feats = []
    for images in (a, b):
        pool = [net(torch.from_numpy(chunk).permute(0, 3, 1, 2).to(device))["pool"].double().cpu().numpy()
                for chunk in np.array_split(images, max(1, len(images) // 50))]
        feats.append(np.concatenate(pool))
    return float(frechet_distance(*feature_statistics(feats[0]), *feature_statistics(feats[1]))), net.source


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=300)
    p.add_argument("--batch", type=int, default=150)
    p.add_argument("--mode", choices=("ode", "sde"), default="ode")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ref", default="train", choices=("train", "heldout"), help="digits reference split")
    p.add_argument("--inception", action="store_true", help="also the Inception FID between the two sets")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    model, meta = load_backbone(args.ckpt)
    model = model.to(device).eval()
    meta = dict(meta, vae=meta.get("vae") or "stabilityai/sd-vae-ft-ema")
    vae = load_vae(meta["vae"], device=device)
    decode = vae_decoder(vae)
    kwargs = dict(mode=args.mode, method="euler", steps=args.steps, cfg_scale=1.0, path=meta.get("path", "linear"))
    out = Path(args.out)
    result = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads, CPU time)",
              "ckpt": str(args.ckpt), "num": args.num, "sampler": kwargs, "seed": args.seed, "metric": {}}
    images, labels = {}, None
    for precision in ("float32", "bf16"):
        start = clock()
        npz = generate_samples(model, meta, decode, out / precision, args.num, args.batch, kwargs, seed=args.seed,
                               precision=precision)
        result.setdefault("sampling_s", {})[precision] = clock() - start  # 0-ish when the npz already existed
        with np.load(npz) as data:
            images[precision], labels = data["arr_0"], data["arr_1"]
        result["metric"][precision] = {k: v for k, v in digits_metrics(images[precision], labels, ref=args.ref).items()
                                       if k != "class_accuracy"}
    classifier = load_classifier()
    (pred32, f32), (pred16, f16) = classify(classifier, images["float32"]), classify(classifier, images["bf16"])
    diff = np.abs(images["bf16"].astype(np.int16) - images["float32"].astype(np.int16))
    result["bf16_vs_float32"] = {
        "cfid": float(frechet_distance(*feature_statistics(f16), *feature_statistics(f32))),
        "cfid_difference_to_reference": result["metric"]["bf16"]["cfid"] - result["metric"]["float32"]["cfid"],
        "accuracy_difference": result["metric"]["bf16"]["accuracy"] - result["metric"]["float32"]["accuracy"],
        "mean_abs_pixel_diff": float(diff.mean()), "max_abs_pixel_diff": int(diff.max()),
        "identical_images": int((diff.reshape(len(diff), -1).max(1) == 0).sum()),
        "relabelled_share": float((pred32 != pred16).mean()),
    }
    if args.inception:
        fid, source = inception_fid(images["bf16"], images["float32"])
        result["bf16_vs_float32"].update(inception_fid=fid, inception_weights=source)
    write_json_atomic(out / "precision.json", result, sort_keys=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
