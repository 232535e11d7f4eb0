"""amago2_atari.py from the command line: every loss combination, save + resume, a disk-backed buffer, bad flags."""

import os

import numpy as np
import pytest
import torch
from cli import run_script

# Breakout and Qbert: the shortest random-play games (about 200 and 300 steps), so the final evaluation is quick.
TINY = [
    "--games",
    "Breakout",
    "Qbert",
    "--num-envs",
    "2",
    "--steps-per-epoch",
    "20",
    "--updates-per-epoch",
    "2",
    "--context-len",
    "8",
    "--batch-size",
    "2",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--d-token",
    "24",
    "--num-bins",
    "16",
    "--head-hidden",
    "32",
    "--buffer-size",
    "1000",
    "--eval-episodes",
    "1",
    "--eval-every",
    "0",
    "--total-timesteps",
    "80",
]  # two epochs of 2 envs x 20 steps, 2 updates each


def run(args, cwd):
    return run_script("amago2_atari.py", args, cwd)


# the last combination also covers sync envs, full recompute instead of the KV cache, clipped rewards and all-shifted frames
@pytest.mark.parametrize(
    "actor_loss,critic_loss,extra",
    [
        ("ind", "ind", []),
        ("ind", "dep", []),
        ("dep", "ind", []),
        ("dep", "dep", ["--no-async-envs", "--no-kv-cache", "--clip-rewards", "--augment-fraction", "1.0"]),
    ],
)
def test_loss_combinations_run(actor_loss, critic_loss, extra, tmp_path):
    out = run([*TINY, "--actor-loss", actor_loss, "--critic-loss", critic_loss, *extra], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 80 steps, 4 updates" in out.stdout
    assert "eval: hns_mean" in out.stdout and "hns_median" in out.stdout


def test_save_then_resume_continues(tmp_path):
    out = run([*TINY, "--save-model", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "runs" / "r" / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["counters"]["global_step"] == 80 and state["counters"]["updates"] == 4
    assert np.load(ckpt / state["buffer"] / "image.npy", mmap_mode="r").dtype == np.uint8
    out = run(["--resume", "runs/r", "--total-timesteps", "160"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resumed runs/r at step 80 after 4 updates" in out.stdout
    assert "done: 160 steps, 8 updates" in out.stdout
    state2 = torch.load(ckpt / "state.pt", weights_only=False)
    assert state2["counters"]["global_step"] == 160 and state2["args"]["games"] == ["Breakout", "Qbert"]
    # the TensorBoard run holds the per-game and summary evaluation scalars
    events = [f for f in os.listdir(tmp_path / "runs" / "r") if f.startswith("events")]
    assert events and any(b"eval/Qbert/hns" in open(tmp_path / "runs" / "r" / f, "rb").read() for f in events)


def test_disk_backed_buffer_run(tmp_path):
    out = run([*TINY, "--buffer-dir", "buf", "--save-model", "--run-name", "d"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "memory-mapped in buf" in out.stdout
    image = np.load(tmp_path / "buf" / "image.npy", mmap_mode="r")
    assert image.dtype == np.uint8 and image.shape == (500, 2, 84, 84, 3) and image[:40].any()
    out = run(["--resume", "runs/d", "--total-timesteps", "120"], tmp_path)  # reopens the same files
    assert out.returncode == 0, out.stderr
    assert "done: 120 steps" in out.stdout


def test_capture_video(tmp_path):
    try:
        import moviepy  # noqa: F401
    except ImportError:  # then the flag must be refused up front, with a clear message
        out = run([*TINY, "--capture-video"], tmp_path)
        assert out.returncode == 2 and "--capture-video needs moviepy" in out.stderr and "Traceback" not in out.stderr
        return
    out = run([*TINY, "--capture-video", "--run-name", "v"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert any(f.endswith(".mp4") for f in os.listdir(tmp_path / "videos" / "v"))


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--games", "Breakout", "NotAGame"], "unknown Atari game"),
        (["--context-len", "0"], "--context-len 0 is out of range: it must be an integer >= 1"),
        (["--num-envs", "3"], "must be a multiple of the 2 games"),
        (["--buffer-size", "1000000000"], "GiB of RAM but only"),
        (["--augment-fraction", "1.5"], "--augment-fraction must be in [0, 1]"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(flags, message, tmp_path):
    out = run([*TINY, *flags], tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
