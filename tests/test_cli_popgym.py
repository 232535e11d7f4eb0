"""amago2_popgym.py from the command line: every loss combination, save + resume, bad flags."""

import os

import numpy as np
import pytest
import torch
from cli import run_script

TINY = [
    "--tasks",
    "RepeatPreviousEasy",
    "MineSweeperEasy",
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
    "--total-timesteps",
    "160",
]  # two epochs of 2 envs x 40 steps, 2 updates each


def run(args, cwd):
    return run_script("amago2_popgym.py", args, cwd)


@pytest.mark.parametrize("actor_loss,critic_loss", [("ind", "ind"), ("ind", "dep"), ("dep", "ind"), ("dep", "dep")])
def test_loss_combinations_run(actor_loss, critic_loss, tmp_path):
    out = run([*TINY, "--actor-loss", actor_loss, "--critic-loss", critic_loss], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 160 steps, 4 updates" in out.stdout
    assert "eval: return_mean" in out.stdout
    assert "; final eval: return_mean " in out.stdout.splitlines()[-1]  # the summary line ends with the eval score


def test_full_recompute_bf16_async(tmp_path):
    out = run([*TINY, "--no-kv-cache", "--precision", "bf16", "--async-envs", "--no-one-shot"], tmp_path)
    assert out.returncode == 0, out.stderr


def test_save_then_resume_continues(tmp_path):
    out = run([*TINY, "--save-model", "--checkpoint-every", "80", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "runs" / "r" / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["counters"]["global_step"] == 160 and state["counters"]["updates"] == 4
    saved_ids = np.load(ckpt / state["buffer"] / "rollout_id.npy")
    out = run(["--resume", "runs/r", "--total-timesteps", "320"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "resumed runs/r at step 160 after 4 updates" in out.stdout
    assert "done: 320 steps, 8 updates" in out.stdout
    state2 = torch.load(ckpt / "state.pt", weights_only=False)
    assert state2["counters"]["global_step"] == 320 and state2["args"]["d_model"] == 32  # the saved flags were used
    ids = np.load(ckpt / state2["buffer"] / "rollout_id.npy")
    # the resumed run kept the old data and appended after it with fresh rollout ids
    kept = saved_ids >= 0
    assert (ids[kept] == saved_ids[kept]).sum() > 0 and ids.max() > saved_ids.max()
    assert len(os.listdir(ckpt)) == 2  # state.pt and the one buffer snapshot it names


def test_resume_reproduces_the_saved_state(tmp_path):
    import amago2_popgym as A

    out = run([*TINY, "--save-model", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    state = torch.load(tmp_path / "runs" / "r" / "checkpoint" / "state.pt", weights_only=False)
    args = A.Args(**state["args"])
    env = A.POPGymMetaEnv(args.tasks)
    agent = A.Agent(env.observation_space, env.action_space.n, args)
    opt = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    buffer = A.ReplayBuffer(A.replay_fields(env.observation_space, env.action_space), args.buffer_size, args.num_envs)
    rng = np.random.default_rng(123)
    global_step, updates = A.load_checkpoint(str(tmp_path / "runs" / "r"), agent, opt, sched, buffer, rng)
    assert (global_step, updates) == (160, 4)
    for k, v in state["agent"].items():
        assert torch.equal(agent.state_dict()[k], v), k
    assert agent.encoder.norm.count.item() > 0  # input statistics restored
    assert agent.popart.updates.item() == 1 + 4  # PopArt follows the TD targets on every update, whatever the critic
    assert opt.state_dict()["state"][0]["step"].item() == 4
    assert rng.bit_generator.state == state["rng"]["numpy"]
    assert buffer.num_timesteps() > 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tasks", "NotATask"], "unknown POPGym task"),
        (["--reward-scales", "RepeatPreviousEasy:100"], "is not NAME=FACTOR"),
        (["--reward-scales", "RepeatPreviousEasy=-1"], "positive finite"),
        (["--reward-scales", "HigherLowerEasy=2"], "not trained on"),
        (["--context-len", "0"], "--context-len 0 is out of range: it must be an integer >= 1"),
        (["--batch-size", "500"], "cannot serve batches"),
        (["--rollout-gamma", "0.5"], "must be one of --gammas"),
        (["--resume", "runs/nothing-here"], "no checkpoint"),
    ],
)
def test_bad_flags_exit_with_a_clear_message(flags, message, tmp_path):
    out = run([*TINY, *flags], tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_fresh_run_refuses_a_used_buffer_dir(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "obs.npy").write_bytes(b"x")
    out = run([*TINY, "--buffer-dir", "old"], tmp_path)
    assert out.returncode == 2 and "already holds a replay buffer" in out.stderr and "Traceback" not in out.stderr


def test_disk_backed_buffer_run_and_resume(tmp_path):
    out = run([*TINY, "--buffer-dir", "buf", "--save-model", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "memory-mapped in buf" in out.stdout
    out = run(["--resume", "runs/r", "--total-timesteps", "320"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "done: 320 steps, 8 updates" in out.stdout
