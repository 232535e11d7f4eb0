# AMAGO-2 on multi-task BabyAI (50 train / 18 held-out tasks, two attempts): results table in README.md#babyai
import contextlib
import io
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX  # importing minigrid registers BabyAI-*

# The 68 single-instruction BabyAI tasks of minigrid 3.2.0 (SPEC section 6). The registry's other 28 BabyAI ids are
# left out: the multi-step families (PutNext*, PutNextLocal*, GoToSeq*, MoveTwoAcross*, OpenDoorsOrder*,
# OpenTwoDoors, OpenRedBlueDoorsDebug) and the Synth/Boss families (Synth, SynthLoc, SynthS5R2, SynthSeq,
# BossLevel, BossLevelNoUnlock, MiniBossLevel).
TRAIN_TASKS = [
    "GoToLocalS7N5", "GoToObjMaze", "KeyCorridor", "KeyCorridorS3R3", "GoToRedBall", "KeyCorridorS3R2",
    "KeyCorridorS3R1", "Unlock", "GoToLocalS8N4", "GoToObjMazeOpen", "KeyCorridorS4R3", "UnlockLocal",
    "GoToObjMazeS5", "GoToObjMazeS4R2", "GoToLocal", "PickupLoc", "UnlockPickup", "GoTo", "FindObjS6",
    "BlockedUnlockPickup", "KeyCorridorS5R3", "GoToObjS6", "KeyInBox", "Open", "GoToOpen", "GoToDoor", "FindObjS7",
    "OpenRedDoor", "PickupDist", "GoToImpUnlock", "UnblockPickup", "OpenDoor", "GoToObjMazeS4", "OneRoomS12",
    "GoToObjMazeS6", "GoToRedBallNoDists", "OpenDoorDebug", "GoToLocalS8N5", "OneRoomS20", "Pickup",
    "GoToRedBlueBall", "OpenDoorColor", "PickupAbove", "GoToObjDoor", "OpenRedBlueDoors", "UnlockToUnlock",
    "OneRoomS16", "GoToLocalS8N6", "OneRoomS8", "PickupDistDebug",
]
TEST_TASKS = [
    "GoToRedBallGrey", "GoToObj", "GoToObjS4", "GoToLocalS5N2", "GoToLocalS6N2", "GoToLocalS6N3", "GoToLocalS6N4",
    "GoToLocalS7N4", "GoToLocalS8N2", "GoToLocalS8N3", "GoToLocalS8N7", "GoToObjMazeS7", "OpenDoorLoc",
    "UnlockLocalDist", "UnlockPickupDist", "ActionObjDoor", "FindObjS5", "KeyCorridorS6R3",
]
# Layout seeds: evaluation only ever sees seeds that training never draws.
TRAIN_SEED_RANGE = (0, 1_000_000)
EVAL_SEED_RANGE = (1_000_000, 2_000_000)

# The 29 words of the 68 tasks' missions (SPEC section 6). "door," is a word of its own: missions are split on
# whitespace only, and OpenRedBlueDoors says "open the red door, then open the blue door".
VOCAB = [
    "a", "ball", "behind", "blue", "box", "door", "door,", "front", "go", "green", "grey", "in", "key", "left",
    "object", "of", "on", "open", "pick", "purple", "red", "right", "the", "then", "to", "up", "yellow", "you", "your",
]
BLANK, UNKNOWN = 0, 1
WORD_TO_ID = {word: i + 2 for i, word in enumerate(VOCAB)}  # ids 2..30
VOCAB_SIZE = len(VOCAB) + 2
# Longest mission = 9 words: "pick up the yellow box in front of you", "open the red door, then open the blue door"
# (the grammar's maximum: verb (2) + the + colour + type + "in front of you" (4)).
MAX_MISSION_LEN = 9


def babyai_id(task: str) -> str:
    return f"BabyAI-{task}-v1" if task == "GoToObjS6" else f"BabyAI-{task}-v0"  # minigrid 3.x: GoToObjS6 is v1 only


def tokenize(mission: str) -> np.ndarray:
    """Mission string -> (MAX_MISSION_LEN,) int64 word ids, padded with BLANK; unknown words map to UNKNOWN."""
    ids = [WORD_TO_ID.get(word, UNKNOWN) for word in mission.lower().split()][:MAX_MISSION_LEN]
    return np.array(ids + [BLANK] * (MAX_MISSION_LEN - len(ids)), dtype=np.int64)


class BabyAIMetaEnv(gym.Env):
    """One episode of this env is one meta-rollout: draw a task and a layout seed, then play k_episodes attempts
    on that same layout (the minigrid env is reset with the same seed before every attempt)."""

    def __init__(self, train: bool = True, task: str | None = None, k_episodes: int = 2, seed: int = 0):
        self.tasks = [task] if task is not None else (TRAIN_TASKS if train else TEST_TASKS)
        self.seed_range = TRAIN_SEED_RANGE if train else EVAL_SEED_RANGE
        self.k_episodes = k_episodes
        self.rng = np.random.default_rng(seed)
        self.envs = {}  # one minigrid env per task, built on first use and kept
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8),
            "direction": gym.spaces.Box(0, 3, (1,), np.int64),
            "mission": gym.spaces.Box(0, VOCAB_SIZE - 1, (MAX_MISSION_LEN,), np.int64),
            "progress": gym.spaces.Box(0.0, 1.0, (1,), np.float32),
        })
        self.action_space = gym.spaces.Discrete(7)

    def _obs(self, obs: dict) -> dict:
        env = self.env.unwrapped
        return {
            "image": obs["image"],
            "direction": np.array([obs["direction"]], dtype=np.int64),
            "mission": self.mission.copy(),
            "progress": np.array([env.step_count / env.max_steps], dtype=np.float32),
        }

    def _start_attempt(self) -> dict:
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints every rejected layout sample
            obs, _ = self.env.reset(seed=self.layout_seed)
        self.mission = tokenize(obs["mission"])
        self.attempt_return = 0.0
        return self._obs(obs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.task = self.tasks[self.rng.integers(len(self.tasks))]
        self.layout_seed = int(self.rng.integers(*self.seed_range))
        if self.task not in self.envs:
            self.envs[self.task] = gym.make(babyai_id(self.task))
        self.env = self.envs[self.task]
        self.returns, self.successes = [], []
        return self._start_attempt(), {}

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.env.step(int(action))
        reward = float(reward)  # raw: 1 - 0.9 * steps / max_steps on success, else 0; the multiplier is elsewhere
        self.attempt_return += reward
        info = {"new_episode": False, "policy_reward": reward}
        if not (terminated or truncated):
            return self._obs(obs), reward, False, False, info
        self.returns.append(self.attempt_return)
        self.successes.append(float(reward > 0))  # BabyAI pays reward only on success
        if len(self.returns) < self.k_episodes:
            # CRUCIAL: an attempt boundary is not a terminal: the same layout restarts inside the same meta-rollout,
            # memory is kept and the critic bootstraps across it.
            info["new_episode"] = True
            return self._start_attempt(), reward, False, False, info
        info["task"] = self.task
        info["metrics"] = {f"return_{a + 1}": r for a, r in enumerate(self.returns)}
        info["metrics"].update({f"success_{a + 1}": s for a, s in enumerate(self.successes)})
        return self._obs(obs), reward, bool(terminated), bool(truncated and not terminated), info


def make_env(args, env_idx: int, train: bool, task: str | None = None) -> Callable[[], gym.Env]:
    # Reads args.seed (env env_idx draws its tasks and layouts from seed + env_idx) and args.k_episodes (attempts
    # per meta-rollout). train=False draws held-out tasks (or the pinned task) on unseen layout seeds.
    def thunk():
        return BabyAIMetaEnv(train=train, task=task, k_episodes=args.k_episodes, seed=args.seed + env_idx)

    return thunk


def summarize_eval(per_task: dict) -> dict:
    """Median, mean and IQM over tasks of each attempt's return (paper Fig. 10), and mean success per attempt.
    per_task maps a task name to its info["metrics"]: each value a float or a list over that task's rollouts."""
    summary = {}
    k = sum(key.startswith("return_") for key in next(iter(per_task.values())))
    for a in range(1, k + 1):
        x = np.sort([np.mean(metrics[f"return_{a}"]) for metrics in per_task.values()])
        cut = int(0.25 * len(x))  # IQM = scipy.stats.trim_mean(x, 0.25): drop floor(n / 4) tasks at each end
        summary[f"return_{a}_median"] = float(np.median(x))
        summary[f"return_{a}_mean"] = float(x.mean())
        summary[f"return_{a}_iqm"] = float(x[cut:len(x) - cut].mean())
        summary[f"success_{a}_mean"] = float(np.mean([np.mean(m[f"success_{a}"]) for m in per_task.values()]))
    return summary


# ---- shared core goes here ----


class TimestepEncoder(nn.Module):
    """SPEC section 1 (BabyAI): grid CNN + mission GRU + MLP on [direction, progress, prev action, prev reward,
    reset]; concatenate, Linear, LayerNorm."""

    def __init__(self, obs_space, num_actions: int, d_out: int = 256):
        super().__init__()
        self.num_actions = num_actions
        # Each grid cell holds (object, colour, state) ids: one embedding table, the three id ranges side by side.
        sizes = torch.tensor([len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX)])
        self.register_buffer("cell_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("cell_max", sizes - 1, persistent=False)
        self.cell_embed = nn.Embedding(int(sizes.sum()), 8)
        h, w, _ = obs_space["image"].shape
        self.cnn = nn.Sequential(
            nn.Conv2d(3 * 8, 32, 3, padding=1), nn.LeakyReLU(0.01),
            nn.Conv2d(32, 64, 3), nn.LeakyReLU(0.01),
            nn.Conv2d(64, 64, 3), nn.LeakyReLU(0.01),
            nn.Flatten(), nn.Linear(64 * (h - 4) * (w - 4), 128), nn.LeakyReLU(0.01),
        )
        self.word_embed = nn.Embedding(VOCAB_SIZE, 32, padding_idx=BLANK)
        self.gru = nn.GRU(32, 128, batch_first=True)
        self.extras = nn.Sequential(
            nn.Linear(4 + 1 + num_actions + 2, 64), nn.LeakyReLU(0.01), nn.Linear(64, 64), nn.LeakyReLU(0.01)
        )
        self.out = nn.Linear(128 + 128 + 64, d_out)
        self.norm = nn.LayerNorm(d_out)

    def mission_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, M) word ids -> (N, 128): the GRU state after each mission's last real word."""
        # A window mostly repeats one mission: run the GRU once per distinct token sequence, then scatter back.
        tokens, inverse = torch.unique(tokens, dim=0, return_inverse=True)  # (U, M)
        out, _ = self.gru(self.word_embed(tokens))  # (U, M, 128)
        last = (tokens != BLANK).sum(-1).clamp(min=1) - 1  # padding is only ever trailing: the last real word
        return out[torch.arange(len(tokens), device=out.device), last][inverse]

    def forward(self, obs: dict, prev_action: torch.Tensor, prev_reward: torch.Tensor, reset: torch.Tensor):
        B, L = prev_action.shape
        cells = torch.minimum(obs["image"].long().flatten(0, 1), self.cell_max) + self.cell_offset  # (N, 7, 7, 3)
        cells = self.cell_embed(cells).flatten(-2).permute(0, 3, 1, 2)  # (N, 24, 7, 7)
        image = self.cnn(cells)
        mission = self.mission_features(obs["mission"].long().flatten(0, 1))
        extras = torch.cat([
            F.one_hot(obs["direction"].long().reshape(B * L), 4).float(),
            obs["progress"].reshape(B * L, 1).float(),
            F.one_hot(prev_action.long().reshape(B * L), self.num_actions).float(),
            prev_reward.reshape(B * L, 1).float(),
            reset.reshape(B * L, 1).float(),
        ], -1)
        x = torch.cat([image, mission, self.extras(extras)], -1)
        return self.norm(self.out(x)).reshape(B, L, -1)
