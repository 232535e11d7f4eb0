"""Run an amago2_*.py script as a subprocess, the way a user does (shared by the test_cli_*.py files)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, args: list, cwd) -> subprocess.CompletedProcess:
    # one torch thread: tiny models run faster on it, and on busy shared cores two threads spin against each other
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
