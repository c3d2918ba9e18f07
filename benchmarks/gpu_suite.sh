#!/usr/bin/env bash
# One GPU check (<= 8 minutes on one H100/H200): CUDA-only tests, then the benchmarks, into one JSON.
#   bash benchmarks/gpu_suite.sh [OUT.json]        # without CUDA: tiny CPU sizes, same steps, exit 0
# Parts (time limits in seconds; their sum, 450, leaves room for start-up within 8 minutes):
#   tests     pytest: the compile tests (inductor on CUDA), the CUDA noise test, the scale sampling tests    95
#   train_b2  train_throughput.py SiT-B/2, batch 256, bf16, compiled: MFU vanilla and AHPA, AHPA/vanilla   90
#   train_xl2 train_throughput.py SiT-XL/2, batch 64, the same                                           125
#   encoder   encoder_cost.py SD-VAE 256 px vs a SiT-XL/2 AHPA step, batch 32: fp32/bf16/channels-last     40
#   sample    sampling_noise.py SiT-XL/2, batch 64, SDE 50 steps, bf16: images/s, noise share, 50K hours   60
#   evaluate  evaluation_throughput.py: Inception images/s and the minutes for 50K + 10K reference         40
# Each part writes its JSON line; a part that fails or times out is recorded with its exit code, not fatal.
set -uo pipefail
OUT=${1:-gpu_suite.json}
export PYTHONPATH=${PYTHONPATH:-$(pwd)}
TMP=$(mktemp -d)
START=$(date +%s)
part() {  # part NAME LIMIT CMD...: stdout to NAME.out, stderr to NAME.err, exit code to NAME.rc
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$TMP/$name.out" 2> "$TMP/$name.err"; echo $? > "$TMP/$name.rc"
  echo $(( $(date +%s) - t0 )) > "$TMP/$name.s"
}
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODE=cuda
  part tests 95 python -m pytest -q -x tests/test_scale_sampling.py tests/test_sampling_speed.py \
    "tests/test_scale_train.py::test_training_step_compiles_as_one_graph_and_equals_eager"
  part train_b2 90 python benchmarks/train_throughput.py --model SiT-B/2 --batch 256 --steps 10 --compile
  part train_xl2 125 python benchmarks/train_throughput.py --model SiT-XL/2 --batch 64 --steps 10 --compile
  part encoder 40 python benchmarks/encoder_cost.py --model SiT-XL/2 --batch 32 --warmup 2 --iters 5
  part sample 60 python benchmarks/sampling_noise.py --model SiT-XL/2 --batch 64 --steps 50 --bf16
  part evaluate 40 python benchmarks/evaluation_throughput.py --json
else
  MODE=cpu  # tiny sizes: checks that every part runs; the numbers say nothing about a GPU
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  part tests 300 python -m pytest -q -x tests/test_scale_sampling.py tests/test_sampling_speed.py
  part train_b2 300 python benchmarks/train_throughput.py --model SiT-T/2 --input-size 8 --batch 4 --steps 2 --warmup 1
  echo '{}' > "$TMP/train_xl2.out"; echo 0 > "$TMP/train_xl2.rc"; echo 0 > "$TMP/train_xl2.s"
  part encoder 300 python benchmarks/encoder_cost.py --vae tiny --model SiT-T/2 --resolution 32 --batch 2 --warmup 1 --iters 1
  part sample 300 python benchmarks/sampling_noise.py --model SiT-T/2 --input-size 8 --batch 4 --steps 3
  part evaluate 300 python benchmarks/evaluation_throughput.py --images 4 --batch 4 --json
fi
python - "$TMP" "$OUT" "$MODE" "$START" <<'PY'
import json, sys, pathlib, time
tmp, out, mode, start = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
def last_json(name):
    for line in reversed((tmp / f"{name}.out").read_text().strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None
parts = ("tests", "train_b2", "train_xl2", "encoder", "sample", "evaluate")
result = {"mode": mode, "seconds": int(time.time()) - start,
          "rc": {p: int((tmp / f"{p}.rc").read_text()) for p in parts},
          "part_seconds": {p: int((tmp / f"{p}.s").read_text()) for p in parts},
          "tests_tail": (tmp / "tests.out").read_text()[-1500:]}
for p in parts[1:]:
    result[p] = last_json(p)
    if result["rc"][p]:
        result[p + "_stderr_tail"] = (tmp / f"{p}.err").read_text()[-1500:]
pathlib.Path(out).write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if not k.endswith("tail")}, indent=2))
PY
exit 0
