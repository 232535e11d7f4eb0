# AMAGO-2 on Meta-World ML45 / ML10 / ML1: results table in README.md#meta-world
import functools
from typing import Callable

import gymnasium as gym
import metaworld
import numpy as np
import torch
import torch.nn as nn

# Fields of Args (written later) that this section reads:
#   seed: int        experiment seed; env i samples tasks with seed + i
#   benchmark: str   "ML45" | "ML10" | "ML1" (paper: ML45)
#   ml1_task: str    the Meta-World v3 task class used when benchmark == "ML1", e.g. "reach-v3"
#   k_episodes: int  episodes per meta-rollout on the same task variant (paper: 3)

# The goal variants belong to the benchmark, not to the run: every env and every experiment seed
# builds them with this seed, so all of them train and evaluate on the same variants.
BENCHMARK_SEED = 0


@functools.lru_cache(maxsize=None)
def metaworld_benchmark(benchmark: str, ml1_task: str, seed: int) -> metaworld.Benchmark:
    """Meta-World's own benchmark object: train/test task classes and 50 goal variants per class.
    Building it resets every class 50 times (ML45: ~25 s), so it is built once per process."""
    if benchmark == "ML1":  # one class; train and test are disjoint sets of goal variants
        return metaworld.ML1(ml1_task, seed=seed)
    assert benchmark in ("ML10", "ML45"), benchmark
    return getattr(metaworld, benchmark)(seed=seed)  # held-out test classes, unseen in training


class MetaWorldMetaEnv(gym.Env):
    """One gymnasium episode = one meta-rollout: k inner episodes on the same task variant.

    reset() samples a task class uniformly, then one of its goal variants uniformly. The goal is
    hidden from the 39-d state (the ML benchmarks zero it), so the agent must find it by trial
    and use what it learnt in the next attempts. The reset bit is not in obs: the shared core
    builds it from info["new_episode"] (and from reset)."""

    def __init__(self, benchmark: str = "ML45", ml1_task: str = "reach-v3", train: bool = True,
                 k_episodes: int = 3, episode_length: int = 500, task: str | None = None,
                 seed: int | None = None, benchmark_seed: int = BENCHMARK_SEED):
        bench = metaworld_benchmark(benchmark, ml1_task, benchmark_seed)
        classes = bench.train_classes if train else bench.test_classes
        tasks = bench.train_tasks if train else bench.test_tasks
        self.task_names = [task] if task is not None else list(classes)
        assert all(name in classes for name in self.task_names), f"{task} not in {list(classes)}"
        self.classes = classes
        self.variants = {name: [v for v in tasks if v.env_name == name] for name in self.task_names}
        self.k, self.episode_length = k_episodes, episode_length
        self.observation_space = gym.spaces.Dict({"obs": gym.spaces.Box(-np.inf, np.inf, (39,), np.float32)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.np_random = np.random.default_rng(seed)
        self.action_space.seed(seed)
        # one simulator, rebuilt only when the sampled class changes (~0.1 s): keeping all 45 ML45
        # classes alive would cost ~20 MB each, i.e. ~1 GB per parallel env
        self.sim, self.sim_name = None, None

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = self.task_names[self.np_random.integers(len(self.task_names))]
        variants = self.variants[self.task]
        variant = variants[self.np_random.integers(len(variants))]
        if self.sim_name != self.task:
            if self.sim is not None:
                self.sim.close()
            self.sim, self.sim_name = self.classes[self.task](), self.task
            # the raw env refuses to step past max_path_length; our own counter decides episode ends
            self.sim.max_path_length = self.episode_length
        self.sim.set_task(variant)  # freezes the goal/object positions: every inner reset replays them
        obs, _ = self.sim.reset()
        self.episode, self.t = 0, 0
        self.successes = np.zeros(self.k)  # per attempt: 1 if any step of that episode succeeded
        self.total_return = 0.0
        return {"obs": obs.astype(np.float32)}, {"new_episode": True, "policy_reward": 0.0}

    def step(self, action):
        # the raw env never terminates and its own time-limit flag is replaced by our counter
        obs, reward, _, _, raw_info = self.sim.step(np.clip(action, -1.0, 1.0))
        reward = float(reward)  # raw Meta-World reward, no multiplier (that lives in the loss)
        self.t += 1
        self.total_return += reward
        self.successes[self.episode] = max(self.successes[self.episode], float(raw_info["success"]))
        info = {"policy_reward": reward, "new_episode": False}
        truncated = False
        if self.t == self.episode_length:
            self.episode, self.t = self.episode + 1, 0
            if self.episode < self.k:
                # CRUCIAL: an inner episode end is not a terminal: same variant, same meta-rollout,
                # the Transformer keeps its memory of the previous attempts
                obs, _ = self.sim.reset()
                info["new_episode"] = True
            else:  # the k-th episode ended: a time limit, not a terminal (the critic may bootstrap)
                truncated = True
                info["task"] = self.task
                info["metrics"] = {f"success_{i + 1}": float(s) for i, s in enumerate(self.successes)}
                info["metrics"]["success"] = float(self.successes.mean())
                info["metrics"]["return"] = self.total_return
        return {"obs": obs.astype(np.float32)}, reward, False, truncated, info

    def close(self):
        if self.sim is not None:
            self.sim.close()


def make_env(args, env_idx: int, train: bool, task: str | None = None) -> Callable[[], gym.Env]:
    # build the benchmark here, in the parent process: sync vector envs and forked workers then
    # share this one cached copy instead of each paying ~25 s (ML45) to build their own
    metaworld_benchmark(args.benchmark, args.ml1_task, BENCHMARK_SEED)

    def thunk():
        return MetaWorldMetaEnv(args.benchmark, args.ml1_task, train, args.k_episodes, task=task,
                                seed=args.seed + env_idx)

    return thunk


def summarize_eval(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean metrics per task -> the paper's aggregate numbers (every task weighs the same)."""
    first = next(iter(per_task.values()))
    keys = ["success", "return"] + [key for key in first if key.startswith("success_")]
    out = {key: float(np.mean([m[key] for m in per_task.values()])) for key in keys}
    # skill coverage: tasks solved in at least 2 of 3 attempts on average (tolerance: float means)
    out["skill_coverage"] = float(sum(m["success"] >= 2 / 3 - 1e-6 for m in per_task.values()))
    return out


# ---- shared core goes here ----


class TimestepEncoder(nn.Module):
    """State-based timestep encoder: [obs, prev action, prev reward, reset bit] -> MLP -> LayerNorm."""

    def __init__(self, obs_space, action_dim: int, d_out: int = 256, momentum: float = 1e-4):
        super().__init__()
        d_in = obs_space["obs"].shape[0] + action_dim + 2
        # running input statistics (official library): buffers, so they are saved in state_dict.
        # Starting at mean 0 / second moment 1 with rate momentum / (1 - (1 - momentum)^t) is the
        # bias-corrected EMA, and leaves inputs unchanged until the first update.
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("sq_mean", torch.ones(d_in))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.mlp = nn.Sequential(
            nn.Linear(d_in, 512), nn.LeakyReLU(),
            nn.Linear(512, 512), nn.LeakyReLU(),
            nn.Linear(512, d_out),
        )
        self.norm = nn.LayerNorm(d_out)

    @torch.no_grad()
    def update_stats(self, x: torch.Tensor, mask: torch.Tensor | None):
        x = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]  # (N, d_in), valid steps only
        if x.shape[0] == 0:
            return
        self.count += 1
        rate = (self.momentum / (1 - (1 - self.momentum) ** self.count.double())).to(x.dtype)
        self.mean.lerp_(x.mean(0), rate)
        self.sq_mean.lerp_(x.pow(2).mean(0), rate)

    def forward(self, obs: dict, prev_action: torch.Tensor, prev_reward: torch.Tensor,
                reset: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        o = obs["obs"]
        x = torch.cat([o, prev_action.to(o.dtype), prev_reward[..., None].to(o.dtype),
                       reset[..., None].to(o.dtype)], dim=-1)  # (B, L, d_in)
        if self.training:
            self.update_stats(x, mask)
        # floor on std: a feature that was constant so far must not become a huge-gain input
        std = (self.sq_mean - self.mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)
        return self.norm(self.mlp((x - self.mean) / std))  # (B, L, d_out)
