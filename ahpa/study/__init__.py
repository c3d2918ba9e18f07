"""``ahpa study``: methods x seeds x milestones -> train, sample, evaluate, tables and plots.

The paper's results are tables of methods against training steps (Tables 2, 3,
D.15; Fig. H.6).  A study is a small YAML (``configs/studies/*.yaml``)::

    name: b2-table3
    methods:                      # one row each: a run config plus overrides
      - {name: vanilla, config: configs/sit-b2-vanilla.yaml}
      - {name: sra2, config: configs/sit-b2-sra2.yaml, optional: true}   # skipped with a note if missing
    seeds: [0]
    milestones: [100000, 200000, 400000]
    samples: 50000                # per-index seeds (ahpa.sampling): the same noise and labels for every run
    sampler: {mode: ode, method: euler, steps: 250, cfg_scale: 1.0}
    reference: {kind: inception, path: VIRTUAL_imagenet256_labeled.npz}   # or {kind: digits, split: train}
    overrides: [train.grid_steps=10]   # for every method (command-line overrides come last)

It drives the existing pieces and nothing else: training is :class:`ahpa.train.Trainer`
(resuming from its own checkpoints), sampling :func:`ahpa.generate.generate_samples`
(resuming from its part files), evaluation :func:`ahpa.evaluation.command.evaluate`
or :func:`ahpa.evaluation.digits.digits_metrics`.  Layout of ``OUT``::

    runs/<method>-s<seed>/           training runs (ckpt_every divides every milestone)
    samples/<method>-s<seed>/<step>/ sampling directories (samples_<N>.npz)
    evals/<method>-s<seed>/<step>.metrics.json   the metric of one milestone
    evals/<method>-s<seed>/<step>.json           + losses and router weights: the milestone is done
    grids/<method>/<step>.png        the first samples of the first seed, one row per class (Fig. H.6)
    results.csv  results.md  fid_vs_steps.png

Rerunning the same command continues every unfinished run and skips every
finished milestone; ``--print-commands`` writes the same work as shell commands
for a cluster (their outputs land where the study looks, so a later
``ahpa study`` collects them); ``--jobs N`` runs N runs at once as subprocesses
(one GPU each when there are GPUs).
"""
