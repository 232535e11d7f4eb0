"""Replay speed with compressed vs raw frames, in one run, alternating (docs/memory.md; issue 21). Not a test.

python tests/tools/bench_replay.py [--rounds 12] [--frames-per-game 400] [--threads 1]

Two buffers receive the same rollouts of the ten default Atari games (random policy, our wrappers), one storing frames
raw (compress=False, what the scripts stored before), one compressed. Then:
(a) the time to gather one paper-size Atari batch (32 windows of 65 frames of 84x84x3) from each, alternating, median;
(b) gradient updates/s at a mid-size Atari config (context 64, batch 16, a small model) with raw storage and plain
    sample (the scripts before), compressed storage and plain sample, and compressed with the Prefetcher decoding the
    next batch while an update runs; one update of each per round, the order rotated, every mode on the same batches.
    Reports the median update time of each (wall clock and process CPU) and its ratio to raw: a same-run ratio holds
    on a loaded machine, absolute rates do not.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from measure_frame_codecs import fill  # noqa: E402

import amago2_atari as A  # noqa: E402
from common.replay import Prefetcher, ReplayBuffer, trim_padding  # noqa: E402

MID_SIZE = dict(context_len=64, batch_size=16, d_model=64, d_ff=256, n_layers=2, n_heads=4, d_token=64)
MID_SIZE |= dict(impala_channels=[8, 16, 16])


class Tee:
    """Both buffers get every write; rollout ids stay in step."""

    def __init__(self, *buffers):
        self.buffers = buffers

    def new_rollout_ids(self, n):
        return [b.new_rollout_ids(n) for b in self.buffers][0]

    def add(self, step, envs=None):
        for b in self.buffers:
            b.add(step, envs)


def gather_ms(buffer: ReplayBuffer, seed: int) -> float:
    rows, envs, mask = buffer.draw(32, 65, np.random.default_rng(seed))
    start = time.perf_counter()
    buffer.gather(rows, envs, mask)
    return (time.perf_counter() - start) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=12, help="updates per mode, one of each per round")
    p.add_argument("--frames-per-game", type=int, default=400)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the update on one core, as on a shared CPU)")
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    args = A.Args(**MID_SIZE)
    envs = [A.make_env(args, i, train=True)() for i in range(len(args.games))]  # one env per game
    fields = A.replay_fields(envs[0].observation_space, envs[0].action_space)
    capacity = (opts.frames_per_game + 100) * len(envs)
    raw = ReplayBuffer(fields, capacity, len(envs), compress=False)
    packed = ReplayBuffer(fields, capacity, len(envs))
    start = time.perf_counter()
    fill(envs, Tee(raw, packed), opts.frames_per_game, np.random.default_rng(0))
    print(
        f"filled: {raw.num_timesteps():,} timesteps in {time.perf_counter() - start:.0f}s; compressed buffer "
        f"{packed.bytes_used() / 2**20:.1f} MiB, raw {raw.num_timesteps() * (raw.row_bytes + 84 * 84 * 3) / 2**20:.1f} MiB"
    )

    # (a) one paper-size batch, alternating
    times = {"raw": [], "compressed": []}
    for seed in range(15):
        times["raw"].append(gather_ms(raw, seed))
        times["compressed"].append(gather_ms(packed, seed))
    draw = []
    for seed in range(15):
        start = time.perf_counter()
        packed.draw(32, 65, np.random.default_rng(seed))
        draw.append((time.perf_counter() - start) * 1e3)
    print(
        f"(a) gather of 32 x 65 frames of 84x84x3: raw {statistics.median(times['raw']):.1f} ms, compressed "
        f"{statistics.median(times['compressed']):.1f} ms (median of 15; draw, shared: {statistics.median(draw):.1f} ms)"
    )

    # (b) updates/s
    agent = A.Agent(envs[0].observation_space, int(envs[0].action_space.n), args)
    opt = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=args.learning_rate)
    agent.train()

    def update(batch):  # the training loop's update, as amago2_atari.py runs it
        batch = {k: torch.as_tensor(v) for k, v in trim_padding(batch).items()}
        batch["image"] = A.random_shift(batch["image"], fraction=args.augment_fraction)
        loss, _ = agent(batch, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.parameters(), args.grad_clip)
        opt.step()
        agent.ema_update(args.tau)

    def plain(buffer):
        return lambda n, rng: (buffer.sample(args.batch_size, args.context_len + 1, rng) for _ in range(n))

    modes = {
        "raw": plain(raw),
        "compressed": plain(packed),
        "compressed + prefetch": lambda n, rng: Prefetcher(packed).batches(n, args.batch_size, args.context_len + 1, rng),
    }
    for batch in modes["raw"](2, np.random.default_rng(0)):  # warm-up
        update(batch)
    # one update of each mode per round, the order rotated: drift and the other processes hit every mode alike
    batches = {m: make(opts.rounds, np.random.default_rng(1)) for m, make in modes.items()}  # the same batches
    wall, cpu = {m: [] for m in modes}, {m: [] for m in modes}
    for r in range(opts.rounds):
        for m in list(modes)[r % len(modes) :] + list(modes)[: r % len(modes)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            update(next(batches[m]))  # the batch's gather (plain) or the wait for it (prefetch) counts
            wall[m].append(time.perf_counter() - start)
            cpu[m].append(time.process_time() - start_cpu)
    for name, stat in [("median", statistics.median), ("fastest", min)]:  # fastest: the least disturbed by other load
        base, base_cpu = stat(wall["raw"]), stat(cpu["raw"])
        for m in modes:
            print(
                f"(b) {name} of {opts.rounds}, {m}: {1 / stat(wall[m]):.3f} updates/s ({base / stat(wall[m]):.3f}x raw), "
                f"process CPU {stat(cpu[m]):.2f} s per update ({base_cpu / stat(cpu[m]):.3f}x raw)"
            )
    for m in modes:
        print(f"wall s per update, {m}: {', '.join(f'{x:.2f}' for x in wall[m])}")


if __name__ == "__main__":
    main()
