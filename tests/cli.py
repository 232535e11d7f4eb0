"""Run an amago2_*.py script as a subprocess, the way a user does (shared by the test_cli_*.py files)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, args: list, cwd, nproc: int = 0) -> subprocess.CompletedProcess:
    """`python script args`, or with nproc: `torchrun --standalone --nproc-per-node nproc script args` (gloo on CPU)."""
    # one torch thread: tiny models run faster on it, and on busy shared cores two threads spin against each other
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else []
    return subprocess.run(
        [sys.executable, *launcher, os.path.join(ROOT, script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
