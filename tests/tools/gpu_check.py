"""GPU check: every amago2_*.py script at its paper-size model on CUDA, in one command (not part of the pytest run).

python tests/tools/gpu_check.py                        # the full plan on the first GPU, <= 8 min (--budget)
python tests/tools/gpu_check.py --quick --only popgym  # fewer rows and updates
python tests/tools/gpu_check.py --device cpu --quick   # tiny models on CPU; the GPU-only rows are marked

Each row runs one script as a subprocess for a few epochs of real rollouts and updates, with the script's own model,
context and batch sizes (the paper's) and a replay buffer that fills in seconds, in fp32, bf16 and bf16 + --compile.
It reads the per-epoch TensorBoard scalars the script logs (charts/updates_per_second, charts/SPS), the script's
final `done: ...` line (and its `peak GPU memory X.XX GiB` where it prints one), and samples the device's used memory
while the row runs. Then torchrun (nccl) over all GPUs checks that every rank ends with the same parameters, and one
Atari-size sampled batch is copied to the GPU from pageable and from pinned memory. The table is written row by row to
<out>/gpu_check.md (a timeout still leaves the rows done); <out>/gpu_check.log holds each command and its output's end.
docs/gpu.md says what each column means.
"""

import argparse
import importlib
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ["popgym", "metaworld", "procgen", "atari", "babyai"]
A5000_GIB = 24564 / 1024  # the paper's GPU (24 GB): 24,564 MiB as nvidia-smi reports it

# Flags that keep each row's environments and final evaluation short; none changes the model, context or batch.
# The final evaluation plays one meta-rollout per eval task, so long meta-rollouts or many tasks would dominate a row.
GPU_ENV_FLAGS = {
    "popgym": [],  # all 27 tasks: short meta-rollouts
    # ML10, not ML45: building ML45 takes ~30 s in every process; 100-step episodes keep the 3-episode eval short
    "metaworld": ["--benchmark", "ML10", "--episode-length", "100"],
    "procgen": ["--horizon", "300"],  # easy mode: context 128 fits in a 300-step meta-rollout
    "atari": ["--games", "Pong", "Breakout"],  # short games under a random-like policy; 30 envs stay a multiple
    "babyai": ["--eval-tasks-per-split", "1"],
}
MEMORY_HARD = ["--mode", "memory-hard", "--horizon", "800"]  # context 768 fits in an 800-step meta-rollout
MEMORY_HARD_MODE = {"mode": "memory-hard"}  # the Args of that row: its paper sizes
PRECISIONS = ("bf16", "fp32")  # memory-hard: bf16 first (the likelier way to fit a 24 GB card)
# --device cpu --quick: the tests' tiny configs (tests/test_cli.py), one or two tasks, 2 envs
CPU_ENV_FLAGS = {
    "popgym": [],
    "metaworld": ["--benchmark", "ML1", "--ml1-task", "reach-v3", "--episode-length", "10"],
    "procgen": ["--games", "coinrun", "--impala-channels", "4", "4", "4", "--horizon", "30"],
    "atari": ["--games", "Breakout", "Qbert"],
    "babyai": ["--eval-tasks-per-split", "1"],
}
TINY_MODEL = "--d-model 32 --d-ff 64 --n-layers 1 --n-heads 2 --d-token 24 --num-bins 16 --head-hidden 32".split()
NEEDS_GPU = "needs a GPU"
# python -c KEEP_AGENT DIR SCRIPT FLAGS...: run the script, then save this rank's agent as DIR/agent<rank>.pt
KEEP_AGENT = (  # double quotes only: the printed command stays readable
    'import os, runpy, sys, torch; out, *sys.argv = sys.argv[1:]; agent = runpy.run_path(sys.argv[0], run_name="__main__")'
    '["agent"]; torch.save(agent.state_dict(), os.path.join(out, "agent" + os.environ["RANK"] + ".pt"))'
)
COLUMNS = [
    "run",
    "precision",
    "config",
    "updates/s",
    "env steps/s",
    "SPS (script)",
    "compile s",
    "peak alloc GiB",
    "peak used GiB",
    "fits 24 GB",
    "losses finite",
    "wall s",
    "note",
]


@dataclass
class Sizes:
    """One row's run: envs x steps per epoch x epochs of collection, updates per epoch, context l and batch B."""

    envs: int
    steps: int
    epochs: int
    updates: int
    context: int
    batch: int

    @property
    def total(self) -> int:
        return self.envs * self.steps * self.epochs

    @property
    def buffer(self) -> int:
        # every collected step fits (no wrap) and the script's own check passes: each env holds a window of l+1
        return max(self.total, max(self.batch, self.envs) * (self.context + 1))

    def describe(self) -> str:
        return f"{self.envs} envs x {self.steps} x {self.epochs} ep, {self.updates} upd/ep, l {self.context}, B {self.batch}"


@dataclass
class Row:
    script: str
    label: str
    precision: str
    compile: bool = False
    extra: list = field(default_factory=list)  # benchmark flags
    mode: dict = field(default_factory=dict)  # Args(**mode) gives this row's paper defaults (Procgen's --mode)
    nproc: int = 0  # torchrun ranks; 0: plain python

    @property
    def precision_label(self) -> str:
        return self.precision + (" + compile" if self.compile else "")

    @property
    def run_name(self) -> str:
        name = f"{self.label}-{self.precision}{'-compile' if self.compile else ''}"
        return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


# ---- the plan ----
def plan(scripts: list, quick: bool, gpu: bool, nproc: int, torchrun: bool = True) -> list:
    """(row, why it is not run or None) in the order they run: the most telling first, so that a --budget cut drops the
    least. fp32, bf16, the torchrun check, one compile row, Procgen memory-hard (the paper's two-GPU config, full plan
    only), the other compile rows (full plan only). On CPU the compile and torchrun rows are listed as needing a GPU.
    torchrun=False leaves the torchrun row out (--skip torchrun)."""
    env = GPU_ENV_FLAGS if gpu else CPU_ENV_FLAGS
    fp32 = [Row(s, s, "fp32", extra=env[s]) for s in scripts]
    bf16 = [Row(s, s, "bf16", extra=env[s]) for s in scripts]
    compiled = [Row(s, s, "bf16", True, env[s]) for s in scripts]
    ddp_script = "popgym" if "popgym" in scripts else scripts[0]
    ddp = [Row(ddp_script, f"{ddp_script} torchrun x{nproc}", "bf16", extra=env[ddp_script], nproc=nproc)]
    ddp = ddp if torchrun else []
    if not gpu:
        no_compile, no_nccl = f"{NEEDS_GPU} (--compile is skipped on CPU)", f"{NEEDS_GPU} (torchrun with nccl)"
        return [(r, None) for r in fp32 + bf16] + [(r, no_nccl) for r in ddp] + [(r, no_compile) for r in compiled]
    rows = [(r, None) for r in [*fp32, *bf16, *ddp, compiled[0]]]
    if quick:
        return rows + [(r, "not in --quick (run without it)") for r in compiled[1:]]
    if "procgen" in scripts:
        rows += [
            (Row("procgen", "procgen memory-hard", p, extra=MEMORY_HARD, mode=MEMORY_HARD_MODE), None) for p in PRECISIONS
        ]
    return rows + [(r, None) for r in compiled[1:]]


def paper_sizes(row: Row, quick: bool) -> Sizes:
    """The script's own num_envs, context_len and batch_size; each env collects half a context per epoch, so from the
    second epoch on the sampled windows have their full paper length."""
    sys.path.insert(0, ROOT)
    args = importlib.import_module(f"amago2_{row.script}").Args(**row.mode)
    steps = max(-(-(args.context_len + 1) // 2), 100)
    if row.nproc:  # the ranks' agreement needs a few updates, not rates
        return Sizes(args.num_envs, steps, 2, 5, args.context_len, args.batch_size)
    return Sizes(args.num_envs, steps, 3, 8 if quick else 20, args.context_len, args.batch_size)


def cpu_sizes() -> Sizes:
    return Sizes(envs=2, steps=20, epochs=3, updates=3, context=12, batch=3)


def command(row: Row, sizes: Sizes, device: str) -> list:
    """The script's command line. Only flags of long standing: the scripts are being refactored."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={row.nproc}"] if row.nproc else []
    if row.nproc:  # each rank runs the script through KEEP_AGENT, which saves that rank's agent in the run's folder
        launcher += ["--no-python", sys.executable, "-c", KEEP_AGENT, f"runs/{row.run_name}"]
    flags = [
        *("--device", device, "--precision", row.precision, "--run-name", row.run_name),
        *(["--compile"] if row.compile else []),
        *("--num-envs", str(sizes.envs), "--steps-per-epoch", str(sizes.steps)),
        *("--updates-per-epoch", str(sizes.updates), "--total-timesteps", str(sizes.total * max(row.nproc, 1))),
        *("--buffer-size", str(sizes.buffer), "--eval-every", "0", "--eval-episodes", "1"),
        *row.extra,
    ]
    if device == "cpu":
        flags += [*TINY_MODEL, "--context-len", str(sizes.context), "--batch-size", str(sizes.batch)]
    if row.nproc:
        flags.append("--save-model")  # state.pt holds rank 0's agent, the one every rank's is compared with
    return [sys.executable, *launcher, os.path.join(ROOT, f"amago2_{row.script}.py"), *flags]


# ---- running a row ----
class PeakMemory:
    """The device's peak used memory while a row runs, over its baseline: every process, CUDA contexts included,
    i.e. what the row needs of a card (torch.cuda.mem_get_info, sampled every 50 ms)."""

    def __init__(self, gpu: bool):
        self.gpu, self.peak, self.stop_event = gpu, 0, threading.Event()
        self.baseline = self._used() if gpu else 0

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def _loop(self):
        while not self.stop_event.wait(0.05):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        if self.gpu:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.gpu:
            self.stop_event.set()
            self.thread.join()

    def gib(self) -> float | None:
        return (self.peak - self.baseline) / 2**30 if self.gpu and self.peak else None


def run(cmd: list, cwd: str, timeout: float, env: dict) -> tuple[int | None, str, str, float]:
    """(exit code or None on timeout, stdout, stderr, seconds). The command gets its own process group, so that a
    timeout also ends its env workers and torchrun's ranks."""
    start = time.time()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=max(timeout, 1))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return code, out, err, time.time() - start


def scalars(run_dir: str) -> dict:
    """{tag: [(step, value), ...]} of the run's TensorBoard event files ({} if none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(run_dir):
        return {}
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rates(ups: list, sps: list, updates_per_epoch: int) -> dict:
    """From the per-epoch scalars: steady updates/s (median over the epochs after the first, which pays warm-up and
    compilation), the first update phase's extra seconds over a steady one, the script's last SPS, and env steps/s
    of collection alone. The scripts log charts/SPS after each collection phase as steps so far / (collection seconds +
    update seconds so far), and charts/updates_per_second after each update phase: collection seconds up to epoch k are
    steps_k / SPS_k minus the update phases before it."""
    out = {}
    if ups:
        steady = [v for _, v in ups[1:]] or [ups[0][1]]
        out["updates/s"] = statistics.median(steady)
        out["compile s"] = updates_per_epoch / ups[0][1] - updates_per_epoch / out["updates/s"]
    if sps:
        out["SPS (script)"] = sps[-1][1]
        updates_before = [0.0, *np.cumsum([updates_per_epoch / v for _, v in ups])]
        collect = [(step, step / v - updates_before[k]) for k, (step, v) in enumerate(sps) if k < len(updates_before)]
        (s0, c0), (s1, c1) = (collect[0], collect[-1]) if len(collect) > 1 else ((0, 0.0), collect[0])
        if c1 > c0 > -1e-9:  # a changed definition of charts/SPS would show here as a non-positive time
            out["env steps/s"] = (s1 - s0) / (c1 - c0)
    return out


def outcome(code: int | None, out: str, err: str, timeout: float) -> tuple[str, str]:
    """(losses finite?, note) from the exit code and the script's output."""
    nonfinite = re.search(r"error: (non-finite[^\n]*)", err)
    if nonfinite:
        return "NO", nonfinite.group(1)[:160]
    if code is None:
        return "?", f"timed out after {timeout:.0f} s"
    if code != 0 or "done:" not in out:
        lines = [line for line in err.splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "no output")
        return "?", f"exit {code}: {said[:200]}"
    return "yes", ""


def same_parameters(run_dir: str, nproc: int) -> str:
    """Whether every rank's agent, saved by KEEP_AGENT as <run_dir>/agent<rank>.pt after the script finished, is bitwise
    the agent rank 0 saved in checkpoint/state.pt: the same tensors, every parameter and buffer."""
    state_path = os.path.join(run_dir, "checkpoint", "state.pt")
    if not os.path.exists(state_path):
        return "no checkpoint written"
    saved = torch.load(state_path, map_location="cpu", weights_only=False)["agent"]
    paths = [os.path.join(run_dir, f"agent{r}.pt") for r in range(nproc)]
    if not all(os.path.exists(p) for p in paths):
        return f"{sum(map(os.path.exists, paths))} rank(s) saved their agent, expected {nproc}"
    for r, path in enumerate(paths):
        agent = torch.load(path, map_location="cpu")
        differ = sorted(agent.keys() ^ saved.keys()) or [k for k, v in agent.items() if not torch.equal(v, saved[k])]
        if differ:
            return f"RANKS DIFFER: different parameters (rank {r}: {', '.join(differ[:3])})"
    if nproc == 1:
        return "1 GPU: ran 1 rank (no nccl); the multi-rank check needs >= 2 GPUs"
    return f"same parameters on all {nproc} ranks"


def measure(row: Row, sizes: Sizes, device: str, workdir: str, timeout: float, log) -> dict:
    """Run one row and return its table cells."""
    cmd = command(row, sizes, device)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # tiny models; cores shared with other work
    shown = f"cd {workdir} && {shlex.join(cmd)}"
    print(f"$ {shown}", flush=True)
    with PeakMemory(device == "cuda") as mem:
        code, out, err, seconds = run(cmd, workdir, timeout, env)
    log.write(f"$ {shown}\n# exit {code}, {seconds:.1f} s\n{tail(out)}\n--- stderr ---\n{tail(err)}\n")
    ups, sps = tag_values(os.path.join(workdir, "runs", row.run_name))
    log.write(f"# per epoch: charts/updates_per_second {ups}\n# per epoch: charts/SPS {sps}\n\n")
    cells = rates(ups, sps, sizes.updates)
    if not row.compile:
        cells["compile s"] = "-"
    finite, note = outcome(code, out, err, timeout)
    peak = re.search(r"peak GPU memory ([\d.]+) GiB", out)
    cells |= {"peak alloc GiB": float(peak.group(1)) if peak else None, "peak used GiB": mem.gib()}
    cells |= {"losses finite": finite, "wall s": seconds, "note": note}
    if row.nproc and code == 0:
        cells["note"] = same_parameters(os.path.join(workdir, "runs", row.run_name), row.nproc) + "; peaks: all ranks together"
    log.flush()
    return cells


def tag_values(run_dir: str) -> tuple[list, list]:
    tags = scalars(run_dir)
    return tags.get("charts/updates_per_second", []), tags.get("charts/SPS", [])


def tail(text: str, lines: int = 25) -> str:
    # tqdm redraws its bar with carriage returns: keep the last state of each line
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def fits(cells: dict) -> str:
    """Does the row fit on the paper's 24 GB card? By the device's used memory (what a card must hold), else by the
    script's allocator peak (a lower bound)."""
    used, alloc = cells.get("peak used GiB"), cells.get("peak alloc GiB")
    if used is not None:
        return "yes" if used <= A5000_GIB else "no"
    if alloc is not None:
        return "no" if alloc > A5000_GIB else "yes (alloc only)"
    return "n/a"


# ---- pinned host-to-device copies ----
def copy_check(device: str, reps: int = 20) -> list:
    """One paper-size Atari batch (B x (l+1) frames of 84x84x3 uint8 and the small fields) gathered from a buffer
    and copied to the GPU three ways. Rows: (way, ms per batch, the batch's GB per second of gather and copy, speed-up
    over the scripts' way). Each time ends with a synchronize, so a pinned buffer is never rewritten mid-copy."""
    sys.path.insert(0, ROOT)
    args = importlib.import_module("amago2_atari").Args()
    B, L, rows = args.batch_size, args.context_len + 1, 4096
    rng = np.random.default_rng(0)
    fields = {"image": ((84, 84, 3), np.uint8), "prev_action": ((), np.int64), "terminal": ((), bool), "mask": ((), bool)}
    fields |= {k: ((), np.float32) for k in ("prev_reward", "reset", "reward")}
    source = {k: rng.integers(0, 2, (rows, *s)).astype(dt) for k, (s, dt) in fields.items()}
    idx = rng.integers(0, rows, (B, L))
    nbytes = sum(v[0].nbytes * B * L for v in source.values())
    pinned = {
        k: torch.empty((B, L, *v.shape[1:]), dtype=torch.from_numpy(v[:1]).dtype).pin_memory() for k, v in source.items()
    }

    def pageable():  # what the scripts do: a fresh gathered array, then a synchronous copy
        return {k: torch.as_tensor(v[idx], device=device) for k, v in source.items()}

    def staged():  # gather, copy into a pinned staging buffer, then an asynchronous copy
        return {k: pinned[k].copy_(torch.from_numpy(v[idx])).to(device, non_blocking=True) for k, v in source.items()}

    def gathered_into_pinned():  # the buffer's gather writes straight into pinned memory
        for k, v in source.items():
            np.take(v, idx, axis=0, out=pinned[k].numpy())
        return {k: p.to(device, non_blocking=True) for k, p in pinned.items()}

    ways = [("gather + pageable copy (the scripts)", pageable), ("gather + pinned staging + non_blocking", staged)]
    ways.append(("gather into pinned + non_blocking", gathered_into_pinned))
    timed = [(name, time_ms(fn, reps)) for name, fn in ways]
    return [(name, ms, nbytes / ms / 1e6, timed[0][1] / ms) for name, ms in timed]


def time_ms(fn, reps: int) -> float:
    """Median ms of fn() until the copies have landed on the GPU."""
    times = []
    for _ in range(reps + 3):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


# ---- the table ----
def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value).replace("|", "/")


def table_row(cells: dict) -> str:
    return "| " + " | ".join(fmt(cells.get(c)) for c in COLUMNS) + " |"


def header(device: str) -> str:
    if device == "cuda":
        name = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, CUDA {torch.version.cuda}"
    else:
        name = "CPU"
    try:  # a copied tree may have no .git, a machine no git
        git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        commit = git.stdout.strip() or "n/a"
    except OSError:
        commit = "n/a"
    return (
        f"# gpu_check: {name}, torch {torch.__version__}, commit {commit}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`{shlex.join([sys.executable, os.path.relpath(__file__, ROOT), *sys.argv[1:]])}`\n\n"
    )


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as the scripts say theirs (argparse would print the usage first)."""
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv: list | None) -> argparse.Namespace:
    p = Parser(
        description="Run every amago2_*.py script at its paper-size model on a GPU (fp32, bf16, bf16 + --compile), "
        "torchrun with nccl, and pinned host-to-device copies; write one markdown table row by row.",
        epilog="docs/gpu.md: the one-call command for a lent GPU machine and what each column means.",
    )
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda when torch sees a GPU")
    p.add_argument(
        "--quick", action="store_true", help="fewer updates and rows (no compile rows on a GPU; tiny models on CPU)"
    )
    p.add_argument("--only", action="append", default=[], metavar="SCRIPT", help="popgym, metaworld, procgen, atari or babyai "
                   "(repeatable or a comma list; default: all five)")  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT") or "runs", help="folder for gpu_check.md and gpu_check.log "
                   "(default: $OUT if set, else runs)")  # fmt: skip
    p.add_argument("--skip", action="append", default=[], metavar="PART", help="copies or torchrun (repeatable or a "
                   "comma list): leave out the pinned-copy measurement or the torchrun row")  # fmt: skip
    p.add_argument("--budget", type=float, default=450, help="seconds for the whole check: no row starts with under 20 s "
                   "left, and a row still running at the end is killed (default 450)")  # fmt: skip
    p.add_argument("--row-timeout", type=float, default=150, help="seconds one row may run before it is killed")
    p.add_argument("--nproc", type=int, default=0, help="torchrun ranks (default: every visible GPU)")
    p.add_argument("--dry-run", action="store_true", help="print the plan's rows and commands for --device, run nothing")
    opts = p.parse_args(argv)
    only = [s for arg in opts.only for s in arg.split(",") if s]
    unknown = [s for s in only if s not in SCRIPTS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: unknown script; choose from {', '.join(SCRIPTS)}")
    opts.scripts = [s for s in SCRIPTS if s in only] if only else SCRIPTS
    opts.skip = {s for arg in opts.skip for s in arg.split(",") if s}
    if opts.skip - {"copies", "torchrun"}:
        p.error(f"--skip {','.join(sorted(opts.skip - {'copies', 'torchrun'}))}: unknown part; choose from copies, torchrun")
    if opts.device == "auto":
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
        if opts.device == "cpu" and not opts.quick:
            p.error("torch sees no GPU: paper-size models are GPU jobs; on CPU run --device cpu --quick")
    if opts.device == "cuda" and not torch.cuda.is_available() and not opts.dry_run:
        p.error("--device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    if opts.device == "cpu" and not opts.quick:
        p.error("--device cpu runs only with --quick (tiny models): paper-size models are GPU jobs")
    if opts.budget <= 0 or opts.row_timeout <= 0 or opts.nproc < 0:
        p.error("--budget and --row-timeout must be positive and --nproc >= 0")
    opts.nproc = opts.nproc or (max(torch.cuda.device_count(), 1) if opts.device == "cuda" else 2)
    return opts


def dry_run(opts):
    gpu = opts.device == "cuda"
    for row, reason in plan(opts.scripts, opts.quick, gpu, opts.nproc, "torchrun" not in opts.skip):
        sizes = paper_sizes(row, opts.quick) if gpu else cpu_sizes()
        print(f"{row.label}, {row.precision_label}: {reason or sizes.describe()}")
        if not reason:
            print(f"  {shlex.join(command(row, sizes, opts.device))}")


def main(argv: list | None = None):
    opts = parse(argv)
    if opts.dry_run:
        return dry_run(opts)
    gpu = opts.device == "cuda"
    md_path, log_path = os.path.join(opts.out, "gpu_check.md"), os.path.join(opts.out, "gpu_check.log")
    try:
        os.makedirs(opts.out, exist_ok=True)
        open(md_path, "w").close()
    except OSError as e:
        sys.exit(f"error: --out {opts.out}: cannot write {md_path} ({e.strerror}); choose a folder you can write to")
    deadline = time.time() + opts.budget
    with open(md_path, "w") as md, open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="gpu_check_") as work:

        def write(text: str):
            md.write(text + "\n")
            md.flush()
            print(text, flush=True)

        write(header(opts.device))
        if "copies" not in opts.skip:
            write_copies(write, gpu)
        write("## Scripts at paper size\n" if gpu else "## Scripts at tiny size (--device cpu --quick)\n")
        write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        for row, reason in plan(opts.scripts, opts.quick, gpu, opts.nproc, "torchrun" not in opts.skip):
            write(table_row(row_cells(row, reason, opts, work, deadline, log)))
        write(f"\nCommands and the end of their output: {log_path}")
    print(f"\nwrote {md_path} and {log_path}")


def write_copies(write, gpu: bool):
    write("## Host-to-device copy of one sampled Atari batch (B x (l+1) frames of 84x84x3 uint8 + small fields)\n")
    write("| way | ms per batch | GB/s | speed-up |\n|---|---|---|---|")
    if not gpu:
        write(f"| pinned + non_blocking vs pageable | {NEEDS_GPU} | - | - |\n")
        return
    try:
        for name, ms, gbps, speedup in copy_check("cuda"):
            write(f"| {name} | {ms:.2f} | {gbps:.1f} | {speedup:.2f}x |")
    except Exception as e:  # one failed measurement must not cost the rows after it
        write(f"| failed: {type(e).__name__}: {str(e)[:200]} | - | - | - |")
    torch.cuda.empty_cache()  # the rows' memory peaks are measured over what this process holds
    write("")


def row_cells(row: Row, reason: str | None, opts, work: str, deadline: float, log) -> dict:
    """One row's cells: measured, or why not."""
    gpu = opts.device == "cuda"
    cells = {"run": row.label, "precision": row.precision_label}
    left = deadline - time.time()
    if reason is None and left < 20:
        reason = "skipped: --budget spent (run it with --only)"
    if reason:
        return {c: "-" for c in COLUMNS} | cells | {"note": reason}
    try:
        sizes = paper_sizes(row, opts.quick) if gpu else cpu_sizes()
        cells["config"] = sizes.describe()
        cells |= measure(row, sizes, opts.device, work, min(opts.row_timeout, left), log)
    except Exception as e:  # a tool error on one row must not cost the rows after it
        return cells | {"note": f"tool error: {type(e).__name__}: {str(e)[:200]}"}
    if not gpu:  # no GPU memory to measure
        return cells | {"peak alloc GiB": "-", "peak used GiB": "-", "fits 24 GB": "-"}
    return cells | {"fits 24 GB": fits(cells)}


if __name__ == "__main__":
    main()
