"""amago2_babyai.py from the command line, what is specific to it (the matrix over all scripts: test_cli.py): training
and evaluation on task subsets."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import run as run_script
from test_cli import tiny

TINY = tiny("babyai")
# without --eval-tasks-per-split 1 (evaluation then covers exactly --tasks and --test-tasks) and its step budget
SUBSET_BASE = " ".join(TINY).replace("--eval-tasks-per-split 1 ", "").split()[:-2]


def run(args, cwd):
    return run_script("babyai", args, cwd)


def test_task_subsets(tmp_path):
    """--tasks trains on a subset; evaluation covers exactly --tasks and --test-tasks."""
    out = run(
        [
            *SUBSET_BASE,
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
