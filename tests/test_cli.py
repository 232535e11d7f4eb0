"""Every script from the command line, the way a user runs it: scripts x cases. Each script's tiny config runs two
epochs of 2 envs with 2 updates each; what is specific to one benchmark is in its test_cli_<benchmark>.py."""

import os

import numpy as np
import pytest
import torch
from cli import run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# a model small enough for seconds per run; the scripts' own sizes are the paper's
MODEL = (
    "--updates-per-epoch 2 --d-model 32 --d-ff 64 --n-layers 1 --n-heads 2 --d-token 24 --num-bins 16 --head-hidden 32 "
    "--buffer-size 1000 --eval-episodes 1 --eval-every 0"
).split()

SCRIPTS = {
    # env flags and steps (total-timesteps = 2 epochs x 2 envs x steps-per-epoch); the evaluation line's first key;
    # `tags`: TensorBoard scalars of the run; `variant`: the benchmark's own options, run with bf16, async envs and a
    # disk-backed buffer, and `variant_out` (where given) in its output;
    # `bad`: the benchmark's own names and options that must be refused in one line
    "popgym": dict(
        flags="--tasks RepeatPreviousEasy MineSweeperEasy --num-envs 2 --steps-per-epoch 40 --context-len 12 --batch-size 3",
        steps=160,
        eval=["eval: return_mean"],
        tags=["eval/RepeatPreviousEasy/return", "eval/normalised_score"],
        variant=["--no-one-shot"],
        bad=[
            (["--tasks", "NotATask"], "unknown POPGym task"),
            (["--reward-scales", "RepeatPreviousEasy", "-1"], "a positive finite factor"),
            (["--reward-scales", "HigherLowerEasy", "2"], "a task trained on"),
        ],
    ),
    "metaworld": dict(
        flags="--benchmark ML1 --ml1-task reach-v3 --episode-length 10 --num-envs 2 --steps-per-epoch 30 --context-len 12 "
        "--batch-size 3",
        steps=120,
        eval=["eval: train/success_1", "test/success ", "test/skill_coverage"],  # ML1: train and held-out goals apart
        tags=["eval/reach-v3/success_3", "eval/test/reach-v3/success", "eval/train/return"],
        variant=["--eps-rollout-floor", "0.5"],
        bad=[
            (["--ml1-task", "not-a-task-v3"], "unknown --ml1-task"),
            (["--k-episodes", "0"], "--k-episodes must be positive"),
        ],
    ),
    "procgen": dict(
        flags="--games coinrun leaper --impala-channels 4 4 4 --horizon 30 --num-envs 2 --steps-per-epoch 20 --context-len 8 "
        "--batch-size 2",
        steps=80,
        eval=["eval: norm_1_mean", "norm_2_mean"],
        tags=["eval/leaper/norm_2", "charts/experience_share/coinrun"],
        variant=["--augment-fraction", "1.0"],
        bad=[
            (["--games", "coinrun", "pong"], "unknown Procgen game"),
            (["--reward-scales", "maze", "2"], "a game played"),
            (["--impala-channels", "4", "6", "4"], "--impala-channels must be positive multiples of 4"),
        ],
    ),
    "atari": dict(
        flags="--games Breakout Qbert --num-envs 2 --steps-per-epoch 20 --context-len 8 --batch-size 2",
        steps=80,
        eval=["eval: hns_mean", "hns_median"],
        tags=["eval/Qbert/hns", "eval/hns_median"],
        variant=["--clip-rewards", "--augment-fraction", "1.0"],
        bad=[
            (["--games", "Breakout", "NotAGame"], "unknown Atari game"),
            (["--num-envs", "3"], "must be a multiple of the 2 games"),
            (["--buffer-size", "1000000000"], "GiB of RAM (frames compressed"),
            (["--augment-fraction", "1.5"], "--augment-fraction must be in [0, 1]"),
        ],
    ),
    "babyai": dict(
        # GoToLocalS7N5 and held-out GoToRedBallGrey: short time limits
        flags="--eval-tasks-per-split 1 --num-envs 2 --steps-per-epoch 40 --context-len 12 --batch-size 3",
        steps=160,
        eval=["eval: train_return_1_median", "test_return_2_iqm"],
        tags=["eval/GoToLocalS7N5/return_2", "eval/test/GoToRedBallGrey/return_1", "eval/test_success_2_mean"],
        variant=["--k-episodes", "3"],
        variant_out="test_return_3_mean",  # three attempts, summarised by attempt
        bad=[
            (["--k-episodes", "0"], "--k-episodes must be positive"),
            (["--eval-tasks-per-split", "0"], "--eval-tasks-per-split must be positive"),
            (["--tasks", "GoToRedBallGrey"], "--tasks: unknown task(s) ['GoToRedBallGrey']"),  # a held-out task
            (["--test-tasks", "NoSuchTask"], "--test-tasks: unknown task(s)"),
        ],
    ),
}
COMBINATIONS = [("ind", "ind"), ("ind", "dep"), ("dep", "ind"), ("dep", "dep")]


def tiny(name: str) -> list:
    spec = SCRIPTS[name]
    return [*spec["flags"].split(), *MODEL, "--total-timesteps", str(spec["steps"])]


def run(name: str, args: list, cwd):
    return run_script(f"amago2_{name}.py", args, cwd)


def scalar_tags(run_dir) -> set:
    return set(EventAccumulator(str(run_dir)).Reload().Tags()["scalars"])


@pytest.mark.parametrize("actor_loss,critic_loss", COMBINATIONS)
@pytest.mark.parametrize("name", SCRIPTS)
def test_loss_combinations_run(name, actor_loss, critic_loss, tmp_path):
    out = run(name, [*tiny(name), "--actor-loss", actor_loss, "--critic-loss", critic_loss, "--run-name", "r"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"done: {SCRIPTS[name]['steps']} steps, 4 updates" in out.stdout
    assert all(fragment in out.stdout for fragment in SCRIPTS[name]["eval"])
    assert "; final eval: " in out.stdout.splitlines()[-1]  # the summary line ends with the eval score
    assert "note: a paper-size model" not in out.stdout  # a cut-down model on CPU: no GPU-job warning
    tags = scalar_tags(tmp_path / "runs" / "r")
    expected = {"losses/actor", "losses/critic", "losses/q_mean", "losses/policy_entropy", "losses/td_target_mean"}
    expected |= {"losses/policy_entropy_acting", "losses/grad_norm", "losses/grad_norm_actor", "losses/grad_norm_critic"}
    continuous = {"losses/policy_abs_mu_acting", "losses/policy_log_sigma_acting"}
    expected |= continuous if name == "metaworld" else {"losses/policy_max_prob_acting"}
    expected |= {"losses/crr_kept_fraction", "losses/crr_kept_fraction_acting"} if actor_loss == "ind" else set()
    expected |= set(SCRIPTS[name]["tags"])  # per task and summary evaluation scalars
    assert expected <= tags, expected - tags


def test_compile_runs_the_whole_loop(tmp_path):
    """--compile from the command line: the logged update's two extra backward passes (grad_norms) go through the
    compiled critics' graph, which torch.compile's donated buffers would otherwise refuse."""
    out = run("popgym", [*tiny("popgym"), "--compile", "--run-name", "c"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert {"losses/grad_norm_actor", "losses/grad_norm_critic"} <= scalar_tags(tmp_path / "runs" / "c")


@pytest.mark.parametrize("name", SCRIPTS)
def test_bf16_async_disk_buffer(name, tmp_path):
    """The options a paper-size run uses, with the non-default replay draw: one run, the buffer really is on disk and
    draws per timestep."""
    flags = ["--precision", "bf16", "--async-envs", "--buffer-dir", "buf", "--replay-sampling", "timestep"]
    out = run(name, [*tiny(name), *flags, *SCRIPTS[name]["variant"]], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "memory-mapped in buf" in out.stdout and "windows drawn per timestep" in out.stdout
    if "variant_out" in SCRIPTS[name]:
        assert SCRIPTS[name]["variant_out"] in out.stdout
    assert f"done: {SCRIPTS[name]['steps']} steps, 4 updates" in out.stdout
    if name in ("atari", "procgen"):  # frames are stored compressed, in an SQLite file beside the other fields
        assert (tmp_path / "buf" / "image.sqlite").exists() and not (tmp_path / "buf" / "image.npy").exists()
    rollout_id = np.load(tmp_path / "buf" / "rollout_id.npy", mmap_mode="r")
    stored = rollout_id[rollout_id >= 0]  # every step is stored, plus each meta-rollout's first observation
    assert rollout_id.shape[1] == 2 and len(stored) == SCRIPTS[name]["steps"] + len(np.unique(stored))


def wandb_runs(tmp_path) -> dict:
    """The offline wandb runs under tmp_path/wandb: run id -> the bytes of each of its .wandb files (one per process)."""
    runs = {}
    for folder in sorted((tmp_path / "wandb").glob("offline-run-*")):
        runs.setdefault(folder.name.rsplit("-", 1)[1], []).append(next(folder.glob("run-*.wandb")).read_bytes())
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_save_then_resume_continues(name, tmp_path, monkeypatch):
    """--save-model, --resume (the same wandb run under --track, offline here), then --eval-only on the checkpoint."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    steps = SCRIPTS[name]["steps"]
    flags = [*tiny(name), "--save-model", "--checkpoint-every", str(steps // 2), "--run-name", "r", "--track"]
    out = run(name, flags, tmp_path)
    assert out.returncode == 0, out.stderr
    (run_id, logs), *others = wandb_runs(tmp_path).items()
    assert not others and b"losses/actor" in logs[0] and b"eval/" in logs[0]  # the TensorBoard scalars, mirrored
    ckpt = tmp_path / "runs" / "r" / "checkpoint"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["counters"] == {"global_step": steps, "updates": 4}
    saved_ids = np.load(ckpt / "rank0" / state["buffer"] / "rollout_id.npy")  # one process: rank 0's shard
    out = run(name, ["--resume", "runs/r", "--total-timesteps", str(2 * steps)], tmp_path)  # no other flag
    assert out.returncode == 0, out.stderr
    assert f"resumed runs/r at step {steps} after 4 updates" in out.stdout
    assert f"done: {2 * steps} steps, 8 updates" in out.stdout
    state2 = torch.load(ckpt / "state.pt", weights_only=False)
    assert state2["counters"] == {"global_step": 2 * steps, "updates": 8}
    assert state2["args"]["d_model"] == 32 and state2["args"]["total_timesteps"] == 2 * steps  # the saved flags
    ids = np.load(ckpt / "rank0" / state2["buffer"] / "rollout_id.npy")
    kept = saved_ids >= 0  # the resumed run kept the old data and appended after it with fresh rollout ids
    assert (ids[kept] == saved_ids[kept]).sum() > 0 and ids.max() > saved_ids.max()
    assert sorted(os.listdir(ckpt)) == ["rank0", "state.pt"]
    assert os.listdir(ckpt / "rank0") == [state2["buffer"]]  # older snapshots removed
    assert list(wandb_runs(tmp_path)) == [run_id] and len(wandb_runs(tmp_path)[run_id]) == 2  # resumed: the same run

    saved = (ckpt / "state.pt").read_bytes()
    video = [] if name == "popgym" else ["--capture-video"]  # POPGym has no frames (refused: the next test)
    out = run(name, ["--resume", "runs/r", "--eval-only", "--eval-episodes", "2", *video], tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"eval-only: r at step {2 * steps:,}: " in out.stdout and "resumed" not in out.stdout
    assert (ckpt / "state.pt").read_bytes() == saved and sorted(os.listdir(ckpt)) == ["rank0", "state.pt"]
    assert {t for t in SCRIPTS[name]["tags"] if t.startswith("eval/")} <= scalar_tags(tmp_path / "runs" / "r" / "eval_only")
    if video:  # one file per scored meta-rollout of the first evaluation task, every attempt in it
        from moviepy import VideoFileClip

        files = sorted((tmp_path / "runs" / "r" / "videos").glob("*.mp4"))
        frames = [VideoFileClip(str(f)).reader.n_frames for f in files]
        assert len(files) == 2 and min(frames) >= 2, frames
        if name == "metaworld":  # fixed length: k = 3 attempts of 10 steps, a frame per step
            assert frames == [30, 30]


def test_eval_only_refuses_what_it_cannot_evaluate(tmp_path):
    """No run folder, a damaged state.pt, another script's checkpoint, no --resume: one error line each."""
    assert run("popgym", [*tiny("popgym"), "--save-model", "--run-name", "r"], tmp_path).returncode == 0
    state = tmp_path / "runs" / "r" / "checkpoint" / "state.pt"
    cases = [
        ("popgym", ["--eval-only"], "--eval-only evaluates a saved run"),
        ("babyai", ["--resume", "runs/r", "--eval-only"], "the checkpoint was written by amago2_popgym.py; use that script"),
        ("popgym", ["--resume", "runs/r", "--eval-only", "--capture-video"], "POPGym's tasks have no frames"),
    ]
    for name, flags, message in cases:
        out = run(name, flags, tmp_path)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    saved = torch.load(state, weights_only=False)
    torch.save({k: v for k, v in saved.items() if k != "script"}, state)  # written before checkpoints named their script
    assert (
        "the checkpoint was written by another script" in run("babyai", ["--resume", "runs/r", "--eval-only"], tmp_path).stderr
    )
    assert run("popgym", ["--resume", "runs/r", "--eval-only", "--eval-episodes", "1"], tmp_path).returncode == 0
    state.write_bytes(state.read_bytes()[:1000])  # a copy cut short
    out = run("popgym", ["--resume", "runs/r", "--eval-only"], tmp_path)
    assert out.returncode == 2 and "state.pt is damaged" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", SCRIPTS)
def test_unusable_buffer_dir_is_refused_in_one_line(name, tmp_path):
    """The buffer creates its folder and files; an --buffer-dir where it cannot is a bad flag, not a traceback."""
    (tmp_path / "file").write_text("")
    out = run(name, [*tiny(name), "--buffer-dir", "file/buffer"], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: --buffer-dir file/buffer cannot be created or written (Not a directory)" in out.stderr


COMMON_BAD = [
    (["--context-len", "0"], "--context-len 0 is out of range: it must be an integer >= 1"),
    (["--eval-only"], "--eval-only evaluates a saved run under plain python: give its folder, --resume runs/<run_name>"),
    (["--batch-size", "500"], "cannot serve batches"),
    (["--resume", "runs/nothing-here"], "no checkpoint"),
]


@pytest.mark.parametrize(
    "name,flags,message",
    [(name, f, m) for name in SCRIPTS for f, m in COMMON_BAD[:2] + SCRIPTS[name]["bad"]]
    + [("popgym", *b) for b in COMMON_BAD[2:]],
)
def test_bad_flags_exit_with_a_clear_message(name, flags, message, tmp_path):
    out = run(name, [*tiny(name), *flags], tmp_path)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_a_buffer_outgrowing_free_memory_stops_with_a_checkpoint(tmp_path):
    """The replay buffer's memory guard from the command line: free RAM (faked) that is plenty at start-up and gone once
    the buffer fills stops the run with one error line, and --save-model leaves a checkpoint to resume from."""
    (tmp_path / "low_ram.py").write_text(
        "import runpy, sys\n"
        "import common.replay as replay\n"
        "calls = []\n"
        "def free():  # the start-up check sees 1 TB, every later check none\n"
        "    calls.append(1)\n"
        "    return 10**12 if len(calls) == 1 else 0\n"
        "replay.available_ram_bytes = free\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "amago2_atari.py")
    out = run_script(str(tmp_path / "low_ram.py"), [script, *tiny("atari"), "--save-model", "--run-name", "r"], tmp_path)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "GiB more to fill" in errors[0] and "Traceback" not in out.stderr
    state = torch.load(tmp_path / "runs" / "r" / "checkpoint" / "state.pt", weights_only=False)
    assert state["counters"]["updates"] == 0 and 0 < state["counters"]["global_step"] < SCRIPTS["atari"]["steps"]
