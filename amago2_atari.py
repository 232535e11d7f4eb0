# AMAGO-2 on multi-game Atari (10 games, unclipped rewards): results table in README.md#atari
from typing import Callable

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

gym.register_envs(ale_py)

# The ten games of the paper's multi-game Atari experiment (paper Fig. 9).
GAMES = ["Pong", "Boxing", "Breakout", "Gopher", "MsPacman",
         "ChopperCommand", "CrazyClimber", "BattleZone", "Qbert", "Seaquest"]
# Random-agent and human reference scores as tabulated by Wang et al. 2016 (Dueling DQN) and used by
# Rainbow (Hessel et al. 2018) and Atari 100k, for the human-normalised score (HNS).
RANDOM_SCORES = {"Pong": -20.7, "Boxing": 0.1, "Breakout": 1.7, "Gopher": 257.6, "MsPacman": 307.3,
                 "ChopperCommand": 811.0, "CrazyClimber": 10780.5, "BattleZone": 2360.0,
                 "Qbert": 163.9, "Seaquest": 68.4}
HUMAN_SCORES = {"Pong": 14.6, "Boxing": 12.1, "Breakout": 30.5, "Gopher": 2412.5, "MsPacman": 6951.6,
                "ChopperCommand": 7387.8, "CrazyClimber": 35829.4, "BattleZone": 37187.5,
                "Qbert": 13455.0, "Seaquest": 42054.7}


def human_normalized_score(game: str, score: float) -> float:
    """HNS = (score - random) / (human - random): 0 plays like a random agent, 1 like a human."""
    return (score - RANDOM_SCORES[game]) / (HUMAN_SCORES[game] - RANDOM_SCORES[game])


class AtariEnv(gym.Env):
    """One game of `ALE/<game>-v5` as one meta-rollout: one game episode, no inner episodes.

    Observation {"image": uint8 (84, 84, 3)}: the RGB frame area-resized, no greyscale, no frame
    stack (the Transformer's memory replaces the stack). The full 18-action set makes every game
    share one action space. Rewards are the raw score changes: the scale-invariant update is what
    the paper tests, so clipping is only the `clip_rewards` baseline (paper Fig. 9 grey bars).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 15}  # 60 Hz console / frameskip 4

    def __init__(self, game: str, seed: int | None = None, clip_rewards: bool = False,
                 render_mode: str | None = None, max_num_frames_per_episode: int = 108_000):
        self.game, self.clip_rewards, self.render_mode = game, clip_rewards, render_mode
        # v5 defaults written out: sticky actions 0.25, frameskip 4, and the ALE time limit of
        # 108k frames (30 minutes of play), which ends the episode with truncated=True.
        self.ale = gym.make(f"ALE/{game}-v5", full_action_space=True, repeat_action_probability=0.25,
                            frameskip=4, max_num_frames_per_episode=max_num_frames_per_episode,
                            render_mode=render_mode)
        self.observation_space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (84, 84, 3), np.uint8)})
        self.action_space = self.ale.action_space  # Discrete(18)
        self.action_space.seed(seed)
        self._seed = seed  # used by the first reset only, so the game's RNG runs on afterwards
        self.episode_return = 0.0

    def _obs(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        # PIL's BOX filter is area averaging (what cv2.INTER_AREA does), 210x160 -> 84x84.
        return {"image": np.asarray(Image.fromarray(frame).resize((84, 84), Image.Resampling.BOX))}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is None:
            seed, self._seed = self._seed, None
        frame, _ = self.ale.reset(seed=seed)
        self.episode_return = 0.0
        return self._obs(frame), {}

    def step(self, action):
        frame, reward, terminated, truncated, _ = self.ale.step(int(action))
        reward = float(reward)
        self.episode_return += reward
        policy_reward = float(np.sign(reward)) if self.clip_rewards else reward
        info = {"policy_reward": policy_reward, "new_episode": False}  # one game == one meta-rollout
        if terminated or truncated:
            info["task"] = self.game
            info["metrics"] = {"return": self.episode_return,
                               "hns": human_normalized_score(self.game, self.episode_return)}
        return self._obs(frame), policy_reward, terminated, truncated, info

    def render(self):
        return self.ale.render()  # the full 210x160 frame, for videos

    def close(self):
        self.ale.close()


# make_env reads these fields of Args: seed (int), games (list[str]), clip_rewards (bool),
# capture_video (bool), run_name (str).
def make_env(args, env_idx: int, train: bool, task: str | None = None) -> Callable[[], gym.Env]:
    """Thunk for gymnasium.vector: env i plays game i mod len(games) (or `task`), seed args.seed + i."""
    game = task if task is not None else args.games[env_idx % len(args.games)]

    def thunk():
        record = args.capture_video and not train and env_idx == 0
        env = AtariEnv(game, seed=args.seed + env_idx, clip_rewards=args.clip_rewards,
                       render_mode="rgb_array" if record else None)
        if record:  # gymnasium's RecordVideo needs moviepy
            env = gym.wrappers.RecordVideo(env, f"videos/{args.run_name}")
        return env

    return thunk


def summarize_eval(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """per_task: game -> {"return", "hns"} (each averaged over that game's eval episodes)."""
    hns = [m["hns"] for m in per_task.values()]
    return {"hns_mean": float(np.mean(hns)), "hns_median": float(np.median(hns)),
            "return_mean": float(np.mean([m["return"] for m in per_task.values()]))}


# ---- shared core goes here ----


def symlog(x):  # TODO: import from common/ once it exists
    return torch.sign(x) * torch.log1p(x.abs())


class ResidualBlock(nn.Module):
    """x + conv(act(conv(act(x)))), 3x3 convs that keep the shape."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.leaky_relu(self.conv1(F.leaky_relu(x, 0.01)), 0.01))


class ImpalaBlock(nn.Module):
    """IMPALA CNN block: conv3x3, maxpool 3 stride 2 (halves H and W), two residual blocks, GroupNorm."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.res1, self.res2 = ResidualBlock(channels), ResidualBlock(channels)
        self.norm = nn.GroupNorm(4, channels)  # 4 groups (official library)

    def forward(self, x):
        return self.norm(self.res2(self.res1(self.pool(self.conv(x)))))


class TimestepEncoder(nn.Module):
    """Pixel timestep encoder (SPEC section 1): one token per timestep from
    (frame o_t, previous action a_{t-1}, previous reward r_{t-1}, reset bit d_{t-1})."""

    def __init__(self, obs_space, num_actions: int, d_out: int = 256, channels=(16, 32, 32),
                 image_features: int = 256):
        super().__init__()
        self.num_actions = num_actions
        H, W, C = obs_space["image"].shape
        blocks = []
        for c in channels:
            blocks.append(ImpalaBlock(C, c))
            C, H, W = c, (H + 1) // 2, (W + 1) // 2  # each maxpool: ceil(size / 2)
        self.cnn = nn.Sequential(*blocks, nn.Flatten())
        self.image_proj = nn.Sequential(nn.Linear(C * H * W, image_features), nn.LayerNorm(image_features))
        self.rl2_proj = nn.Linear(num_actions + 2, 12)  # "small Linear": 12 features (official library)
        self.merge = nn.Linear(image_features + 12, d_out)
        self.out_norm = nn.LayerNorm(d_out)

    def forward(self, obs: dict[str, torch.Tensor], prev_action: torch.Tensor, prev_reward: torch.Tensor,
                reset: torch.Tensor) -> torch.Tensor:
        """obs["image"] uint8 (B, L, H, W, 3); prev_action long (B, L), -1 = none (the first step of
        a meta-rollout: an all-zero one-hot); prev_reward, reset float (B, L). Returns (B, L, d_out)."""
        img = obs["image"]
        B, L = img.shape[:2]
        x = img.reshape(B * L, *img.shape[2:]).permute(0, 3, 1, 2).float() / 128.0 - 1.0  # (B*L, C, H, W)
        x = self.image_proj(self.cnn(x)).reshape(B, L, -1)  # (B, L, image_features)
        a = F.one_hot(prev_action.clamp(min=0), self.num_actions) * (prev_action >= 0).unsqueeze(-1)
        rl2 = torch.cat([a.float(), prev_reward.unsqueeze(-1).float(), reset.unsqueeze(-1).float()], -1)
        rl2 = self.rl2_proj(symlog(rl2))  # symlog: raw Atari rewards reach the thousands
        return self.out_norm(self.merge(torch.cat([x, rl2], -1)))


def random_shift(frames: torch.Tensor, pad: int = 4, fraction: float = 0.75) -> torch.Tensor:
    """DrQ-v2 augmentation: pad each frame by `pad` pixels with edge replication and crop back at a
    random integer offset in [0, 2 * pad], independently per frame, for a random `fraction` of the
    frames (official library: 75%); the rest pass untouched. frames uint8 (..., H, W, C)."""
    shape = frames.shape
    H, W = shape[-3], shape[-2]
    frames = frames.reshape(-1, *shape[-3:])  # (N, H, W, C)
    idx = torch.randperm(len(frames), device=frames.device)[: round(fraction * len(frames))]
    dy, dx = torch.randint(0, 2 * pad + 1, (2, len(idx), 1), device=frames.device)
    # Crop of the edge-padded frame at (dy, dx) == read source pixel (i + dy - pad), clamped.
    rows = (torch.arange(H, device=frames.device) + dy - pad).clamp(0, H - 1)  # (n, H)
    cols = (torch.arange(W, device=frames.device) + dx - pad).clamp(0, W - 1)  # (n, W)
    out = frames.clone()
    out[idx] = frames[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
    return out.reshape(shape)
