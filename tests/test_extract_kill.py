"""``ahpa extract`` killed for real (SIGKILL of the process) resumes into exactly the uninterrupted cache.

``test_cache.py`` simulates kills in-process (``stop_after``); here the command
runs as a subprocess and is SIGKILLed at seeded random points after the first
shard's progress record exists:

- after a random delay;
- while a shard temp file is being written (caught by polling; the process is
  frozen with SIGSTOP to confirm the temp file is still there, then killed);
- just before the rename of a progress record / of the manifest: these writes
  are too short to catch by polling on tmpfs, so the child stops itself there
  (a wrapper around ``os.replace``) and is killed while stopped.

The same command is then rerun to completion (in-process: same code and thread
count, no second start-up) and the cache compared with an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ahpa.cli import main as cli_main
from ahpa.data.toy import load_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # as the subprocesses (OMP_NUM_THREADS=1): same bytes

NUM_IMAGES, SHARDS = 120, 8  # shards of 16; encoding takes well under a second, process start-up dominates
POLL_S = 2e-4
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Child that stops itself (SIGSTOP) before the n-th rename of a temp file named like `pattern`.
STOP_BEFORE_RENAME = """
import fnmatch, os, signal, sys, threading
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if fnmatch.fnmatch(os.path.basename(src), {pattern!r}):
        seen[0] += 1
        if seen[0] == {n}:
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)  # stops this thread at once, os.kill may not
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from ahpa.cli import main
sys.exit(main(sys.argv[1:]))
"""


def extract_argv(folder: Path, out: Path) -> list[str]:
    return [
        "extract", str(folder), "--out", str(out), "--vae", "tiny",
        "--resolution", "32", "--shard-size", "16", "--batch", "8", "--workers", "0",
    ]  # fmt: skip


def snapshot(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def temps(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.tmp"))


def records(cache: Path) -> int:
    return len(list((cache / "progress").glob("*.json")))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ImageNet layout: ``class<y>/<i>.png`` from the toy train split."""
    root = tmp_path_factory.mktemp("toy_images")
    images, labels = load_toy("train")
    for i in range(NUM_IMAGES):
        class_dir = root / f"class{int(labels[i]):02d}"
        class_dir.mkdir(exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(class_dir / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> Path:
    """The cache of an uninterrupted run of the command (another directory)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    done = subprocess.run([sys.executable, "-m", "ahpa.cli", *extract_argv(folder, out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def wait_for_records(proc: subprocess.Popen, out: Path, n: int) -> None:
    while not (out / "progress").is_dir() or records(out) < n:
        assert proc.poll() is None, "extract exited before the kill point"
        time.sleep(POLL_S)


def kill_after_delay(proc: subprocess.Popen, out: Path, min_records: int, delay: float) -> None:
    wait_for_records(proc, out, min_records)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)


def kill_mid_write(proc: subprocess.Popen, out: Path, min_records: int, temp_glob: str) -> None:
    wait_for_records(proc, out, min_records)
    while True:
        assert proc.poll() is None, f"extract exited before {temp_glob} was caught"
        if any(out.glob(temp_glob)):
            proc.send_signal(signal.SIGSTOP)
            if any(out.glob(temp_glob)):
                break
            proc.send_signal(signal.SIGCONT)  # the rename won the race: wait for the next one
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGKILL)


def kill_when_stopped(proc: subprocess.Popen) -> None:
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "extract exited before the rename it was to stop at"
    proc.send_signal(signal.SIGKILL)


def _cases() -> list:
    rng = random.Random(0)  # seeds every kill point
    return [
        pytest.param("delay", rng.randint(1, SHARDS - 4), rng.uniform(0.0, 0.03), id="random-delay"),
        pytest.param("mid-write", rng.randint(1, SHARDS - 4), "shards/.*.tmp", id="shard-mid-write"),
        pytest.param("rename", rng.randint(2, SHARDS), ".0*.json.*.tmp", id="progress-record-before-rename"),
        pytest.param("rename", 1, ".manifest.json.*.tmp", id="manifest-before-rename"),
    ]  # fmt: skip


@pytest.mark.parametrize("mode,n,where", _cases())
def test_sigkill_then_rerun_equals_uninterrupted(folder, reference, tmp_path, mode, n, where):
    out = tmp_path / "cache"
    argv = extract_argv(folder, out)
    code = ["-m", "ahpa.cli"] if mode != "rename" else ["-c", STOP_BEFORE_RENAME.format(pattern=where, n=n)]
    proc = subprocess.Popen([sys.executable, *code, *argv], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if mode == "delay":
            kill_after_delay(proc, out, n, where)
        elif mode == "mid-write":
            kill_mid_write(proc, out, n, where)
        else:
            kill_when_stopped(proc)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"{mode} {n} {where}: killed with {records(out)} progress records, temps {temps(out)}")  # shown on failure
    assert proc.returncode == -signal.SIGKILL
    assert records(out) >= 1 and not (out / "manifest.json").exists(), "the kill is not between first record and manifest"
    if mode != "delay":
        assert temps(out), "the kill missed the write it aimed at"

    assert cli_main(argv) == 0  # the same command, to completion

    assert temps(out) == []
    got, want = snapshot(out), snapshot(reference)
    assert sorted(got) == sorted(want)
    # No field of manifest.json (nor plan.json, nor the progress records) holds a time,
    # a path of the cache or anything about interruptions: every file must match byte for byte.
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    assert cli_main(["extract", "--verify", str(out)]) == 0
