"""``ahpa sample``: the sampling engine (:mod:`ahpa.generate.engine`), its conditions, class labels or
prompts (:mod:`ahpa.generate.conditions`), and the command (:mod:`ahpa.generate.command`)."""
