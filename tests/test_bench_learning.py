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
