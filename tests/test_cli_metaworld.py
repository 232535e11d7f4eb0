"""amago2_metaworld.py from the command line (ML1, short inner episodes): every loss combination, async envs,
save + resume, bad flags."""

import pytest
import torch
from cli import run_script

# meta-rollouts of 3 x 10 steps; two epochs of 2 envs x 30 steps, 2 updates each
TINY = [
    "--benchmark",
    "ML1",
    "--ml1-task",
    "reach-v3",
    "--episode-length",
    "10",
    "--num-envs",
    "2",
    "--steps-per-epoch",
    "30",
    "--updates-per-epoch",
    "2",
    "--context-len",
    "12",
    "--batch-size",
    "3",
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
    "120",
]


def run(args, cwd):
    return run_script("amago2_metaworld.py", args, cwd)


@pytest.mark.parametrize("actor_loss,critic_loss", [("ind", "ind"), ("ind", "dep"), ("dep", "ind"), ("dep", "dep")])
def test_loss_combinations_run(actor_loss, critic_loss, tmp_path):
    out = run([*TINY, "--actor-loss", actor_loss, "--critic-loss", critic_loss], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 120 steps, 4 updates" in out.stdout
    # train and held-out (ML1: unseen goal variants) success are reported apart
    assert "eval: train/success_1" in out.stdout and "test/success " in out.stdout and "test/skill_coverage" in out.stdout


def test_full_recompute_bf16_async(tmp_path):
    out = run([*TINY, "--no-kv-cache", "--precision", "bf16", "--async-envs"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 120 steps, 4 updates" in out.stdout


def test_save_then_resume_continues(tmp_path):
    out = run([*TINY, "--save-model", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "runs" / "r" / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["counters"]["global_step"] == 120 and state["counters"]["updates"] == 4
    out = run(["--resume", "runs/r", "--total-timesteps", "240"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resumed runs/r at step 120 after 4 updates" in out.stdout
    assert "done: 240 steps, 8 updates" in out.stdout
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["counters"]["global_step"] == 240 and state["args"]["episode_length"] == 10  # the saved flags were used


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--ml1-task", "not-a-task-v3"], "unknown --ml1-task"),
        (["--context-len", "0"], "--context-len 0 is out of range: it must be an integer >= 1"),
        (["--k-episodes", "0"], "--k-episodes must be positive"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(flags, message, tmp_path):
    out = run([*TINY, *flags], tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
