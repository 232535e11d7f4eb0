"""tests/tools/gpu_check.py, the check prepared for the first GPU, kept working on CPU: its --device cpu --quick table,
the arithmetic behind its columns, the torchrun verdict, the pinned-copy measurement and its one-line errors."""

import os
import subprocess
import sys

import pytest
import torch
from cli import ROOT

sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
import gpu_check as G  # noqa: E402


def table(path) -> dict:
    """{(run, precision): {column: cell}} of the markdown table of scripts in gpu_check.md."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    header = next(i for i, line in enumerate(lines) if line.startswith("| run |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    rows = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[header + 1 :]]
    return {(r["run"], r["precision"]): r for r in rows}


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_cpu_quick_table_has_measured_rows_and_marks_the_gpu_rows(tmp_path):
    tool = os.path.join(ROOT, "tests", "tools", "gpu_check.py")
    args = ["--device", "cpu", "--quick", "--only", "popgym", "--out", str(tmp_path)]
    out = subprocess.run([sys.executable, tool, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = table(tmp_path / "gpu_check.md")
    for precision in ["fp32", "bf16"]:
        row = rows[("popgym", precision)]
        assert number(row["updates/s"]) > 0 and number(row["env steps/s"]) > 0 and number(row["SPS (script)"]) > 0
        assert row["losses finite"] == "yes" and row["note"] == ""
        assert f"--precision {precision}" in out.stdout  # the exact command is printed
    assert "needs a GPU" in rows[("popgym", "bf16 + compile")]["note"]
    assert "needs a GPU" in rows[("popgym torchrun x2", "bf16")]["note"]
    assert "| pinned + non_blocking vs pageable | needs a GPU |" in (tmp_path / "gpu_check.md").read_text()
    assert "amago2_popgym.py --device cpu" in (tmp_path / "gpu_check.log").read_text()


def test_rates_from_the_per_epoch_scalars():
    """3 epochs of 100 steps, 1 s of collection each; update phases of 10 updates take 2 s (compiling), 1 s, 1 s.
    The scripts log SPS after collecting (update time so far excludes this epoch's) and updates/s after updating."""
    ups = [(100, 5.0), (200, 10.0), (300, 10.0)]
    sps = [(100, 100 / 1), (200, 200 / (2 + 2)), (300, 300 / (3 + 3))]
    got = G.rates(ups, sps, updates_per_epoch=10)
    assert got == pytest.approx({"updates/s": 10.0, "compile s": 1.0, "SPS (script)": 50.0, "env steps/s": 100.0})


def test_torchrun_verdict_compares_every_ranks_agent_bitwise(tmp_path):
    """Each rank's agent<r>.pt (what KEEP_AGENT saves) against the agent rank 0 saved in checkpoint/state.pt."""
    assert G.same_parameters(str(tmp_path), 2) == "no checkpoint written"
    (tmp_path / "checkpoint").mkdir()
    agent = {"w": torch.arange(4.0), "popart.mu": torch.zeros(2)}
    torch.save({"agent": agent}, tmp_path / "checkpoint" / "state.pt")
    torch.save(agent, tmp_path / "agent0.pt")
    assert G.same_parameters(str(tmp_path), 2) == "1 rank(s) saved their agent, expected 2"
    torch.save({k: v.clone() for k, v in agent.items()}, tmp_path / "agent1.pt")
    assert G.same_parameters(str(tmp_path), 2) == "same parameters on all 2 ranks"
    nudged = agent["popart.mu"].clone()
    nudged[1] = torch.nextafter(nudged[1], torch.tensor(1.0))  # one bit of one tensor
    torch.save(agent | {"popart.mu": nudged}, tmp_path / "agent1.pt")
    assert G.same_parameters(str(tmp_path), 2) == "RANKS DIFFER: different parameters (rank 1: popart.mu)"
    torch.save({"w": agent["w"]}, tmp_path / "agent1.pt")  # a tensor missing counts too
    assert G.same_parameters(str(tmp_path), 2).startswith("RANKS DIFFER")
    assert "multi-rank check needs >= 2 GPUs" in G.same_parameters(str(tmp_path), 1)


def test_keep_agent_saves_the_rank_s_agent_after_the_script(tmp_path):
    """The wrapper each torchrun rank runs: the script runs as __main__ with its own argv, then its agent is saved."""
    (tmp_path / "script.py").write_text(
        "import sys, torch\nagent = torch.nn.Linear(2, int(sys.argv[1]))\nassert __name__ == '__main__'\n"
    )
    env = dict(os.environ, RANK="1")
    out = subprocess.run([sys.executable, "-c", G.KEEP_AGENT, str(tmp_path), str(tmp_path / "script.py"), "3"], env=env)
    assert out.returncode == 0
    assert torch.load(tmp_path / "agent1.pt")["weight"].shape == (3, 2)


def test_gpu_plan_runs_every_script_three_ways_then_memory_hard():
    rows = G.plan(G.SCRIPTS, quick=False, gpu=True, nproc=2)
    assert all(reason is None for _, reason in rows)
    ways = {(r.label, r.precision_label) for r, _ in rows}
    assert {(s, p) for s in G.SCRIPTS for p in ["fp32", "bf16", "bf16 + compile"]} <= ways
    assert {("procgen memory-hard", "bf16"), ("procgen memory-hard", "fp32")} <= ways
    ddp = next(r for r, _ in rows if r.nproc)
    cmd = G.command(ddp, G.Sizes(envs=4, steps=10, epochs=2, updates=3, context=8, batch=2), "cuda")
    assert "--nproc-per-node=2" in cmd and "--save-model" in cmd
    assert cmd[cmd.index("-c") + 1 :][:3] == [G.KEEP_AGENT, f"runs/{ddp.run_name}", os.path.join(ROOT, "amago2_popgym.py")]
    assert cmd[cmd.index("--total-timesteps") + 1] == str(2 * 4 * 10 * 2)  # the steps of both ranks
    quick = G.plan(G.SCRIPTS, quick=True, gpu=True, nproc=1)
    assert sum(reason is None and r.compile for r, reason in quick) == 1  # one compile row in --quick


def test_copy_check_measures_three_ways(monkeypatch):
    """The GPU measurement's own logic, on CPU: pinning and synchronising stand in as no-ops."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    rows = G.copy_check("cpu", reps=1)
    assert [name for name, *_ in rows][0] == "gather + pageable copy (the scripts)" and len(rows) == 3
    assert all(ms > 0 and gbps > 0 for _, ms, gbps, _ in rows) and rows[0][3] == 1.0


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--only", "popgym,nosuch"], "error: --only nosuch: unknown script"),
        (["--device", "cpu"], "error: --device cpu runs only with --quick"),
        (["--device", "cpu", "--quick", "--budget", "0"], "error: --budget and --row-timeout must be positive"),
    ],
)
def test_bad_flags_say_what_is_wrong_in_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        G.parse(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith(says) and err.count("\n") == 1
