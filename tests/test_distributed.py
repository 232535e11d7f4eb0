"""Data-parallel training under torchrun (gloo, 2 processes on CPU): every rank holds the same agent after updates,
each rank keeps its own replay shard, a 2-rank run resumes under 2 ranks, and a different world size is refused."""

import json
import os

import numpy as np
import pytest
import torch
from cli import ROOT, run_script
from test_cli import SCRIPTS, tiny

NPROC = 2


def checkpoint(tmp_path, name="r"):
    return tmp_path / "runs" / name / "checkpoint"


def shard(folder, rank: int, step: int) -> tuple[dict, np.ndarray]:
    """A rank's buffer snapshot: its state.json and its actions (rows, envs, ...)."""
    path = folder / f"rank{rank}" / f"buffer-{step}"
    return json.loads((path / "state.json").read_text()), np.load(path / "prev_action.npy")


def test_collectives_on_two_ranks(tmp_path):
    """What DDP training relies on, on 2 gloo ranks: PopArt and input statistics average rows, not ranks (rank 0 holds
    1 and 2, rank 1 holds 6: mean 3, not 4.5); a NaN on one rank makes the gradient norm NaN on both once the gradients
    are all-reduced (as DDP's backward does), so the scripts' non-finite check stops every rank at the same update."""
    (tmp_path / "check.py").write_text(
        "import torch, torch.distributed as dist\n"
        "import amago2_popgym as A\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        "x = torch.tensor([[1.0, 10.0], [2.0, 20.0]]) if r == 0 else torch.tensor([[6.0, 60.0]])\n"
        "mean, n = A.mean_over_ranks(x)\n"
        "net = torch.nn.Linear(2, 1)\n"
        "net(torch.tensor([[float('nan') if r == 1 else 1.0, 1.0]])).sum().backward()\n"
        "[dist.all_reduce(p.grad) for p in net.parameters()]\n"
        "norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)\n"
        "print(f'rank {r}: {mean.tolist()} {n} finite {bool(torch.isfinite(norm))}')\n"
        "dist.destroy_process_group()\n"
    )
    out = run_script(str(tmp_path / "check.py"), [], tmp_path, nproc=NPROC)
    assert out.returncode == 0, out.stderr
    for r in range(NPROC):
        assert f"rank {r}: [3.0, 30.0] 3 finite False" in out.stdout


# one state-based script (input statistics), one pixel script and BabyAI's multi-modal encoder; the torchrun code is
# shared core, and every encoder's parameters all get gradients (test_<benchmark>_env.py), as DDP requires
@pytest.mark.parametrize("name", ["popgym", "procgen", "babyai"])
def test_two_ranks_hold_the_same_agent(name, tmp_path):
    """After updates on different data, every parameter and buffer (PopArt, input statistics, EMA heads) is bitwise
    the same on both ranks; steps count both ranks; one event file; each rank's shard holds its own envs' data."""
    steps = 2 * SCRIPTS[name]["steps"]  # two epochs of both ranks
    (tmp_path / "keep_agent.py").write_text(  # run the script, then save this rank's agent for the comparison below
        "import os, runpy, sys, torch\n"
        "sys.argv = sys.argv[1:]\n"
        "agent = runpy.run_path(sys.argv[0], run_name='__main__')['agent']\n"
        "torch.save(agent.state_dict(), f'agent{os.environ[\"RANK\"]}.pt')\n"
    )
    flags = [*tiny(name), "--total-timesteps", str(steps), "--save-model", "--run-name", "r"]
    out = run_script(str(tmp_path / "keep_agent.py"), [os.path.join(ROOT, f"amago2_{name}.py"), *flags], tmp_path, NPROC)
    assert out.returncode == 0, out.stderr
    assert f"done: {steps:,} steps, 4 updates" in out.stdout and out.stdout.count("done:") == 1  # rank 0 alone reports
    state = torch.load(checkpoint(tmp_path) / "state.pt", weights_only=False)
    assert state["world_size"] == NPROC and state["counters"] == {"global_step": steps, "updates": 4}
    for r in range(NPROC):  # every rank's agent, bitwise, against the one rank 0 saved
        agent = torch.load(tmp_path / f"agent{r}.pt")
        assert agent.keys() == state["agent"].keys()
        assert all(torch.equal(v, state["agent"][k]) for k, v in agent.items()), r
    assert state["agent"]["popart.updates"].item() == 1 + 4  # statistics that moved are among those compared
    assert not torch.equal(state["agent"]["popart.mu"], torch.zeros_like(state["agent"]["popart.mu"]))
    events = [f for f in os.listdir(tmp_path / "runs" / "r") if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    (meta0, actions0), (meta1, actions1) = shard(checkpoint(tmp_path), 0, steps), shard(checkpoint(tmp_path), 1, steps)
    assert sum(meta0["size"]) > 0 and sum(meta1["size"]) > 0
    assert not np.array_equal(actions0, actions1)  # each rank acts in its own envs with its own random draws
    rng0, rng1 = (
        torch.load(checkpoint(tmp_path) / f"rank{r}" / f"buffer-{steps}" / "rng.pt", weights_only=False) for r in (0, 1)
    )
    assert rng0["numpy"] != rng1["numpy"]  # each rank's random state, beside its own shard


def test_resume_under_two_ranks_restores_each_shard_and_refuses_another_world_size(tmp_path):
    flags = [*tiny("popgym"), "--total-timesteps", "320", "--save-model", "--run-name", "r"]
    out = run_script("amago2_popgym.py", flags, tmp_path, NPROC)
    assert out.returncode == 0, out.stderr
    before = [shard(checkpoint(tmp_path), r, 320) for r in range(NPROC)]
    out = run_script("amago2_popgym.py", ["--resume", "runs/r", "--total-timesteps", "640"], tmp_path)  # plain python
    assert out.returncode == 2 and out.stderr == (
        "error: --resume runs/r: the run was saved by 2 rank(s) and this job has 1; "
        "resume it with torchrun with 2 ranks in all (e.g. --nproc-per-node 2)\n"
    )
    out = run_script("amago2_popgym.py", ["--resume", "runs/r", "--total-timesteps", "640"], tmp_path, NPROC)
    assert out.returncode == 0, out.stderr
    assert "resumed runs/r at step 320 after 4 updates" in out.stdout and "done: 640 steps, 8 updates" in out.stdout
    assert sorted(os.listdir(checkpoint(tmp_path) / "rank0")) == ["buffer-640"]  # the older snapshot went
    for r, (meta, actions) in enumerate(before):
        meta_after, actions_after = shard(checkpoint(tmp_path), r, 640)
        for env, size in enumerate(meta["size"]):  # the rank's old rows are still there, new ones after them
            assert meta_after["size"][env] > size
            np.testing.assert_array_equal(actions_after[:size, env], actions[:size, env])


def test_epsilon_anneals_over_each_envs_own_steps(monkeypatch):
    """--eps-anneal-steps counts steps per env; under 2 ranks the job's step count holds twice as many envs."""
    import amago2_popgym as A

    args = A.Args(num_envs=4, eps_anneal_steps=100)
    halfway = (args.eps_start + args.eps_end) / 2
    assert A.epsilon(args, 4 * 50) == pytest.approx(halfway)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert A.epsilon(args, 2 * 4 * 50) == pytest.approx(halfway)
