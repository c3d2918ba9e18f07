"""``ahpa sample``: the sampling engine (:mod:`ahpa.generate.engine`), its conditions, class labels or
prompts (:mod:`ahpa.generate.conditions`), and the command (:mod:`ahpa.generate.command`)."""

# Transitional: ahpa/cli.py (COMMANDS) and ahpa/study/runner.py still import these from the package;
# once they name ahpa.generate.command and ahpa.generate.engine, these two lines go.
from ahpa.generate.command import register  # noqa: F401
from ahpa.generate.engine import generate_samples, samples_path  # noqa: F401
