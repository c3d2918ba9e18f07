"""`ahpa profile` (paper Table 6 / Table I.21): counts against published numbers and hand formulas.

Every count runs on the meta device (shapes only), so SiT-XL/2 costs no memory here.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from ahpa import cli
from ahpa.align.heads import build_head
from ahpa.config import PRESETS
from ahpa.diagnostics import profile as P
from ahpa.diagnostics import profile_command as PC
from ahpa.diagnostics import profile_speed as PS
from ahpa.errors import AhpaError

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = str(PRESETS / "toy.yaml")
B2_VANILLA = str(PRESETS / "sit-b2-vanilla.yaml")  # SD-VAE latents; --model overrides the backbone


def _sit_macs(D: int, depth: int, N: int, p: int = 2, C: int = 4, freq: int = 256) -> tuple[int, int]:
    """DiT-convention forward MACs of a SiT per image, written out: (linear + conv, attention matmuls)."""
    block = 3 * D * D * N + D * D * N + 2 * (4 * D * D * N)  # qkv, attention proj, MLP fc1 + fc2 (ratio 4)
    block += D * 6 * D  # adaLN-Zero modulation (once per image, not per token)
    embed = p * p * C * D * N + freq * D + D * D  # patch embed conv, timestep MLP (2 layers)
    final = D * 2 * D + D * p * p * C * N  # final adaLN, final linear
    attention = depth * 2 * N * N * D  # Q K^T and A V, summed over heads
    return depth * block + embed + final, attention


def test_sit_xl2_dit_convention_matches_paper():
    # Table 6 / I.21: SiT-XL/2 114.46 GFLOPs (DiT's MAC count without the attention matmuls);
    # DiT's paper gives 118.6 with them.  0.5% is far below the 3.6% the attention matmuls make.
    info = P.count_costs(P.load_method("vanilla", "SiT-XL/2", 256, []), 256, backward=False)
    assert info["gflops_dit"] == pytest.approx(114.46, rel=5e-3)
    assert info["gflops_dit_with_attention"] == pytest.approx(118.62, rel=5e-3)
    assert info["backbone_params"] == 675_111_184  # SiT-XL/2 without learn_sigma
    linear, attention = _sit_macs(1152, 28, 256)
    assert info["macs"]["backbone"] == linear and info["macs"]["attention_matmuls"] == attention


def test_sit_b2_counts_match_hand_formula_and_flopcounter():
    info = P.count_costs(P.load_method("vanilla", "SiT-B/2", 256, []), 256)
    linear, attention = _sit_macs(768, 12, 256)
    assert info["macs"] == {"backbone": linear, "objective": 0, "teacher": 0, "attention_matmuls": attention}
    assert info["gflops_dit"] == pytest.approx(linear / 1e9)
    # FlopCounterMode (an independent count, 2 FLOPs per MAC) sees exactly the same forward.
    assert info["flopcounter_forward_gflops"] * 1e9 == pytest.approx(2 * (linear + attention), rel=1e-12)


def test_fwd_bwd_is_three_forwards():
    """Backward = 2x forward (input and weight gradients), so fwd+bwd ~ 3 x the forward's 2 x MACs.

    Tolerance 1%: layers whose input needs no gradient (the patch-embedding conv on x_t,
    the first timestep-MLP layer on the frequency features) skip their input gradient, which
    on SiT-T/2 at 4x4 tokens is 0.07% of the total; the exact identity is checked too."""
    method = P.load_method(TOY, "SiT-T/2", 32, ["align.method=vanilla"])
    info = P.count_costs(method, 32)
    fwd, total = info["flopcounter_forward_gflops"] * 1e9, info["flopcounter_fwd_bwd_gflops"] * 1e9
    macs = info["macs"]["backbone"] + info["macs"]["attention_matmuls"]
    assert fwd == pytest.approx(2 * macs, rel=1e-12)
    assert total == pytest.approx(3 * 2 * macs, rel=1e-2)
    D, N = 192, 16  # SiT-T/2 on the toy's 8x8 latent
    no_input_grad = 2 * 2 * 4 * D * N + 256 * D  # patch embed conv (p=2, C=4), timestep MLP layer 1
    assert total == pytest.approx(3 * fwd - 2 * no_input_grad, rel=1e-12)


def test_ahpa_head_and_router_counts():
    # Sec. 4.4: one 3x3 conv D -> C_out (G3 + G4 = 1024 channels) on the 16x16 grid: 9 D C_out N MACs.
    D, C_out, N = 768, 1024, 256
    info = P.count_costs(P.load_method("ahpa", "SiT-B/2", 256, []), 256, backward=False)
    router_macs = 1 * 128 + 128 * 256 + 2 * 256 * 256 + 256 * 10  # linear t-encoding, 4-layer MLP -> 4+4+2 logits
    router_params = (128 + 128) + (128 * 256 + 256) + 2 * (256 * 256 + 256) + (256 * 10 + 10)
    assert info["macs"]["objective"] == 9 * D * C_out * N + router_macs
    assert info["extra_trainable_params"] == 9 * D * C_out + C_out + router_params
    # The router's target mix (einsum over the 4 layers of each group) is a bmm FlopCounterMode sees.
    linear, attention = _sit_macs(D, 12, N)
    mix = 2 * 4 * 512 * N
    assert info["flopcounter_forward_gflops"] * 1e9 == 2 * (linear + attention + info["macs"]["objective"] + mix)


def test_repa_projector_count():
    # REPA's projector (Linear D->2048, 2048->2048, 2048->768) on 256 tokens: 2.08 G for XL (docs/baselines.md).
    with torch.device("meta"):
        head = build_head("mlp3", 1152, 768)
        x = torch.empty(1, 1152, 16, 16)
    with P.MacCounter(head=head) as counter:
        head(x)
    assert counter.macs["head"] == 256 * (1152 * 2048 + 2048 * 2048 + 2048 * 768)
    assert counter.macs["head"] / 1e9 == pytest.approx(2.08, abs=5e-3)


def test_teacher_forward_is_counted_without_backward():
    """DINOv2-B/14 at 224 px (timm architecture, random weights): 21.94 G MACs with its patch embed."""
    # A small backbone on the 16x16 grid of 256 px (the teacher sees 14 x 16 = 224 px).
    base = P.load_method(B2_VANILLA, "SiT-T/2", 256, [])
    with_teacher = P.load_method(B2_VANILLA, "SiT-T/2", 256, [])
    with_teacher.teacher = "dinov2_vitb14"
    a, b = P.count_costs(base, 256), P.count_costs(with_teacher, 256)
    D, T = 768, 257  # 16x16 patches + CLS
    linear = 12 * (12 * D * D * T) + 14 * 14 * 3 * D * 256
    attention = 12 * 2 * T * T * D
    assert b["macs"]["teacher"] == linear
    assert linear / 1e9 == pytest.approx(21.94, abs=5e-3)
    assert b["gflops_dit"] * 1e9 == pytest.approx(a["gflops_dit"] * 1e9 + linear, rel=1e-12)
    assert b["macs"]["attention_matmuls"] == a["macs"]["attention_matmuls"] + attention
    # The teacher is frozen and runs under no_grad: it adds its forward, and no backward.
    added = (b["flopcounter_fwd_bwd_gflops"] - a["flopcounter_fwd_bwd_gflops"]) * 1e9
    assert added == pytest.approx(2 * (linear + attention), rel=1e-9)
    assert b["teacher_params"] > 80e6 and b["extra_trainable_params"] == 0
    assert "randomly initialised" in b["teacher_model"] and a["teacher_model"] is None


@pytest.mark.parametrize("sequential", [False, True])
def test_measure_speed_alternates_and_takes_median(monkeypatch, sequential):
    methods = [P.load_method(TOY, "SiT-T/2", 32, [f"align.method={m}"]) for m in ("vanilla", "ahpa")]
    methods[0].label, methods[1].label = "A", "B"
    calls = []
    fake = iter([0.4, 0.3, 0.5, 0.1, 0.2, 0.15] if sequential else [0.4, 0.1, 0.3, 0.2, 0.5, 0.15])

    def timed(self, iters):
        calls.append(self.method.label)
        return next(fake)

    monkeypatch.setattr(PS.StepRunner, "timed", timed)
    PS.measure_speed(methods, batch=2, device=torch.device("cpu"), resolution=32, warmup=1, rounds=3, iters=1,
                    sequential=sequential, log=lambda _: None)
    assert calls == (["A"] * 3 + ["B"] * 3 if sequential else ["A", "B"] * 3)
    assert methods[0].info["ms_per_iter"] == pytest.approx(400.0) and methods[1].info["ms_per_iter"] == pytest.approx(150.0)
    assert methods[1].info["iters_per_s"] == pytest.approx(1 / 0.15)
    assert methods[0].info["peak_memory_bytes"] is None  # CPU: n/a


def test_cli_profile_runs_real_steps_and_writes_json(tmp_path, capsys):
    vanilla = tmp_path / "toy-vanilla.yaml"
    vanilla.write_text(open(TOY).read().replace("method: ahpa", "method: vanilla"))
    out = tmp_path / "profile.json"
    argv = ["profile", "--model", "SiT-T/2", "--resolution", "32", "--methods", f"{vanilla},{TOY}",
            "--batch", "2", "--warmup", "1", "--rounds", "2", "--iters", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert [m["method"] for m in result["methods"]] == ["toy-vanilla", "toy"]
    assert result["timing"]["order"] == "alternating" and result["timing"]["batch"] == 2
    for m in result["methods"]:
        assert len(m["round_ms"]) == 2 and m["ms_per_iter"] == pytest.approx(statistics.median(m["round_ms"]))
        assert m["iters_per_s"] == pytest.approx(1e3 / m["ms_per_iter"]) and m["peak_memory_bytes"] is None
    assert result["methods"][0]["extra_trainable_params"] == 0 < result["methods"][1]["extra_trainable_params"]
    table = capsys.readouterr().out
    assert "toy-vanilla" in table and "n/a" in table


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p.json"
    # No REPA config in this tree under the naming rule: the message names the file.
    assert cli.main(["profile", "--model", "SiT-XL/2", "--methods", "vanilla,nope", "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(AhpaError, match=r"sit-t2-vanilla\.yaml"):
        P.method_config_path("vanilla", "SiT-T/2")
    assert cli.main(["profile", "--methods", "vanilla", "--batch", "0", "--out", str(out)]) == 2
    assert cli.main(["profile", "--model", "SiT-Q/2", "--methods", "vanilla", "--out", str(out)]) == 2
    assert "unknown model 'SiT-Q/2'" in capsys.readouterr().err
    monkeypatch.setattr(PC, "available_bytes", lambda device: 1 << 20)
    argv = ["profile", "--model", "SiT-T/2", "--resolution", "32", "--methods", TOY, "--out", str(out)]
    assert cli.main(argv) == 2
    assert "--sequential" in capsys.readouterr().err
    assert not out.exists()
