"""The learning benchmark's demo commands (tests/tools/bench_learning.py), which the README prints as the way to
reproduce each result: each names every flag once (a repeated flag is silently overridden by the later one, so a reader
copying the command cannot tell which value ran), and each is accepted by its script's own checks."""

import importlib
import os
import sys

import pytest
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import bench_learning  # noqa: E402

CONFIGS = [(name, config) for name, bench in bench_learning.BENCHMARKS.items() for config in bench["configs"]]


@pytest.mark.parametrize("name,config", CONFIGS)
def test_demo_command_names_each_flag_once_and_is_valid(name, config):
    bench = bench_learning.BENCHMARKS[name]
    flags = bench["configs"][config]
    names = [f for f in flags if f.startswith("--")]
    assert sorted(names) == sorted(set(names)), f"repeated: {sorted({f for f in names if names.count(f) > 1})}"
    script = importlib.import_module(bench["script"].removesuffix(".py"))
    args = script.resolve_args(tyro.cli(script.Args, args=flags))  # exits with code 2 on a bad value
    assert args.total_timesteps < script.Args.total_timesteps  # a CPU demo, not the paper-size run


def test_adaptation_gain_is_the_last_attempt_minus_the_first_over_the_second_half(tmp_path, monkeypatch):
    """Four evaluations with attempt-1 returns 1, 2, 3, 4 and attempt-3 returns 1, 4, 9, 16: the second half's gains
    are 9 - 3 and 16 - 4; a run that never logged per-attempt returns gives none."""
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(bench_learning, "ROOT", str(tmp_path))
    writer = SummaryWriter(str(tmp_path / "runs" / "gain"))
    for step, r in enumerate([1.0, 2.0, 3.0, 4.0]):
        writer.add_scalar("eval/train/return_1", r, step)
        writer.add_scalar("eval/train/return_3", r * r, step)
    writer.close()
    gains = bench_learning.adaptation_gain("gain", "eval/train/return_1", "eval/train/return_3")
    assert gains.tolist() == [6.0, 12.0]
    assert bench_learning.adaptation_gain("gain", "eval/train/return_1", "eval/test/return_3").size == 0


def test_only_seed_outside_the_reported_seeds_is_refused(monkeypatch, capsys):
    """--only-seed 3 with --seeds 2 would train a run the report never reads: refused in one line, nothing launched."""
    monkeypatch.setattr(bench_learning, "launch", lambda *a: pytest.fail("launched a run"))
    monkeypatch.setattr(sys, "argv", ["bench_learning.py", "popgym", "--seeds", "2", "--only-seed", "3"])
    with pytest.raises(SystemExit) as exit_info:
        bench_learning.main()
    assert exit_info.value.code == 2 and "--only-seed must be one of the seeds 1..--seeds (2)" in capsys.readouterr().err


def test_a_run_already_there_is_refused_before_anything_trains(tmp_path, monkeypatch, capsys):
    """Training seed 2 again into runs/bench-popgym-indind-s2 would mix two runs' events in one report: refused in one
    line naming the folder, and seed 1 (not there) is not launched either."""
    monkeypatch.setattr(bench_learning, "ROOT", str(tmp_path))
    (tmp_path / "runs" / "bench-popgym-indind-s2").mkdir(parents=True)
    monkeypatch.setattr(bench_learning, "launch", lambda *a: pytest.fail("launched a run"))
    monkeypatch.setattr(sys, "argv", ["bench_learning.py", "popgym", "--seeds", "2"])
    with pytest.raises(SystemExit) as exit_info:
        bench_learning.main()
    assert exit_info.value.code == 2 and "runs/bench-popgym-indind-s2 exists (1 of these runs do)" in capsys.readouterr().err


class Launched:
    """What launch() was asked to start; each 'run' fails at once, so main() stops before reading any results."""

    def __init__(self):
        self.calls = []

    def __call__(self, script, flags, name, seed, resume=False):
        self.calls.append((name, resume))
        return type("Proc", (), {"poll": lambda self: 1, "wait": lambda self: 1})()


def test_resume_goes_on_with_interrupted_runs_keeps_finished_ones_and_starts_missing_ones(tmp_path, monkeypatch):
    """Seed 1 finished (its log ends with 'done:'), seed 2 was killed after a checkpoint, seed 3 never started:
    --resume continues seed 2 from its checkpoint, starts seed 3 and leaves seed 1 alone."""
    monkeypatch.setattr(bench_learning, "ROOT", str(tmp_path))
    runs = tmp_path / "runs"
    (runs / "bench-popgym-indind-s1").mkdir(parents=True)
    (runs / "bench-popgym-indind-s1.log").write_text("eval: score 0.3\ndone: 120,000 steps\n")
    (runs / "bench-popgym-indind-s2" / "checkpoint").mkdir(parents=True)
    (runs / "bench-popgym-indind-s2" / "checkpoint" / "state.pt").write_bytes(b"x")
    (runs / "bench-popgym-indind-s2.log").write_text("eval: score 0.1\n 40%|####      | 48,000/120,000\r")
    launched = Launched()
    monkeypatch.setattr(bench_learning, "launch", launched)
    monkeypatch.setattr(sys, "argv", ["bench_learning.py", "popgym", "--seeds", "3", "--config", "ind/ind", "--resume"])
    with pytest.raises(SystemExit, match="runs failed"):
        bench_learning.main()
    assert launched.calls == [("bench-popgym-indind-s2", True), ("bench-popgym-indind-s3", False)]


def test_resume_of_a_run_with_no_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_learning, "ROOT", str(tmp_path))
    (tmp_path / "runs" / "bench-popgym-indind-s1").mkdir(parents=True)
    (tmp_path / "runs" / "bench-popgym-indind-s1.log").write_text(" 40%|####      | 48,000/120,000\r")
    monkeypatch.setattr(bench_learning, "launch", lambda *a, **k: pytest.fail("launched a run"))
    monkeypatch.setattr(sys, "argv", ["bench_learning.py", "popgym", "--seeds", "1", "--config", "ind/ind", "--resume"])
    with pytest.raises(SystemExit) as exit_info:
        bench_learning.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "bench-popgym-indind-s1 was interrupted with no checkpoint to resume" in err


def test_every_run_is_checkpointed_at_its_evaluations_and_resumes_from_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_learning, "ROOT", str(tmp_path))
    (tmp_path / "runs").mkdir()
    started = []
    monkeypatch.setattr(bench_learning.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    flags = bench_learning.BENCHMARKS["popgym"]["configs"]["ind/ind"]
    bench_learning.launch("amago2_popgym.py", flags, "r", 2)
    bench_learning.launch("amago2_popgym.py", flags, "r", 2, resume=True)
    fresh, resumed = started
    assert fresh[-3:] == ["--save-model", "--checkpoint-every", "25000"] and fresh[fresh.index("--seed") + 1] == "2"
    assert resumed[1:] == ["amago2_popgym.py", "--resume", os.path.join("runs", "r")]


def test_wall_minutes_leave_out_the_pause_between_an_interruption_and_its_resume(tmp_path, monkeypatch):
    """Losses every minute, an evaluation at the second and last minute, and an hour's pause in between: 3 minutes."""
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(bench_learning, "ROOT", str(tmp_path))
    writer = SummaryWriter(str(tmp_path / "runs" / "paused"))
    for step, t in enumerate([0, 60, 120, 3720, 3780]):
        writer.add_scalar("losses/critic", 1.0, step, walltime=1e9 + t)
    writer.add_scalar("eval/score", 0.1, 2, walltime=1e9 + 120)
    writer.add_scalar("eval/score", 0.2, 4, walltime=1e9 + 3780)
    writer.close()
    steps, values, minutes = bench_learning.read_curve("paused", "eval/score")
    assert steps.tolist() == [2, 4] and values.tolist() == pytest.approx([0.1, 0.2]) and minutes == pytest.approx(3.0)
