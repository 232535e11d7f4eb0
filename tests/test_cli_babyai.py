"""amago2_babyai.py from the command line: every loss combination, async envs, save + resume, bad flags."""

import pytest
import torch
from cli import run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TINY = [
    "--num-envs",
    "2",
    "--steps-per-epoch",
    "40",
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
    "--eval-tasks-per-split",
    "1",  # GoToLocalS7N5 and held-out GoToRedBallGrey: short time limits
    "--total-timesteps",
    "160",
]  # two epochs of 2 envs x 40 steps, 2 updates each


def run(args, cwd):
    return run_script("amago2_babyai.py", args, cwd)


@pytest.mark.parametrize("actor_loss,critic_loss", [("ind", "ind"), ("ind", "dep"), ("dep", "ind"), ("dep", "dep")])
def test_loss_combinations_run(actor_loss, critic_loss, tmp_path):
    out = run([*TINY, "--actor-loss", actor_loss, "--critic-loss", critic_loss, "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 160 steps, 4 updates" in out.stdout
    assert "eval: train_return_1_median" in out.stdout and "test_return_2_iqm" in out.stdout
    if (actor_loss, critic_loss) == ("ind", "ind"):
        tags = EventAccumulator(str(tmp_path / "runs" / "r")).Reload().Tags()["scalars"]
        for tag in [
            "eval/GoToLocalS7N5/return_2",
            "eval/test/GoToRedBallGrey/return_1",
            "eval/train_return_1_iqm",
            "eval/test_return_2_median",
            "eval/test_success_2_mean",
            "losses/crr_kept_fraction",
        ]:
            assert tag in tags, tag


def test_async_envs_full_recompute(tmp_path):
    out = run([*TINY, "--async-envs", "--no-kv-cache", "--k-episodes", "3"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "test_return_3_mean" in out.stdout  # three attempts, summarised by attempt


def test_save_then_resume_continues(tmp_path):
    out = run([*TINY, "--save-model", "--checkpoint-every", "80", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "runs" / "r" / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["counters"]["global_step"] == 160 and state["counters"]["updates"] == 4
    out = run(["--resume", "runs/r", "--total-timesteps", "320"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resumed runs/r at step 160 after 4 updates" in out.stdout
    assert "done: 320 steps, 8 updates" in out.stdout
    state2 = torch.load(ckpt / "state.pt", weights_only=False)
    assert state2["counters"]["global_step"] == 320 and state2["counters"]["updates"] == 8
    assert state2["args"]["d_model"] == 32 and state2["args"]["k_episodes"] == 2  # the saved flags were used


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--context-len", "0"], "--context-len 0 is out of range: it must be an integer >= 1"),
        (["--k-episodes", "0"], "--k-episodes must be positive"),
        (["--eval-tasks-per-split", "0"], "--eval-tasks-per-split must be positive"),
        (["--tasks", "GoToRedBallGrey"], "--tasks: unknown task(s) ['GoToRedBallGrey']"),  # a held-out task
        (["--test-tasks", "NoSuchTask"], "--test-tasks: unknown task(s)"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(flags, message, tmp_path):
    out = run([*TINY, *flags], tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_task_subsets(tmp_path):
    """--tasks trains on a subset; evaluation covers exactly --tasks and --test-tasks."""
    out = run(
        [
            *TINY[:-4],
            "--total-timesteps",
            "80",
            "--tasks",
            "GoToRedBallNoDists",
            "OneRoomS8",
            "--test-tasks",
            "GoToObjS4",
            "--run-name",
            "sub",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    tags = EventAccumulator(str(tmp_path / "runs" / "sub")).Reload().Tags()["scalars"]
    evaluated = {
        t.split("/")[1] if not t.startswith("eval/test/") else "test/" + t.split("/")[2]
        for t in tags
        if t.endswith("/return_1") and t.count("/") >= 2
    }
    assert evaluated == {"GoToRedBallNoDists", "OneRoomS8", "test/GoToObjS4"}
    trained = {t.split("/")[1] for t in tags if t.startswith("tasks/")}
    assert trained <= {"GoToRedBallNoDists", "OneRoomS8"}
