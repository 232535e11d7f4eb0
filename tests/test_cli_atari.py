"""amago2_atari.py from the command line, what is specific to it (the matrix over all scripts: test_cli.py): videos."""

import os

from test_cli import run as run_script
from test_cli import tiny

TINY = tiny("atari")


def run(args, cwd):
    return run_script("atari", args, cwd)


def test_capture_video(tmp_path):
    try:
        import moviepy  # noqa: F401
    except ImportError:  # then the flag must be refused up front, with a clear message
        out = run([*TINY, "--capture-video"], tmp_path)
        assert out.returncode == 2 and "--capture-video needs moviepy" in out.stderr and "Traceback" not in out.stderr
        return
    out = run([*TINY, "--capture-video", "--run-name", "v"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert any(f.endswith(".mp4") for f in os.listdir(tmp_path / "runs" / "v" / "videos"))
