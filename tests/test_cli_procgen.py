"""amago2_procgen.py from the command line, what is specific to it (the matrix over all scripts: test_cli.py): rescaled
rewards, memory-hard save + resume, and the per-mode defaults of its flags."""

import os

import gymnasium as gym
import numpy as np
import torch
from test_cli import run as run_script
from test_cli import tiny

import amago2_procgen as A

TINY = tiny("procgen")  # --horizon 30 caps every meta-rollout: each env finishes some while training
NO_GAMES = " ".join(TINY).replace("--games coinrun leaper --impala-channels 4 4 4 ", "").split()  # the mode's CNN
assert len(NO_GAMES) == len(TINY) - 7


def run(args, cwd):
    return run_script("procgen", args, cwd)


def events(run_dir) -> bytes:
    return b"".join(open(run_dir / f, "rb").read() for f in os.listdir(run_dir) if f.startswith("events"))


def test_rescaled_rewards_run(tmp_path):
    out = run([*TINY, "--reward-scales", "coinrun", "100", "--run-name", "s"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 80 steps, 4 updates" in out.stdout
    # the per-game scalars and each game's share of the incoming experience (paper Fig. 15) reach TensorBoard
    logged = events(tmp_path / "runs" / "s")
    assert b"charts/experience_share/coinrun" in logged and b"eval/leaper/norm_2" in logged


def test_memory_hard_save_then_resume_continues(tmp_path):
    # memory-hard with its paper CNN (20, 36, 64); the resumed run gets no --mode and must keep the saved one
    out = run([*NO_GAMES, "--mode", "memory-hard", "--games", "maze", "heist", "--save-model", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "runs" / "r" / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["counters"]["global_step"] == 80 and state["counters"]["updates"] == 4
    assert state["args"]["impala_channels"] == [20, 36, 64] and state["agent"]["encoder.cnn.2.conv.weight"].shape[0] == 64
    assert (ckpt / "rank0" / state["buffer"] / "image.zst").exists()  # the snapshot keeps the frames compressed
    out = run(["--resume", "runs/r", "--total-timesteps", "160"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resumed runs/r at step 80 after 4 updates" in out.stdout
    assert "done: 160 steps, 8 updates" in out.stdout
    state2 = torch.load(ckpt / "state.pt", weights_only=False)
    assert state2["counters"]["global_step"] == 160
    assert state2["args"]["mode"] == "memory-hard" and state2["args"]["games"] == ["maze", "heist"]


def test_mode_defaults_and_overrides():
    easy, hard = A.Args(), A.Args(mode="memory-hard")
    assert (easy.batch_size, easy.buffer_size, easy.context_len, easy.n_layers) == (24, 18_000_000, 128, 3)
    assert (easy.impala_channels, easy.horizon, easy.games) == (
        [16, 32, 32],
        2500,
        ["climber", "coinrun", "jumper", "ninja", "leaper"],
    )
    assert (hard.batch_size, hard.buffer_size, hard.context_len, hard.n_layers) == (16, 80_000_000, 768, 6)
    assert (hard.impala_channels, hard.horizon, len(hard.games)) == ([20, 36, 64], 5000, 16)
    assert easy.d_model == hard.d_model == 512 and easy.num_bins == 128 and easy.reward_multiplier == 10.0
    mine = A.Args(mode="memory-hard", batch_size=3, context_len=0, games=["maze"], impala_channels=[8, 8])
    assert (mine.batch_size, mine.context_len, mine.games, mine.impala_channels, mine.n_layers) == (3, 0, ["maze"], [8, 8], 6)
    hard.impala_channels.append(4)  # the defaults are copies, not the shared table
    assert A.Args(mode="memory-hard").impala_channels == [20, 36, 64]
    space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    encoder = A.TimestepEncoder(space, 15, A.Args(mode="memory-hard"))
    assert [block.conv.out_channels for block in encoder.cnn[:-1]] == [20, 36, 64]
