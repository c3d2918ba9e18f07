"""Seed spread, paired differences and a power estimate from a study's results.csv (issue 21)."""
import csv
import math
import sys

import numpy as np
from scipy import stats


def seeds_needed(sd_diff: float, delta: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Smallest n for which a paired t-test (two-sided alpha) detects a true mean difference delta with `power`."""
    for n in range(2, 1000):
        df = n - 1
        nc = delta * math.sqrt(n) / sd_diff
        crit = stats.t.ppf(1 - alpha / 2, df)
        if np.nan_to_num(stats.nct.sf(crit, df, nc)) + np.nan_to_num(stats.nct.cdf(-crit, df, nc)) >= power:
            return n
    return 1000


rows = list(csv.DictReader(open(sys.argv[1])))
a, b = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else ("vanilla", "repa-inception")
steps = sorted({int(r["step"]) for r in rows})
for metric in ("accuracy", "cfid"):
    print(f"## {metric}")
    for step in steps:
        va = {int(r["seed"]): float(r[metric]) for r in rows if r["method"] == a and int(r["step"]) == step}
        vb = {int(r["seed"]): float(r[metric]) for r in rows if r["method"] == b and int(r["step"]) == step}
        common = sorted(set(va) & set(vb))
        line = f"step {step}: {a} {np.mean(list(va.values())):.3f} (sd {np.std(list(va.values()), ddof=1) if len(va) > 1 else float('nan'):.3f}, n={len(va)})"
        if vb:
            line += f"; {b} {np.mean(list(vb.values())):.3f} (sd {np.std(list(vb.values()), ddof=1) if len(vb) > 1 else float('nan'):.3f}, n={len(vb)})"
        if len(common) >= 2:
            d = np.array([vb[s] - va[s] for s in common])
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            line += f"; diff ({b} - {a}) per seed {np.round(d, 3).tolist()}: mean {d.mean():.3f} ± {half:.3f} (95% t, n={len(d)}) -> {'EXCLUDES 0' if abs(d.mean()) > half else 'includes 0'}; sd_diff {d.std(ddof=1):.3f}"
        print(line)
