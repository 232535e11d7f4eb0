"""Measure lossless codecs on real frames for the compressed replay buffer (docs/memory.md; issue 21).

Not a test. Frames come from our own wrappers (amago2_atari.AtariEnv, amago2_procgen.ProcgenMetaEnv through their
make_env) under a uniform random policy: one env per game, its consecutive frames as the buffer stores them in one
env's column (episode ends included). For every codec and unit (one frame, or a run of k consecutive frames of that
env compressed together, optionally as differences to the previous frame) it prints the compression ratio per
benchmark (pooled: raw bytes / compressed bytes over all its games), the worst game's ratio, and encode / decode
speed in frames per second on one thread.

python tests/tools/measure_frame_codecs.py [--frames 3000] [--units 1 4 8 16 32]
blosc2 is not a requirement: install it in a side folder to measure it (its deps pull httpx, pydantic, rich):
    pip install --no-deps --target /tmp/blosc2lib blosc2 ndindex msgpack ...; PYTHONPATH=/tmp/blosc2lib python ...
"""

import argparse
import os
import sys
import time

import lz4.block
import numpy as np
import zstandard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import amago2_atari  # noqa: E402
import amago2_procgen  # noqa: E402

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
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
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


def print_per_game(sets: dict, results: dict):
    """Ratio per game for every unit of zstd-1 (the per-game view of the pooled table)."""
    ks = sorted({v[1] for (_, v) in results if v[0] == "zstd-1"})
    print("\n| game |" + "".join(f" zstd-1 x{k} |" for k in ks) + "".join(f" zstd-1 x{k} delta |" for k in ks if k > 1))
    print("|---|" + "---|" * (2 * len(ks) - 1))
    for s, games in sets.items():
        for g in games:
            cols = [("zstd-1", k, False) for k in ks] + [("zstd-1", k, True) for k in ks if k > 1]
            print(f"| {g} |" + "".join(f" {results[(s, c)][g][0] / results[(s, c)][g][1]:.1f}x |" for c in cols))


if __name__ == "__main__":
    main()
