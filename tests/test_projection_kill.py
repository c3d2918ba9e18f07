"""A projected cache (``ahpa extract --project pca:K``) SIGKILLed during the PCA fit and during extraction
resumes into exactly the uninterrupted cache (the pattern of test_extract_kill.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_extract_kill import ENV, folder, kill_after_delay, kill_when_stopped, records, snapshot, temps  # noqa: F401  (folder: fixture)

from ahpa.cli import main as cli_main

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
# Child that stops itself (SIGSTOP) before linking the fitted projection into place: killed there, mid-fit's commit.
STOP_BEFORE_LINK = """
import fnmatch, os, signal, sys, threading
real_link = os.link
def link(src, dst, *args, **kwargs):
    if fnmatch.fnmatch(os.path.basename(src), ".projection.safetensors.*.tmp"):
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    return real_link(src, dst, *args, **kwargs)
os.link = link
from ahpa.cli import main
sys.exit(main(sys.argv[1:]))
"""


def argv(folder: Path, out: Path) -> list[str]:
    return ["extract", str(folder), "--out", str(out), "--vae", "tiny", "--resolution", "32", "--shard-size", "16", "--batch", "8",
            "--workers", "0", "--project", "pca:8", "--pca-images", "48"]


def test_sigkill_during_the_pca_fit_and_during_extraction_then_rerun_equals_uninterrupted(folder, tmp_path):  # noqa: F811
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "ahpa.cli", *argv(folder, reference)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "explained variance G3" in done.stdout

    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", STOP_BEFORE_LINK, *argv(folder, out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kill_when_stopped(proc)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "projection.safetensors").exists() and temps(out), "killed with the fitted projection not yet in place"
    assert records(out) == 0

    proc = subprocess.Popen([sys.executable, "-m", "ahpa.cli", *argv(folder, out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kill_after_delay(proc, out, 1, 0.01)  # after the fit and the first shard
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "projection.safetensors").is_file() and not (out / "manifest.json").exists()

    assert cli_main(argv(folder, out)) == 0  # the same command, to completion
    assert temps(out) == []
    got, want = snapshot(out), snapshot(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    assert cli_main(["extract", "--verify", str(out)]) == 0
