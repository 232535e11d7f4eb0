"""Measure the random-policy return of each POPGym task (the 0 of amago2_popgym.py's normalised score).

Not a test: prints the RANDOM_RETURNS table. python tests/tools/measure_popgym_random.py [episodes]
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import amago2_popgym as A

if __name__ == "__main__":
    episodes = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rng = np.random.default_rng(0)
    table = {}
    for task in A.POPGYM_TASKS:
        env = A.POPGymMetaEnv([task], one_shot=False)
        returns = []
        for ep in range(episodes):
            env.reset(seed=ep)
            n = A.num_actions(env.env.action_space)
            while True:
                _, _, term, trunc, info = env.step(rng.integers(n))  # uniform over the task's own actions
                if term or trunc:
                    returns.append(info["metrics"]["return"])
                    break
        table[task] = round(float(np.mean(returns)), 3)
        print(f'    "{task}": {table[task]},', flush=True)
