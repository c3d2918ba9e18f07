#!/usr/bin/env bash
# One GPU check (<= 8 minutes on one H100/H200): CUDA-only tests, then the benchmarks, into one JSON.
#   bash benchmarks/gpu_suite.sh [OUT.json]        # without CUDA: tiny CPU sizes, same steps, exit 0
# Parts: pytest tests/test_scale_*.py (the compile test uses inductor on CUDA); train_throughput.py
# (MFU of SiT-B/2 and SiT-XL/2, vanilla and AHPA, bf16, compiled; AHPA/vanilla step ratio).
set -uo pipefail
OUT=${1:-gpu_suite.json}
export PYTHONPATH=${PYTHONPATH:-$(pwd)}
TMP=$(mktemp -d)
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODE=cuda
  timeout 180 python -m pytest tests/test_scale_train.py tests/test_scale_sampling.py -q -x > "$TMP/tests.txt" 2>&1; echo $? > "$TMP/tests.rc"
  timeout 120 python benchmarks/train_throughput.py --model SiT-B/2 --batch 256 --steps 10 --compile > "$TMP/b2.json" 2>"$TMP/b2.err"
  timeout 180 python benchmarks/train_throughput.py --model SiT-XL/2 --batch 64 --steps 10 --compile > "$TMP/xl2.json" 2>"$TMP/xl2.err"
else
  MODE=cpu
  timeout 300 python -m pytest tests/test_scale_sampling.py -q -x > "$TMP/tests.txt" 2>&1; echo $? > "$TMP/tests.rc"
  timeout 300 python benchmarks/train_throughput.py --model SiT-T/2 --input-size 8 --batch 4 --steps 2 --warmup 1 > "$TMP/b2.json" 2>"$TMP/b2.err"
  echo '{}' > "$TMP/xl2.json"
fi
python - "$TMP" "$OUT" "$MODE" <<'PY'
import json, sys, pathlib
tmp, out, mode = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def load(name):
    text = (tmp / name).read_text().strip().splitlines()
    try:
        return json.loads(text[-1]) if text else None
    except ValueError:
        return None
result = {"mode": mode, "tests_rc": int((tmp / "tests.rc").read_text()), "tests_tail": (tmp / "tests.txt").read_text()[-2000:],
          "train_b2": load("b2.json"), "train_xl2": load("xl2.json")}
pathlib.Path(out).write_text(json.dumps(result, indent=2))
print(json.dumps({k: v for k, v in result.items() if k != "tests_tail"}, indent=2))
PY
exit 0
