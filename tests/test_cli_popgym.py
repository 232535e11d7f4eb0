"""amago2_popgym.py from the command line, what is specific to it (the matrix over all scripts: test_cli.py): a resumed
run restores every piece of state, a used --buffer-dir is refused, a disk-backed buffer is reopened on resume."""

import numpy as np
import torch
from test_cli import run as run_script
from test_cli import tiny

TINY = tiny("popgym")


def run(args, cwd):
    return run_script("popgym", args, cwd)


def test_resume_reproduces_the_saved_state(tmp_path):
    import amago2_popgym as A

    out = run([*TINY, "--save-model", "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    ckpt = tmp_path / "runs" / "r" / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=False)
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
    saved_rng = torch.load(ckpt / "rank0" / state["buffer"] / "rng.pt", weights_only=False)  # beside rank 0's shard
    assert rng.bit_generator.state == saved_rng["numpy"]
    assert buffer.num_timesteps() > 0
    # the run is done: resuming it as it is would train nothing, so it is refused in one line that says what to raise
    out = run(["--resume", "runs/r"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "the run is done (160 steps); raise --total-timesteps" in out.stderr


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
