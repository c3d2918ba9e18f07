"""Write results.csv/md of the part-C trial from whatever runs have finished (issue 21)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ahpa.study import collect, load_study, write_results  # noqa: E402

study = load_study(sys.argv[1])
out = Path(sys.argv[2])
write_results(study, out, collect(study, out))
print(f"wrote {out / 'results.md'}")
