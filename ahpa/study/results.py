"""A study's numbers: the 95% Student-t interval over seeds, results.csv, results.md and the metric-vs-steps plot."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from ahpa.errors import AhpaError
from ahpa.io import atomic_open, write_text_atomic
from ahpa.study.schema import Study, eval_paths, primary_metrics


# ---------------------------------------------------------------------- statistics
def mean_interval(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% Student-t interval, n); half-width NaN for n < 2.

    ``mean +- t_{0.975, n-1} * s / sqrt(n)`` with the sample standard deviation s (ddof 1).
    """
    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=np.float64)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return float(x.mean()), half, n


# ---------------------------------------------------------------------- tables
def collect(study: Study, out: Path) -> list[dict]:
    rows = []
    for method, seed in study.runs():
        for step in study.milestones:
            record = eval_paths(out, method, seed, step)[2]
            if record.is_file():
                rows.append(json.loads(record.read_text()))
    order = {m.name: i for i, m in enumerate(study.methods)}
    return sorted(rows, key=lambda r: (order[r["method"]], r["seed"], r["step"]))


def _fmt(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def write_results(study: Study, out: Path, rows: list[dict]) -> None:
    """results.csv (one row per run and milestone), results.md (mean and 95% interval), fid_vs_steps.png."""
    columns = ["method", "seed", "step"]
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r[k]) if k in r else "" for k in columns})
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.md", results_markdown(study, rows))
    plot_metric_vs_steps(study, rows, out / "fid_vs_steps.png")


def _cell(values, digits: int = 3) -> str:
    mean, half, n = mean_interval(values)
    if n == 0:
        return "—"
    text = f"{mean:.{digits}f}"
    return text + (f" ± {half:.{digits}f}" if n > 1 else "") + (f" (n={n})" if n != 1 or len(values) != n else "")


def paired_differences(rows: list[dict], method: str, baseline: str, metric: str, step: int) -> tuple[float, float, int]:
    """(mean, 95% Student-t half-width, n) of the per-seed difference ``method - baseline`` of ``metric`` at ``step``,
    over the seeds both have: the paired comparison a study of few seeds needs (issue 21)."""
    def by_seed(name):
        return {r["seed"]: r.get(metric) for r in rows if r["method"] == name and r["step"] == step and r.get(metric) is not None}
    mine, base = by_seed(method), by_seed(baseline)
    return mean_interval([mine[s] - base[s] for s in sorted(set(mine) & set(base))])


def seeds_for_power(sd_diff: float, delta: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Smallest number of seeds for which a paired t-test (two-sided ``alpha``) detects a true mean per-seed
    difference ``delta`` with probability ``power``, when the differences have standard deviation ``sd_diff``
    (noncentral t; the sizing rule of a study, issue 21)."""
    for n in range(2, 10_000):
        df, nc = n - 1, delta * math.sqrt(n) / sd_diff
        crit = stats.t.ppf(1 - alpha / 2, df)
        if stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) >= power:
            return n
    raise AhpaError(f"no study of fewer than 10000 seeds detects a difference of {delta} at sd {sd_diff}")


LOWER_IS_BETTER = {"cfid", "fid", "sfid"}


def steps_to_reach(points: list[tuple[int, float]], threshold: float, lower_better: bool) -> float | None:
    """The first training step at which a run's metric reaches ``threshold``: linear interpolation between the two
    milestones that bracket the crossing; the first milestone itself when it is already there (a bound: the
    crossing lies at or before it); None when no milestone reaches it."""
    points = sorted(points)
    ok = [(v <= threshold) if lower_better else (v >= threshold) for _, v in points]
    for i, (step, value) in enumerate(points):
        if not ok[i]:
            continue
        if i == 0:
            return float(step)
        (s0, v0), (s1, v1) = points[i - 1], (step, value)
        return s0 + (s1 - s0) * (threshold - v0) / (v1 - v0)
    return None


def _speedup_section(study: Study, rows: list[dict]) -> list[str]:
    """The paper's form of a speed-up (Table 3, Fig. 1): the steps each method needs to reach the first method's final
    quality (its mean over seeds at the last milestone), per seed, and last milestone / those steps."""
    if len(study.methods) < 2 or len(study.milestones) < 2:
        return []
    base, last = study.methods[0].name, study.milestones[-1]
    lines = [f"## Steps to reach {base}'s final quality (the paper's speed-up)", "",
             f"Per seed, the step at which the method's metric reaches {base}'s mean at {last:,} steps (linear between "
             f"milestones; `<=` the first milestone when it is already there); mean ± 95% half-width over seeds; speed-up = "
             f"{last:,} / mean steps, its interval from the steps' interval. Seeds that never reach it are counted apart.", ""]
    for metric in primary_metrics(study):
        final = [r[metric] for r in rows if r["method"] == base and r["step"] == last and r.get(metric) is not None]
        if not final:
            continue
        threshold = float(np.mean(final))
        lines += [f"### {metric} (threshold {threshold:.3f})", "", "| method | steps (per seed) | mean steps | speed-up | not reached |",
                  "|---|---|---|---|---|"]
        for method in study.methods:
            reached, never, cells = [], 0, []
            for seed in study.seeds:
                pts = [(r["step"], r[metric]) for r in rows if r["method"] == method.name and r["seed"] == seed and r.get(metric) is not None]
                if not pts:
                    continue
                at = steps_to_reach(pts, threshold, metric in LOWER_IS_BETTER)
                if at is None:
                    never += 1
                    cells.append(f">{last:,}")
                else:
                    reached.append(at)
                    cells.append(("<=" if at == min(p for p, _ in pts) else "") + f"{at:,.0f}")
            mean, half, n = mean_interval(reached)
            if n:
                lo, hi = mean - half, mean + half
                speed = f"{last / mean:.2f}x" + (f" [{last / hi:.2f}, {last / lo:.2f}]" if n > 1 and lo > 0 else "")
                lines.append(f"| {method.name} | {', '.join(cells)} | {mean:,.0f}" + (f" ± {half:,.0f}" if n > 1 else "")
                             + f" | {speed} | {never} |")
            else:
                lines.append(f"| {method.name} | {', '.join(cells)} | — | — | {never} |")
        lines.append("")
    return lines


def _paired_section(study: Study, rows: list[dict]) -> list[str]:
    """Per-seed differences from the first method, for studies with two seeds or more."""
    if len(study.seeds) < 2 or len(study.methods) < 2:
        return []
    base = study.methods[0].name
    lines = [f"## Per-seed difference from {base}", "",
             f"Mean ± 95% Student-t half-width of (method - {base}) over the seeds both have; an interval that excludes 0 "
             "separates the method from the baseline at that milestone.", ""]
    for metric in primary_metrics(study):
        lines += [f"### {metric}", "", "| method | " + " | ".join(f"{m:,} steps" for m in study.milestones) + " |",
                  "|---|" + "---|" * len(study.milestones)]
        for method in study.methods[1:]:
            cells = []
            for step in study.milestones:
                mean, half, n = paired_differences(rows, method.name, base, metric, step)
                cells.append("—" if n == 0 else f"{mean:+.3f}" + (f" ± {half:.3f}" if n > 1 else "") + f" (n={n})"
                             + (" *" if n > 1 and abs(mean) > half else ""))
            lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines + ["`*`: the interval excludes 0.", ""]


def results_markdown(study: Study, rows: list[dict]) -> str:
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [f"Seeds {study.seeds}; {study.samples} samples per milestone ({study.sampler['mode']} {study.sampler['method']}, "
              f"{study.sampler['steps']} steps, CFG {study.sampler['cfg_scale']}); reference: "
              + (f"digits classifier, {study.reference['split']} split" if study.reference["kind"] == "digits" else study.reference["path"])
              + ". Cells: mean ± half-width of the 95% Student-t interval over seeds (n = seeds with a result).", ""]
    by = {}
    for r in rows:
        by.setdefault((r["method"], r["step"]), []).append(r)
    metrics = primary_metrics(study) + ["loss_diffusion", "loss_align"]
    names = {"cfid": "classifier FID (lower is better)", "accuracy": "class accuracy of samples (higher is better)",
             "fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision", "recall": "recall",
             "loss_diffusion": "diffusion loss (last 10% of steps)", "loss_align": "alignment loss x lambda (last 10% of steps)"}
    for metric in metrics:
        if not any(r.get(metric) is not None for r in rows):
            continue
        lines += [f"## {names.get(metric, metric)}", "", "| method | " + " | ".join(f"{m:,} steps" for m in study.milestones) + " |",
                  "|---|" + "---|" * len(study.milestones)]
        for method in study.methods:
            cells = [_cell([r.get(metric) for r in by.get((method.name, m), [])]) for m in study.milestones]
            lines.append(f"| {method.name} | " + " | ".join(cells) + " |")
        lines.append("")
    router_keys = sorted({k for r in rows for k in r if k.startswith(("gamma_", "intra_max_"))})
    if router_keys:
        last = study.milestones[-1]
        lines += [f"## Router at {last:,} steps", "",
                  "gamma_<group>_t<t>: the group's weight at t (0 = data, 1 = noise; uniform = 1); intra_max: mean largest "
                  "layer weight within the group (1 = one layer); gamma_t_spread: largest change of a gamma over t (0 = flat in t).", "",
                  "| method | " + " | ".join(router_keys) + " |", "|---|" + "---|" * len(router_keys)]
        for method in study.methods:
            group = by.get((method.name, last), [])
            if any(k in r for r in group for k in router_keys):
                lines.append(f"| {method.name} | " + " | ".join(_cell([r.get(k) for r in group], 2) for k in router_keys) + " |")
        lines.append("")
    lines += _paired_section(study, rows)
    lines += _speedup_section(study, rows)
    missing = [f"{m.name} seed {s}" for m, s in study.runs() if not any(r["method"] == m.name and r["seed"] == s and r["step"] == study.milestones[-1] for r in rows)]
    notes = [f"- {m.name}: {m.note}" for m in study.skipped] + ([f"- unfinished runs: {', '.join(missing)} (rerun the study to continue)"] if missing else [])
    if notes:
        lines += ["## Notes", "", *notes, ""]
    return "\n".join(lines)


def plot_metric_vs_steps(study: Study, rows: list[dict], path: Path) -> None:
    metric = primary_metrics(study)[0]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for method in study.methods:
        xs, ys, es = [], [], []
        for m in study.milestones:
            mean, half, n = mean_interval([r.get(metric) for r in rows if r["method"] == method.name and r["step"] == m])
            if n:
                xs.append(m), ys.append(mean), es.append(0.0 if math.isnan(half) else half)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method.name)
    ax.set_xlabel("training steps")
    ax.set_ylabel({"cfid": "classifier FID", "fid": "FID"}.get(metric, metric))
    ax.set_title(f"{study.name}: mean and 95% interval over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=120)


