"""Measure lossless codecs on real frames for the compressed replay buffer (docs/memory.md; issue 21).

Not a test. Frames come from our own wrappers (amago2_atari.AtariEnv, amago2_procgen.ProcgenMetaEnv through their
make_env) under a uniform random policy: one env per game, its consecutive frames as the buffer stores them in one
env's column (episode ends included). For every codec and unit (one frame, or a run of k consecutive frames of that
env compressed together, optionally as differences to the previous frame) it prints the compression ratio per
benchmark (pooled: raw bytes / compressed bytes over all its games), the worst game's ratio, and encode / decode
speed in frames per second on one thread.

python tests/tools/measure_frame_codecs.py [--frames 3000] [--units 1 4 8 16 32]

--fill: instead, fill common/replay.py's buffer from the default game sets as the scripts run them (Atari: 30 envs,
env i plays game i mod 10; Procgen: 16 envs, each meta-rollout draws its game), about --frames frames per game, and
print the bytes per stored timestep and the projected size of the paper's buffers (8M, 18M easy, 80M memory-hard;
BabyAI's 10M too).
python tests/tools/measure_frame_codecs.py --fill --frames 3000

lz4 and blosc2 are not requirements (measured when importable); blosc2's deps pull httpx, pydantic and rich, so
install it in a side folder:
    pip install --no-deps --target /tmp/blosc2lib blosc2 ndindex msgpack ...; PYTHONPATH=/tmp/blosc2lib python ...
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import amago2_atari  # noqa: E402
import amago2_babyai  # noqa: E402
import amago2_procgen  # noqa: E402
from common.replay import ReplayBuffer  # noqa: E402

try:  # the candidates that lost: not in requirements.txt (pip install lz4==4.4.5 to measure it)
    import lz4.block
except ImportError:
    lz4 = None
try:
    import blosc2
except ImportError:
    blosc2 = None

PROCGEN_EASY = amago2_procgen.MODES["easy"][0]
PROCGEN_MEMORY_HARD = ["maze", "heist", "dodgeball", "starpilot", "bigfish"]  # 3 "memory" games, 2 busy "hard" ones


def atari_frames(game: str, n: int, rng: np.random.Generator) -> np.ndarray:
    args = amago2_atari.Args(games=[game])
    return rollout(amago2_atari.make_env(args, 0, train=True)(), n, rng)


def procgen_frames(mode: str, game: str, n: int, rng: np.random.Generator) -> np.ndarray:
    args = amago2_procgen.Args(mode=mode)
    return rollout(amago2_procgen.make_env(args, 0, train=True, task=game)(), n, rng)


def rollout(env, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, H, W, C) uint8: one env's consecutive frames under a uniform random policy, resets included."""
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    frames = [obs["image"]]
    while len(frames) < n:
        obs, _, terminated, truncated, _ = env.step(rng.integers(env.action_space.n))
        if terminated or truncated:
            obs, _ = env.reset()
        frames.append(obs["image"])
    env.close()
    return np.stack(frames)


def codecs() -> dict:
    """name -> (encode(bytes-like) -> bytes, decode(bytes) -> bytes)."""
    dz = zstandard.ZstdDecompressor()
    out = {f"zstd-{level}": (zstandard.ZstdCompressor(level=level).compress, dz.decompress) for level in (1, 3, 6)}
    if lz4 is not None:
        out["lz4"] = (lz4.block.compress, lz4.block.decompress)
    if blosc2 is not None:
        for name, codec in [("blosc2-zstd-1", blosc2.Codec.ZSTD), ("blosc2-lz4", blosc2.Codec.LZ4)]:
            cparams = blosc2.CParams(codec=codec, clevel=1, typesize=1, nthreads=1)
            out[name] = (lambda x, c=cparams: blosc2.compress2(x, cparams=c), blosc2.decompress2)
    return out


def units(frames: np.ndarray, k: int, delta: bool) -> list[np.ndarray]:
    """Runs of k consecutive frames; delta: each frame after the run's first as its difference to the previous one
    (mod 256: exact, decoded by a cumulative sum)."""
    runs = [frames[i : i + k] for i in range(0, len(frames) - k + 1, k)]
    if delta:
        runs = [np.concatenate([r[:1], np.diff(r, axis=0)]) for r in runs]
    return [np.ascontiguousarray(r) for r in runs]


def measure(frames: np.ndarray, encode, decode, k: int, delta: bool) -> tuple[int, int, float, float]:
    """(raw bytes, compressed bytes, encode seconds, decode seconds) for these frames cut into units of k."""
    runs = units(frames, k, delta)
    start = time.perf_counter()
    blobs = [encode(r) for r in runs]
    encode_s = time.perf_counter() - start
    decode_s = float("inf")
    for _ in range(3):  # best of 3: the machine is shared
        start = time.perf_counter()
        for b in blobs:
            x = np.frombuffer(decode(b), np.uint8)
            if delta:
                x = np.cumsum(x.reshape(k, -1), axis=0, dtype=np.uint8)
        decode_s = min(decode_s, time.perf_counter() - start)
    for r, b in zip(runs[:3], blobs[:3]):  # lossless, or the measurement means nothing
        x = np.frombuffer(decode(b), np.uint8).reshape(r.shape)
        assert np.array_equal(x, r)
    return sum(r.nbytes for r in runs), sum(len(b) for b in blobs), encode_s, decode_s


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=3000, help="frames per game")
    p.add_argument("--units", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="frames compressed together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fill", action="store_true", help="measure the replay buffer filled from the default game sets")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    if args.fill:
        return fill_all(args.frames, rng)
    sets = {
        "Atari (10 games)": {g: lambda g=g: atari_frames(g, args.frames, rng) for g in amago2_atari.GAMES},
        "Procgen easy": {g: lambda g=g: procgen_frames("easy", g, args.frames, rng) for g in PROCGEN_EASY},
        "Procgen memory-hard": {
            g: lambda g=g: procgen_frames("memory-hard", g, args.frames, rng) for g in PROCGEN_MEMORY_HARD
        },
    }
    table = codecs()
    variants = [(name, k, False) for name in table for k in args.units]
    variants += [("zstd-1", k, True) for k in args.units if k > 1]  # frame differences: is the codec missing matches?
    results = {}  # (set, variant) -> per game (raw, compressed, encode_s, decode_s, n_frames)
    for set_name, games in sets.items():
        for game, collect in games.items():
            start = time.perf_counter()
            frames = collect()
            print(
                f"{set_name} {game}: {len(frames)} frames {frames.shape[1:]} in {time.perf_counter() - start:.1f}s", flush=True
            )
            for name, k, delta in variants:
                encode, decode = table[name]
                raw, comp, enc, dec = measure(frames, encode, decode, k, delta)
                results.setdefault((set_name, (name, k, delta)), {})[game] = (raw, comp, enc, dec, raw // frames[0].nbytes)
    print_table(sets, variants, results)
    print_per_game(sets, results)


def print_table(sets: dict, variants: list, results: dict):
    header = "| codec | unit |" + "".join(f" {s}: ratio (worst game) | decode / encode k frames/s |" for s in sets)
    print("\n" + header + "\n|" + "---|" * (2 + 2 * len(sets)))
    for name, k, delta in variants:
        cells = []
        for s in sets:
            per_game = results[(s, (name, k, delta))]
            raw, comp, enc, dec, n = (sum(v[i] for v in per_game.values()) for i in range(5))
            worst = min(per_game, key=lambda g: per_game[g][0] / per_game[g][1])
            cells.append(f" {raw / comp:.1f}x ({worst} {per_game[worst][0] / per_game[worst][1]:.1f}x) |")
            cells.append(f" {n / dec / 1e3:.1f} / {n / enc / 1e3:.1f} |")
        unit = f"{k} frame{'s' if k > 1 else ''}" + (", delta" if delta else "")
        print(f"| {name} | {unit} |" + "".join(cells))


def print_per_game(sets: dict, results: dict, codec: str = "zstd-3"):
    """Ratio per game for every unit of one codec (common/replay.py's), and of lz4's 16-frame units."""
    variants = {v for (_, v) in results}
    cols = sorted(v for v in variants if v[0] == codec and not v[2]) + [v for v in variants if v == ("lz4", 16, False)]
    print("\n| game |" + "".join(f" {name} x{k} |" for name, k, _ in cols) + "\n|---|" + "---|" * len(cols))
    for s, games in sets.items():
        for g in games:
            print(f"| {g} |" + "".join(f" {results[(s, c)][g][0] / results[(s, c)][g][1]:.1f}x |" for c in cols))


def fill(envs: list, buffer: ReplayBuffer, steps: int, rng: np.random.Generator):
    """Write rollouts as MetaRollouts does: every env's step, then the first timestep of each new meta-rollout."""
    E = len(envs)

    def stack(observations: list) -> dict:
        return {k: np.stack([o[k] for o in observations]) for k in observations[0]}

    def write(idx, obs, action, prev_reward, reset, reward, terminal):
        row = dict(prev_action=action, prev_reward=prev_reward, reset=reset, reward=reward, terminal=terminal)
        buffer.add(obs | row | {"rollout_id": rid[idx], "time": t[idx]}, idx)

    rid, t = buffer.new_rollout_ids(E), np.zeros(E, np.int64)
    zeros = np.zeros(E, np.float32)
    obs = stack([env.reset(seed=int(rng.integers(2**31)))[0] for env in envs])
    write(np.arange(E), obs, np.zeros(E, np.int64), zeros, zeros + 1, zeros, np.zeros(E, bool))
    for _ in range(steps):
        actions = rng.integers(envs[0].action_space.n, size=E)
        out = [env.step(a) for env, a in zip(envs, actions)]
        reward = np.array([o[1] for o in out], np.float32)
        terminal, done = np.array([o[2] for o in out]), np.array([o[2] or o[3] for o in out])
        new_episode = np.array([o[4]["new_episode"] for o in out], np.float32)
        t += 1
        write(np.arange(E), stack([o[0] for o in out]), actions, reward, new_episode, reward, terminal)
        for i in np.flatnonzero(done):
            rid[i], t[i] = buffer.new_rollout_ids(1)[0], 0
            first = stack([envs[i].reset()[0]])
            write(np.array([i]), first, np.zeros(1, np.int64), zeros[:1], zeros[:1] + 1, zeros[:1], np.zeros(1, bool))
    for env in envs:
        env.close()


def fill_all(frames_per_game: int, rng: np.random.Generator):
    atari, procgen, babyai = amago2_atari.Args(), amago2_procgen.Args(), amago2_babyai.Args()
    hard = amago2_procgen.Args(mode="memory-hard")
    sets = [  # name, script, args, envs, games (BabyAI: 10 of its 50 tasks' worth of frames), paper capacity, on disk
        ("Atari", amago2_atari, atari, atari.num_envs, len(atari.games), 8_000_000, False),
        ("Procgen easy", amago2_procgen, procgen, procgen.num_envs, len(PROCGEN_EASY), 18_000_000, False),
        ("Procgen memory-hard", amago2_procgen, hard, hard.num_envs, len(amago2_procgen.PROCGEN_GAMES), 80_000_000, True),
        ("BabyAI", amago2_babyai, babyai, babyai.num_envs, 10, 10_000_000, False),
    ]
    print(
        "| buffer | timesteps stored | bytes per timestep (frame compressed + other fields) | ratio | paper buffer | raw | "
        "compressed |\n|---|---|---|---|---|---|---|"
    )
    for name, script, args, E, games, capacity, on_disk in sets:
        envs = [script.make_env(args, i, train=True)() for i in range(E)]
        steps = frames_per_game * games // E
        fields = script.replay_fields(envs[0].observation_space, envs[0].action_space)
        with tempfile.TemporaryDirectory() as folder:
            buffer = ReplayBuffer(fields, (steps + 200) * E, E, path=folder if on_disk else None)
            start = time.perf_counter()
            fill(envs, buffer, steps, rng)
            buffer.frames["image"].flush()  # every open chunk into the store: all frames counted compressed
            stored, frame_bytes = buffer.num_timesteps(), int(np.prod(fields["image"][0]))
            per_frame = buffer.frames["image"].store.nbytes() / stored
            per_row = per_frame + buffer.row_bytes
            raw_row = frame_bytes + buffer.row_bytes
            print(
                f"| {name} ({E} envs, {time.perf_counter() - start:.0f}s) | {stored:,} | {per_row:.0f} ({per_frame:.0f} + "
                f"{buffer.row_bytes}) | {frame_bytes / per_frame:.1f}x | {capacity / 1e6:.0f}M{' on disk' if on_disk else ''} "
                f"| {capacity * raw_row / 2**30:.1f} GiB | {capacity * per_row / 2**30:.1f} GiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
