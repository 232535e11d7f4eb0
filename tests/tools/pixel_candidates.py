"""Which pixel games give a short CPU run something to learn from? (not part of pytest)

For each candidate game, plays our own wrapper (the training protocol: Procgen's two attempts on one level, Atari's
single game) with uniform random actions and prints what a learner would see in its first steps: the rewarded
fraction of steps, the return per meta-rollout and per 1,000 steps, and the meta-rollout length.

    python tests/tools/pixel_candidates.py --steps 3000
"""

import argparse
import importlib
import os
import sys
import time

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

CANDIDATES = {
    "procgen": ["coinrun", "bigfish", "fruitbot", "starpilot"],
    "atari": ["Boxing", "Breakout", "Pong"],
}


def random_play(script: str, game: str, steps: int, seed: int) -> dict:
    module = importlib.import_module(f"amago2_{script}")
    args = tyro.cli(module.Args, args=["--games", game])
    env = module.make_env(args, 0, train=True)()
    env.action_space.seed(seed)
    rewards, returns, lengths, length = [], [], [], 0
    env.reset(seed=seed)
    for _ in range(steps):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        rewards.append(reward)
        length += 1
        if terminated or truncated:
            returns.append(info["metrics"]["return"])
            lengths.append(length)
            length = 0
            env.reset(seed=seed + len(returns))
    env.close()
    r = np.array(rewards)
    return dict(
        rewarded=float((r != 0).mean()),
        per_1k=float(r.sum() / steps * 1000),
        rollouts=len(returns),
        mean_len=float(np.mean(lengths)) if lengths else float("nan"),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="random steps per game (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    print("| script | game | rewarded steps | reward per 1k steps | finished meta-rollouts | mean length | seconds |")
    print("|---|---|---|---|---|---|---|")
    for script, games in CANDIDATES.items():
        for game in games:
            start = time.time()
            m = random_play(script, game, opts.steps, opts.seed)
            print(
                f"| {script} | {game} | {m['rewarded']:.3f} | {m['per_1k']:.1f} | {m['rollouts']} | {m['mean_len']:.0f} |"
                f" {time.time() - start:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
