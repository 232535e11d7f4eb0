"""Speed benchmark for amago2_popgym.py (not part of the pytest run).

python tests/tools/bench_speed.py [--config comparison|paper|both] [--updates N] [--precision fp32 bf16]
python tests/tools/bench_speed.py --config comparison --against e9ff3aa --rounds 3   # same-run ratio to a commit
python tests/tools/bench_speed.py --config paper --precision fp32 --profile          # + the top operators of an update

Reports, for each config: (a) env steps/s of the collection loop with the policy in it (sync and async
envs) and of policy inference alone at context positions 10 and 500, with the KV cache and with full
recompute; (b) gradient updates/s; (c) the update's achieved FLOP/s as a fraction of torch's own
matmul throughput here; (d) peak resident memory. The comparison config is the one the official
library was measured at on this machine (see README#speed).

--against COMMIT exports that commit into a temporary folder and runs its own bench_speed.py and this tree's in
alternation (--rounds times, order swapped each round, so machine drift hits both), then prints the median of each
(a)/(b) rate per tree and the ratio: every speed claim is a same-run ratio, never a number from another day.
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the full-recompute reference
from token_history import TokenHistory  # noqa: E402

import amago2_popgym as A  # noqa: E402

GAMMAS_19 = [0.1, 0.7, 0.9, 0.93, 0.95, 0.98, 0.99, 0.992, 0.994, 0.995, 0.997, 0.998, 0.999]
GAMMAS_19 += [0.9991, 0.9992, 0.9993, 0.9994, 0.9995, 0.999]

CONFIGS = {
    # the official library's measurement config: RepeatPreviousEasy, single-episode protocol, 19 gammas
    "comparison": dict(
        tasks=["RepeatPreviousEasy"],
        one_shot=False,
        d_model=128,
        n_layers=2,
        n_heads=4,
        d_ff=512,
        context_len=64,
        batch_size=24,
        num_critics=4,
        num_bins=64,
        crr_samples=3,
        num_envs=12,
        gammas=GAMMAS_19,
    ),
    # the paper's POPGym size (Table 2) on all 27 tasks
    "paper": dict(),
}


def matmul_peak(dtype, n=2048, reps=10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def build(cfg, **kw):
    args = A.Args(**{**cfg, **kw, "buffer_size": 200_000})
    return args


def collection_sps(cfg, async_envs: bool, steps: int) -> float:
    args = build(cfg, async_envs=async_envs)
    envs = A.make_vector_env([A.make_env(args, i, True) for i in range(args.num_envs)], async_envs)
    agent = A.Agent(envs.single_observation_space, envs.single_action_space.n, args).eval()
    rollouts = A.MetaRollouts(
        envs,
        agent,
        args,
        "cpu",
        A.ReplayBuffer(
            A.replay_fields(envs.single_observation_space, envs.single_action_space), args.buffer_size, args.num_envs
        ),
    )
    rollouts.restart(0)
    rng = np.random.default_rng(0)
    eps = np.full(args.num_envs, 0.1)
    for _ in range(20):
        rollouts.step(A.explore(rollouts.act(agent), eps, envs.single_action_space, rng))
    start = time.perf_counter()
    for _ in range(steps):
        rollouts.step(A.explore(rollouts.act(agent), eps, envs.single_action_space, rng))
    envs.close()
    return steps * args.num_envs / (time.perf_counter() - start)


def inference_sps(cfg, kv: bool, position: int, steps: int) -> float:
    """Policy inference alone (encoder, Transformer step, actor) with each env's context at `position` tokens."""
    args = build(cfg)
    env = A.POPGymMetaEnv(args.tasks)
    agent = A.Agent(env.observation_space, env.action_space.n, args).eval()
    E, l = args.num_envs, args.context_len
    cache, history = A.KVCache(agent.transformer, E, l, "cpu"), TokenHistory(E, l, args.d_token, "cpu")
    step = (lambda x, t: agent.transformer(x, t, cache)[:, 0]) if kv else (lambda x, t: history(agent.transformer, x, t))
    obs = {"obs": torch.zeros(E, 1, 27)}
    act, rew, reset = torch.zeros(E, 1, dtype=torch.long), torch.zeros(E, 1), torch.zeros(E, 1)
    with torch.no_grad():
        tokens = agent.encoder(obs, act, rew, reset)
        for t in range(position):
            step(tokens, torch.full((E, 1), t))
        start = time.perf_counter()
        for t in range(position, position + steps):
            tokens = agent.encoder(obs, act, rew, reset)
            h = step(tokens, torch.full((E, 1), t))
            agent.actor(h).sample()
    return steps * E / (time.perf_counter() - start)


def updates(cfg, precision: str, n: int, profile: bool = False):
    """Updates/s and the FLOPs of one update (forward + backward), on a buffer of real rollouts. profile: then print
    torch.profiler's top operators of one more update, by self time."""
    args = build(cfg, precision=precision)
    envs = A.make_vector_env([A.make_env(args, i, True) for i in range(args.num_envs)], False)
    agent = A.Agent(envs.single_observation_space, envs.single_action_space.n, args)
    buffer = A.ReplayBuffer(
        A.replay_fields(envs.single_observation_space, envs.single_action_space), args.buffer_size, args.num_envs
    )
    rollouts = A.MetaRollouts(envs, agent, args, "cpu", buffer)
    rollouts.restart(0)
    rng = np.random.default_rng(0)
    for _ in range(max(args.context_len * 2, 200)):
        rollouts.step(rng.integers(envs.single_action_space.n, size=args.num_envs))
    envs.close()
    opt = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def one_update():
        batch = A.trim_padding(buffer.sample(args.batch_size, args.context_len + 1, rng))  # as the training loop
        batch = {k: torch.as_tensor(v) for k, v in batch.items()}
        with autocast:
            loss, _ = A.compute_losses(agent, batch, args)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), 1.0)
        opt.step()
        agent.ema_update(args.tau)

    agent.train()
    with FlopCounterMode(display=False) as counter:
        one_update()
    flops = counter.get_total_flops()
    one_update()
    start = time.perf_counter()
    for _ in range(n):
        one_update()
    seconds = (time.perf_counter() - start) / n
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            one_update()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 1 / seconds, flops


RATE = re.compile(r"^\((a|b)\) ([^:]+): ([\d,.]+) (env steps/s|updates/s)", re.M)


def run_tree(script: str, flags: list) -> dict[str, float]:
    """One bench_speed.py run in its own process: {"(b) fp32": updates/s, "(a) collection loop, sync envs, ...": ...}."""
    out = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, check=True).stdout
    return {f"({m[0]}) {m[1]}": float(m[2].replace(",", "")) for m in RATE.findall(out)}


def against(commit: str, rounds: int, flags: list):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", root, "archive", commit], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        theirs = next(p for p in (f"{tmp}/tests/tools/bench_speed.py", f"{tmp}/tests/bench_speed.py") if os.path.exists(p))
        trees = {"this tree": os.path.abspath(__file__), commit: theirs}
        results = {name: [] for name in trees}
        for r in range(rounds):
            for name in list(trees)[:: 1 if r % 2 == 0 else -1]:  # alternate which tree runs first
                results[name].append(run_tree(trees[name], flags))
                print(f"round {r + 1}/{rounds}: {name} done", flush=True)
    print(f"\nmedian of {rounds} alternating runs; ratio = this tree / {commit}")
    for key in results["this tree"][0]:
        ours, base = (float(np.median([run[key] for run in results[name] if key in run])) for name in trees)
        print(f"{key}: this tree {ours:,.3f}, {commit} {base:,.3f}, ratio {ours / base:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="both", choices=["comparison", "paper", "both"])
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--collect-steps", type=int, default=300)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--against", help="a git commit to time in the same run, alternating with this tree")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per tree with --against")
    parser.add_argument("--profile", action="store_true", help="print the profiler's top operators of one update")
    opts = parser.parse_args()
    if opts.against and opts.profile:
        parser.error("--profile times one tree: run it without --against")
    if opts.against:
        flags = ["--config", opts.config, "--updates", str(opts.updates), "--collect-steps", str(opts.collect_steps)]
        against(opts.against, opts.rounds, [*flags, "--precision", *opts.precision])
        sys.exit(0)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peaks = {p: matmul_peak(torch.float32 if p == "fp32" else torch.bfloat16) for p in opts.precision}
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    names = ["comparison", "paper"] if opts.config == "both" else [opts.config]
    for name in names:
        cfg = CONFIGS[name]
        print(f"\n== {name} config ==")
        for async_envs in [False, True]:
            sps = collection_sps(cfg, async_envs, opts.collect_steps)
            print(f"(a) collection loop, {'async' if async_envs else 'sync'} envs, KV cache: {sps:,.0f} env steps/s")
        for kv in [True, False]:
            for pos in [10, 500]:
                sps = inference_sps(cfg, kv, pos, 50)
                how = "KV cache" if kv else "full recompute"
                print(f"(a) inference only at context position {pos}, {how}: {sps:,.0f} env steps/s")
        for precision in opts.precision:
            n = opts.updates if name == "comparison" else max(1, opts.updates // 3)
            ups, flops = updates(cfg, precision, n, opts.profile)
            print(f"(b) {precision}: {ups:.3f} updates/s, {flops / 1e9:.1f} GFLOP per update")
            share = ups * flops / peaks[precision]
            print(f"(c) {precision}: achieved {ups * flops / 1e9:.1f} GFLOP/s = {share:.0%} of the {precision} matmul peak")
    print(f"\n(d) peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
