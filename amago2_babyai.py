# AMAGO-2 on multi-task BabyAI (50 train / 18 held-out tasks, two attempts): results table in README.md#babyai
import collections
import contextlib
import copy
import datetime
import io
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX  # importing minigrid registers BabyAI-*
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common.replay import Prefetcher, ReplayBuffer, ReplayMemoryError, trim_padding
from common.twohot import bin_supports, bins_to_scalar, symlog, twohot


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (runs/<exp_name>__<seed>__<time>)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks cuda when a GPU is visible, else cpu"""
    track: bool = False
    """also log the run to Weights & Biases (CleanRL's --track; WANDB_MODE=offline logs without a network)"""
    wandb_project_name: str = "amago2-clean"
    """the wandb project (with --track)"""
    wandb_entity: str | None = None
    """the wandb team or user (with --track; None: your default entity)"""
    save_model: bool = False
    """checkpoint everything (weights, optimiser, statistics, RNG, replay buffer) every --checkpoint-every steps"""
    checkpoint_every: int = 1_000_000
    """environment steps between checkpoints (with --save-model)"""
    resume: str | None = None
    """a run folder to continue from its last checkpoint, with its saved flags (--total-timesteps may be raised)"""
    eval_only: bool = False
    """with --resume RUN_DIR: evaluate its checkpoint's agent (--eval-episodes per task), train nothing, change nothing"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocasts the update's matmuls (faster on CPUs and GPUs with bf16 units)"""
    compile: bool = False
    """torch.compile the critic ensembles, where an update spends most of its FLOPs (docs/speed.md)"""
    buffer_dir: str | None = None
    """keep the replay buffer memory-mapped in this folder instead of RAM"""
    async_envs: bool = False
    """step envs in subprocesses (gymnasium AsyncVectorEnv); BabyAI steps are cheap, so sync is faster"""
    eval_every: int = 1_000_000
    """environment steps between evaluations (0: only at the end)"""
    eval_episodes: int = 5
    """evaluation meta-rollouts per task"""
    log_every: float = 5.0
    """seconds between redraws of the progress bar"""
    capture_video: bool = False
    """record every evaluation meta-rollout of the first evaluation task to runs/<run_name>/videos (needs moviepy)"""

    # Algorithm specific arguments
    tasks: list[str] = field(default_factory=lambda: list(TRAIN_TASKS))
    """training tasks, one drawn uniformly per meta-rollout (paper: the 50 training tasks of App. B)"""
    test_tasks: list[str] = field(default_factory=lambda: list(TEST_TASKS))
    """held-out tasks, evaluated only, never trained on (paper: the 18 held-out tasks); may be empty"""
    k_episodes: int = 2
    """attempts on the same task and layout per meta-rollout (paper Sec. 4: "two attempts")"""
    actor_loss: Literal["ind", "dep"] = "ind"
    """ind: CRR binary filter (Eq. 4); dep: maximise Q (Eq. 2)"""
    critic_loss: Literal["ind", "dep"] = "ind"
    """ind: two-hot classification (Eq. 3); dep: PopArt-normalised MSE (Eq. 1)"""
    total_timesteps: int = 100_000_000
    """total environment steps (our choice: the paper states no BabyAI budget; POPGym and ML45 use 100M)"""
    num_envs: int = 24
    """parallel environments (our choice; the paper does not state it)"""
    steps_per_epoch: int = 1000
    """steps collected per env between update phases (official library default)"""
    updates_per_epoch: int = 1000
    """gradient updates per epoch (official library default)"""
    buffer_size: int = 10_000_000
    """replay capacity in timesteps (paper Table 1, BabyAI)"""
    replay_sampling: Literal["rollout", "timestep"] = "rollout"
    """a stored rollout drawn uniformly, then a window in it (authors' library), or windows uniform over timesteps"""
    batch_size: int = 24
    """sequences per batch (paper Table 1)"""
    context_len: int = 512
    """context length l in timesteps (paper Table 2, BabyAI)"""
    d_token: int = 300
    """timestep encoder output size (official library's BabyAI example; paper Table 2 names only the encoder's parts)"""
    d_model: int = 256
    """Transformer width (paper Table 2)"""
    d_ff: int = 1024
    """Transformer feed-forward width (paper Table 2)"""
    n_layers: int = 4
    """Transformer layers (paper Table 2, BabyAI)"""
    n_heads: int = 8
    """attention heads (paper Table 2)"""
    dropout: float = 0.05
    """embedding and feed-forward dropout (official library)"""
    gammas: list[float] = field(default_factory=lambda: [0.1, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999])
    """learning discounts, one actor output and one critic input each (paper Table 1)"""
    rollout_gamma: float = 0.999
    """the gamma whose actor head acts in rollouts (paper Table 1); must be one of --gammas"""
    num_critics: int = 4
    """critic ensemble size (paper Table 1)"""
    num_bins: int = 32
    """two-hot bins B for --critic-loss ind (paper Table 2, BabyAI)"""
    head_hidden: int = 256
    """hidden width of the actor and critic MLPs (256, 256) (paper Table 2)"""
    tau: float = 0.003
    """EMA rate of the target actor and critic heads (paper Table 1)"""
    critic_weight: float = 10.0
    """lambda in actor_loss + lambda * critic_loss (official library)"""
    reward_multiplier: float = 1000.0
    """reward scale inside the loss only (official library's BabyAI launch: 1000)"""
    crr_samples: int = 3
    """policy samples in the CRR advantage baseline (official library)"""
    crr_threshold: float = 0.0
    """CRR keeps buffer actions with advantage above this (paper Eq. 4: 0; the official -1e-4: docs/differences.md)"""
    popart_beta: float = 5e-4
    """rate of the global PopArt statistics (dep critic output, dep actor Q scale) (official library)"""
    learning_rate: float = 1e-4
    """AdamW learning rate (paper Table 1, BabyAI)"""
    weight_decay: float = 1e-3
    """AdamW decay, the paper's L2 penalty (paper Table 1, BabyAI)"""
    grad_clip: float = 1.0
    """global gradient-norm clip (paper Table 1, BabyAI)"""
    warmup_updates: int = 500
    """linear learning-rate warmup (official library)"""
    eps_start: float = 1.0
    """epsilon-greedy start value (official library)"""
    eps_end: float = 0.05
    """epsilon-greedy end value (official library)"""
    eps_anneal_steps: int = 1_000_000
    """steps per env over which epsilon anneals (official library default; its BabyAI launch keeps it)"""
    eval_tasks_per_split: int | None = None
    """evaluate on at most this many training and held-out tasks each, spread over the lists (None: all)"""

    # filled in at runtime
    run_name: str = ""
    """runs/<run_name>: filled in at runtime"""
    wandb_id: str = ""
    """the wandb run's id, saved with the flags so that --resume continues the same run: filled in at runtime"""


# ==== Environment: multi-task BabyAI, one gymnasium episode = one meta-rollout of k attempts ==========================
# The 68 single-instruction BabyAI tasks of minigrid 3.2.0 (paper App. B). The registry's other 28 BabyAI ids are
# left out: the multi-step families (PutNext*, PutNextLocal*, GoToSeq*, MoveTwoAcross*, OpenDoorsOrder*,
# OpenTwoDoors, OpenRedBlueDoorsDebug) and the Synth/Boss families (Synth, SynthLoc, SynthS5R2, SynthSeq,
# BossLevel, BossLevelNoUnlock, MiniBossLevel).
# fmt: off
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
# fmt: on
# Layout seeds (the authors' launch script): training draws from [0, 5000), evaluation from seeds above them that
# training never draws, the paper's "unseen layouts".
TRAIN_SEED_RANGE = (0, 5_000)
EVAL_SEED_RANGE = (5_000, 1_000_000)

# The 29 words of the 68 tasks' missions (paper App. B). "door," is a word of its own: missions are split on
# whitespace only, and OpenRedBlueDoors says "open the red door, then open the blue door".
# fmt: off
VOCAB = [
    "a", "ball", "behind", "blue", "box", "door", "door,", "front", "go", "green", "grey", "in", "key", "left",
    "object", "of", "on", "open", "pick", "purple", "red", "right", "the", "then", "to", "up", "yellow", "you", "your",
]
# fmt: on
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

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self, train: bool = True, task: str | None = None, k_episodes: int = 2, seed: int = 0, tasks: list[str] | None = None,
        render_mode: str | None = None,
    ):  # fmt: skip
        self.render_mode = render_mode
        self.tasks = [task] if task is not None else (tasks or (TRAIN_TASKS if train else TEST_TASKS))
        self.seed_range = TRAIN_SEED_RANGE if train else EVAL_SEED_RANGE
        self.k_episodes = k_episodes
        self.np_random = np.random.default_rng(seed)
        self.envs = {}  # one minigrid env per task, built on first use and kept
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8),
                "direction": gym.spaces.Box(0, 3, (1,), np.uint8),  # uint8 ids: 70 bytes less per replay timestep
                "mission": gym.spaces.Box(0, VOCAB_SIZE - 1, (MAX_MISSION_LEN,), np.uint8),
                "progress": gym.spaces.Box(0.0, 1.0, (1,), np.float32),
                "attempt": gym.spaces.Box(0.0, 1.0, (1,), np.float32),
            }
        )
        self.action_space = gym.spaces.Discrete(7)

    def _obs(self, obs: dict) -> dict:
        env = self.env.unwrapped
        return {
            "image": obs["image"],
            "direction": np.array([obs["direction"]], dtype=np.uint8),
            "mission": self.mission.copy(),
            "progress": np.array([env.step_count / env.max_steps], dtype=np.float32),
            # the attempt number / k, 1/k in the first attempt (official library): attempt 2's first observation
            # differs from attempt 1's
            "attempt": np.array([(len(self.returns) + 1) / self.k_episodes], dtype=np.float32),
        }

    def _start_attempt(self) -> dict:
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints every rejected layout sample
            obs, _ = self.env.reset(seed=self.layout_seed)
        self.mission = tokenize(obs["mission"]).astype(np.uint8)
        self.attempt_return = 0.0
        return self._obs(obs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)  # seeds self.np_random (gymnasium's protocol); unseeded resets continue its stream
        self.task = self.tasks[self.np_random.integers(len(self.tasks))]
        self.layout_seed = int(self.np_random.integers(*self.seed_range))
        if self.task not in self.envs:
            self.envs[self.task] = gym.make(babyai_id(self.task), render_mode=self.render_mode)
        self.env = self.envs[self.task]
        self.returns, self.successes = [], []
        return self._start_attempt(), {}

    def render(self) -> np.ndarray:
        return self.env.render()  # the whole room from above, the agent's view highlighted

    def step(self, action):
        obs, reward, terminated, truncated, _ = self.env.step(int(action))
        reward = float(reward)  # raw: 1 - 0.9 * steps / max_steps on success, else 0; the multiplier is elsewhere
        self.attempt_return += reward
        info = {"new_episode": False, "prev_reward": reward}
        if not (terminated or truncated):
            return self._obs(obs), reward, False, False, info
        self.returns.append(self.attempt_return)
        self.successes.append(float(reward > 0))  # BabyAI pays reward only on success
        if len(self.returns) < self.k_episodes:
            # CRUCIAL: an attempt boundary is not a terminal: the same layout restarts inside the same meta-rollout,
            # memory is kept and the critic bootstraps across it.
            info["new_episode"] = True
            return self._start_attempt(), reward, False, False, info
        info["task"] = f"test/{self.task}" if self.task in TEST_TASKS else self.task  # held-out: eval/test/<task>/...
        info["metrics"] = {"return": sum(self.returns)}  # the whole meta-rollout's return
        info["metrics"].update({f"return_{a + 1}": r for a, r in enumerate(self.returns)})
        info["metrics"].update({f"success_{a + 1}": s for a, s in enumerate(self.successes)})
        # CRUCIAL: the last attempt's end is the end of the protocol, a terminal also where the attempt ran out of time
        # (official library: done): nothing follows it to bootstrap from
        return self._obs(obs), reward, True, False, info


def make_env(args: Args, env_idx: int, train: bool, task: str | None = None) -> Callable[[], gym.Env]:
    # Reads args.seed (env env_idx draws its tasks and layouts from seed + env_idx) and args.k_episodes (attempts
    # per meta-rollout). train=False draws held-out tasks (or the pinned task) on unseen layout seeds.
    def thunk():
        record = args.capture_video and not train and env_idx == 0
        mode = "rgb_array" if record else None
        env = BabyAIMetaEnv(train, task, args.k_episodes, args.seed + env_idx, args.tasks, render_mode=mode)
        return record_video(env, args) if record else env

    return thunk


def record_video(env: gym.Env, args: Args) -> gym.Env:
    """--capture-video, evaluation env 0: every meta-rollout, all its attempts in one file, to runs/<run_name>/videos
    (gymnasium's RecordVideo, written with moviepy): a frame at the meta-rollout's reset and one after every step."""
    folder = os.path.join("runs", args.run_name, "videos")
    # --eval-only records exactly the meta-rollouts it scores; a training run's evaluations record every one
    return gym.wrappers.RecordVideo(
        env, folder, episode_trigger=lambda e: not args.eval_only or e < args.eval_episodes, disable_logger=True
    )


def make_eval_envs(args: Args) -> list:
    """One evaluation env pinned to each training task and to each held-out task, on layout seeds that training never
    draws (train=False); with --eval-tasks-per-split n, n tasks of each list, spread evenly over it."""
    tasks = []
    for split in (args.tasks, args.test_tasks):
        n = min(args.eval_tasks_per_split or len(split), len(split))
        tasks += [split[i * len(split) // n] for i in range(n)]
    return [make_env(args, i, train=False, task=task) for i, task in enumerate(tasks)]


def check_env_args(args: Args):
    for flag, names, known in (("--tasks", args.tasks, TRAIN_TASKS), ("--test-tasks", args.test_tasks, TEST_TASKS)):
        unknown = sorted(set(names) - set(known))
        if unknown:
            fail(f"{flag}: unknown task(s) {unknown}; choose from: {', '.join(known)}")
    if not args.tasks:
        fail("--tasks needs at least one training task")
    if args.k_episodes <= 0:
        fail(f"--k-episodes must be positive, got {args.k_episodes}")
    if args.eval_tasks_per_split is not None and args.eval_tasks_per_split <= 0:
        fail(f"--eval-tasks-per-split must be positive (or None: all tasks), got {args.eval_tasks_per_split}")


def summarize_eval(per_task: dict) -> dict:
    """Median, mean and IQM over tasks of each attempt's return (paper Fig. 10), and mean success per attempt, for the
    training tasks (keys train_*) and the held-out tasks (keys test_*, tasks named "test/<task>") separately.
    per_task maps a task name to its info["metrics"]: each value a float or a list over that task's rollouts."""
    summary = {}
    for split in ("train", "test"):
        tasks = [m for t, m in per_task.items() if t.startswith("test/") == (split == "test")]
        k = sum(key.startswith("return_") for key in tasks[0]) if tasks else 0
        for a in range(1, k + 1):
            x = np.sort([np.mean(m[f"return_{a}"]) for m in tasks])
            cut = int(0.25 * len(x))  # IQM = scipy.stats.trim_mean(x, 0.25): drop floor(n / 4) tasks at each end
            summary[f"{split}_return_{a}_median"] = float(np.median(x))
            summary[f"{split}_return_{a}_mean"] = float(x.mean())
            summary[f"{split}_return_{a}_iqm"] = float(x[cut : len(x) - cut].mean())
            summary[f"{split}_success_{a}_mean"] = float(np.mean([np.mean(m[f"success_{a}"]) for m in tasks]))
    return summary


# ==== Model (paper Sec. 3, Fig. 2): timestep encoder -> causal Transformer -> actor and critics =======================
NO_ACTION = -1  # the "previous action" at a meta-rollout start: its one-hot is all zeros (paper Sec. 3: the timestep input)


def action_features(actions: torch.Tensor, action_dim: int) -> torch.Tensor:
    """How an action enters the critic and the timestep token: one-hot for discrete actions. (...) -> (..., A)."""
    return F.one_hot(actions.long() + 1, action_dim + 1)[..., 1:].float()  # NO_ACTION (-1) -> zeros


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the job's number of ranks, as torchrun sets them; (0, 1) under plain python."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def mean_over_ranks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean over dim 0 of every rank's rows x: (M_rank, D) -> (D,), and the number of rows in all. Statistics updated
    outside the optimiser (PopArt, input normalisation) use it, so that under torchrun they stay identical on every rank."""
    if not dist.is_initialized():
        return x.mean(0), len(x)
    total = torch.cat([x.sum(0), x.new_tensor([len(x)])])  # (D + 1,): sums and row count, reduced in one call
    dist.all_reduce(total)
    n = int(total[-1].item())
    return total[:-1] / max(n, 1), n


class TimestepEncoder(nn.Module):
    """Paper App. B (BabyAI): grid CNN + mission RNN + MLP on [direction, progress, attempt, prev action, prev
    reward, reset]; concatenate, Linear, LayerNorm."""

    def __init__(self, obs_space: gym.spaces.Dict, action_dim: int, args: Args):
        super().__init__()
        self.action_dim, d_out = action_dim, args.d_token
        # Each grid cell holds (object, colour, state) ids: one embedding table, the three id ranges side by side.
        sizes = torch.tensor([len(OBJECT_TO_IDX), len(COLOR_TO_IDX), len(STATE_TO_IDX)])
        self.register_buffer("cell_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("cell_max", sizes - 1, persistent=False)
        self.cell_embed = nn.Embedding(int(sizes.sum()), 8)
        h, w, _ = obs_space["image"].shape
        self.cnn = nn.Sequential(
            nn.Conv2d(3 * 8, 32, 3, padding=1),
            nn.LeakyReLU(0.01),
            nn.Conv2d(32, 64, 3),
            nn.LeakyReLU(0.01),
            nn.Conv2d(64, 64, 3),
            nn.LeakyReLU(0.01),
            nn.Flatten(),
            nn.Linear(64 * (h - 4) * (w - 4), 128),
            nn.LeakyReLU(0.01),
        )
        self.word_embed = nn.Embedding(VOCAB_SIZE, 32, padding_idx=BLANK)
        self.rnn = nn.RNN(32, 128, batch_first=True)  # a single-layer vanilla (tanh) RNN, as the official library
        self.extras = nn.Sequential(
            nn.Linear(4 + 2 + action_dim + 2, 64), nn.LeakyReLU(0.01), nn.Linear(64, 64), nn.LeakyReLU(0.01)
        )
        self.out = nn.Linear(128 + 128 + 64, d_out)
        self.norm = nn.LayerNorm(d_out)

    def mission_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, M) word ids -> (N, 128): the RNN state after each mission's last real word."""
        # A window mostly repeats one mission: run the RNN once per distinct token sequence, then scatter back.
        tokens, inverse = torch.unique(tokens, dim=0, return_inverse=True)  # (U, M)
        out, _ = self.rnn(self.word_embed(tokens))  # (U, M, 128)
        last = (tokens != BLANK).sum(-1).clamp(min=1) - 1  # padding is only ever trailing: the last real word
        return out[torch.arange(len(tokens), device=out.device), last][inverse]

    def forward(self, obs: dict, prev_action: torch.Tensor, prev_reward: torch.Tensor, reset: torch.Tensor, mask=None):
        # mask (real vs padded timesteps) is unused: no input statistics to update, every part is per-timestep
        B, L = prev_action.shape
        cells = torch.minimum(obs["image"].long().flatten(0, 1), self.cell_max) + self.cell_offset  # (N, 7, 7, 3)
        cells = self.cell_embed(cells).flatten(-2).permute(0, 3, 1, 2)  # (N, 24, 7, 7)
        image = self.cnn(cells)
        mission = self.mission_features(obs["mission"].long().flatten(0, 1))
        extras = torch.cat(
            [
                F.one_hot(obs["direction"].long().reshape(B * L), 4).float(),
                obs["progress"].reshape(B * L, 1).float(),
                obs["attempt"].reshape(B * L, 1).float(),
                action_features(prev_action.reshape(B * L), self.action_dim),  # NO_ACTION (-1) -> zeros
                prev_reward.reshape(B * L, 1).float(),
                reset.reshape(B * L, 1).float(),
            ],
            -1,
        )
        x = torch.cat([image, mission, self.extras(extras)], -1)
        return self.norm(self.out(x)).reshape(B, L, -1)


# ---- the causal Transformer (shared core: the same text in every amago2_*.py, tests/test_shared_core.py) ----
class SigmaReparamLinear(nn.Module):
    """sigma-reparam: effective weight (g / sigma(W)) W, sigma(W) from one power-iteration step per training forward."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        layer = nn.Linear(d_in, d_out, bias=bias)
        self.weight, self.bias = layer.weight, layer.bias
        self.gain = nn.Parameter(torch.ones(()))
        self.register_buffer("u", F.normalize(torch.randn(d_out), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(d_in), dim=0))
        # converged before the first forward: rollouts run in eval mode, and random u, v give a random u^T W v of either
        # sign (50 steps: within ~1% of the spectral norm at the paper's sizes)
        self.power_iteration(50)

    @torch.no_grad()  # u, v are estimates, not parameters: no gradient through them
    def power_iteration(self, steps: int):
        for _ in range(steps):
            self.v.copy_(F.normalize(self.weight.T @ self.u, dim=0))
            self.u.copy_(F.normalize(self.weight @ self.v, dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.power_iteration(1)
        sigma = self.u @ self.weight @ self.v
        # ((g / sigma) W) x == (g / sigma) (W x): scaling the output avoids materialising a new weight
        out = F.linear(x, self.weight) * (self.gain / sigma)
        return out if self.bias is None else out + self.bias


class TransformerLayer(nn.Module):
    """Pre-norm causal layer with NormFormer's extra norms and head scales, sigma-reparam linears, LeakyReLU.
    As in the official library: qkv without bias, dropout only on the feed-forward output."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm_attn_in, self.norm_attn_out = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.attn_out = SigmaReparamLinear(d_model, 3 * d_model, bias=False), SigmaReparamLinear(d_model, d_model)
        self.head_scale = nn.Parameter(torch.ones(n_heads))  # NormFormer: learnable per-head scale
        self.norm_ff_in, self.norm_ff_mid = nn.LayerNorm(d_model), nn.LayerNorm(d_ff)
        self.ff1, self.ff2 = SigmaReparamLinear(d_model, d_ff), SigmaReparamLinear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm_attn_in(x)).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is None:  # training, or any full pass: (B, H, L, dh), causal
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # rollout: one new token per env attends to that env's cached keys and values
            k, v, valid = cache.write(self, k, v)
            a = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=valid)
        a = (a * self.head_scale.view(1, -1, 1, 1)).transpose(1, 2).reshape(B, L, D)
        x = x + self.norm_attn_out(self.attn_out(a))  # NormFormer: LayerNorm after attention
        f = self.ff2(self.norm_ff_mid(F.leaky_relu(self.ff1(self.norm_ff_in(x)))))  # NormFormer: LayerNorm inside FF
        return x + self.dropout(f)


class KVCache:
    """Per-env key/value cache for rollouts: each env has its own length, emptied when its env starts a new meta-rollout.
    Past `context_len` tokens it becomes a sliding window (a ring: attention ignores order, and positions were added to
    the tokens before the keys were computed, so they stay absolute)."""

    def __init__(self, model: "Transformer", num_envs: int, context_len: int, device):
        d_head = model.d_model // model.n_heads
        shape = (num_envs, model.n_heads, context_len, d_head)
        self.k = {layer: torch.zeros(shape, device=device) for layer in model.layers}
        self.v = {layer: torch.zeros(shape, device=device) for layer in model.layers}
        self.length = torch.zeros(num_envs, dtype=torch.long, device=device)  # tokens seen this meta-rollout
        self.context_len = context_len

    def write(self, layer, k: torch.Tensor, v: torch.Tensor):
        envs = torch.arange(len(self.length), device=k.device)
        slot = self.length % self.context_len
        self.k[layer][envs, :, slot] = k[:, :, 0].float()
        self.v[layer][envs, :, slot] = v[:, :, 0].float()
        valid = torch.arange(self.context_len, device=k.device)[None, :] <= self.length[:, None]  # (E, l): slots written
        return self.k[layer], self.v[layer], valid[:, None, None, :]


class Transformer(nn.Module):
    """Input Linear + sinusoidal absolute positions + embedding dropout, layers, final LayerNorm."""

    def __init__(self, d_token: int, d_model: int, n_layers: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.inp = nn.Linear(d_token, d_model)
        self.emb_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(TransformerLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        # tokens: (B, L, d_token), t: (B, L) absolute time index -> (B, L, d_model); with a cache, L == 1
        freqs = torch.exp(-np.log(10000.0) * torch.arange(0, self.d_model, 2, device=t.device) / self.d_model)
        angles = t[..., None].float() * freqs  # fixed sin/cos embedding of t, counted from the meta-rollout start
        x = self.emb_dropout(self.inp(tokens) + torch.cat([angles.sin(), angles.cos()], -1))
        for layer in self.layers:
            x = layer(x, cache)
        if cache is not None:
            cache.length += 1  # every env's new token is in the cache now
        return self.norm(x)


# ---- the actor (discrete actions, per benchmark): one categorical distribution per gamma ----


class Actor(nn.Module):
    """MLP (256, 256) -> one categorical distribution per gamma, probabilities clamped to [1e-3, 0.99] (exploration floor)."""

    def __init__(self, d_model: int, action_dim: int, num_gammas: int, hidden: int):
        super().__init__()
        self.action_dim, self.num_gammas = action_dim, num_gammas
        layers = [nn.Linear(d_model, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, num_gammas * action_dim))

    def forward(self, h: torch.Tensor) -> torch.distributions.Categorical:
        logits = self.mlp(h).float().unflatten(-1, (self.num_gammas, self.action_dim))  # (..., G, A)
        probs = logits.softmax(-1).clamp(1e-3, 0.99)
        return torch.distributions.Categorical(probs=probs / probs.sum(-1, keepdim=True))


def policy_stats(pi: torch.distributions.Categorical, g: int) -> dict:
    """The acting head's own diagnostic, (N,): the probability of its likeliest action, 1/A when uniform, ~0.99 at most
    (the clamp); with the entropy it tells a policy that is narrowing from one that still spreads its choices."""
    return {"losses/policy_max_prob_acting": pi.probs[:, g].max(-1).values}


def every_action(agent, n: int, device) -> torch.Tensor:
    """All A discrete actions for each of n states, shaped for q_values: (n, A, 1)."""
    return torch.arange(agent.action_dim, device=device).view(1, -1, 1).expand(n, -1, 1)


# ---- critics, PopArt and the agent (shared core) ----
class CriticEnsemble(nn.Module):
    """C critic MLPs (256, 256) on [h, gamma feature, action], evaluated as one batched computation. The first layer is
    split by input part (the maths of concatenating the inputs): the state part h @ W_h is computed once and shared by
    every gamma and action evaluated at that state, which is where most of an update's time would otherwise go."""

    def __init__(self, d_model: int, action_dim: int, gammas: torch.Tensor, hidden: int, out: int, num_critics: int):
        super().__init__()

        def param(*shape, fan_in):
            return nn.Parameter(torch.empty(num_critics, *shape).uniform_(-(fan_in**-0.5), fan_in**-0.5))

        fan1 = d_model + 1 + action_dim
        self.w_state, self.w_gamma = param(d_model, hidden, fan_in=fan1), param(1, hidden, fan_in=fan1)
        self.w_action, self.b1 = param(action_dim, hidden, fan_in=fan1), param(1, hidden, fan_in=fan1)
        self.w2, self.b2 = param(hidden, hidden, fan_in=hidden), param(1, hidden, fan_in=hidden)
        self.w3, self.b3 = param(hidden, out, fan_in=hidden), param(1, out, fan_in=hidden)
        self.register_buffer("gamma_feature", symlog(1.0 / (1.0 - gammas))[:, None])  # (G, 1): symlog(1 / (1 - gamma))

    def forward(self, h: torch.Tensor, action_feats: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
        # h: (N, d); action_feats: (N, K, G or 1, A), K actions per state -> (N, K, G, C, out)
        N, K, Ga, _ = action_feats.shape
        G, C = len(self.gamma_feature), self.w_state.shape[0]
        chunk = max(1, chunk_rows // (K * G))  # states per chunk
        if not torch.is_grad_enabled() and N > chunk:
            # no autograd graph to keep: evaluate cache-sized chunks (docs/speed.md)
            return torch.cat([self(h[i : i + chunk], action_feats[i : i + chunk]) for i in range(0, N, chunk)])
        state = torch.einsum("nd,cdh->cnh", h, self.w_state)  # (C, N, H): once per state
        # a plain matmul keeps (C, N, K, Ga, H) contiguous (einsum's permuted output would cost a full copy below)
        action = torch.matmul(action_feats.reshape(1, -1, action_feats.shape[-1]), self.w_action).view(C, N, K, Ga, -1)
        gamma = torch.einsum("gi,cih->cgh", self.gamma_feature, self.w_gamma) + self.b1  # (C, G, H), with the bias
        gamma = gamma.to(action.dtype)  # the fp32 bias would promote the bf16 pre-activation below back to fp32
        # the (C, N, K, G, H) pre-activation is the update's largest tensor: one broadcast add, then in place
        x = action + gamma[:, None, None]
        x += state[:, :, None, None]
        x = F.leaky_relu(x, inplace=True).reshape(C, N * K * G, -1)  # (C, N*K*G, H)
        x = F.leaky_relu(torch.baddbmm(self.b2, x, self.w2), inplace=True)
        x = torch.baddbmm(self.b3, x, self.w3)  # (C, N*K*G, out)
        return x.view(C, N, K, G, -1).permute(1, 2, 3, 0, 4)


class PopArt(nn.Module):
    """One global (task-agnostic) PopArt layer per gamma (paper App. B): the output layer of the scalar critics of
    --critic-loss dep, and the scale by which the dependent actor loss (Eq. 2) normalises Q for either critic. Statistics
    mu (init 0) and nu (init 100) track the TD targets; after each update the fixed w, b are rescaled so the
    denormalised output sigma * (w x + b) + mu is unchanged."""

    def __init__(self, num_gammas: int, beta: float):
        super().__init__()
        self.beta = beta
        for name, init in [("mu", 0.0), ("nu", 100.0), ("w", 1.0), ("b", 0.0)]:
            self.register_buffer(name, torch.full((num_gammas,), init))
        # the official library's step counter starts at 1, so the first update has t = 2 and beta_t ~ 1/2:
        # the prior (mu 0, nu 100) is averaged with the first batch, not discarded
        self.register_buffer("updates", torch.ones(()))

    @property
    def sigma(self) -> torch.Tensor:
        return (self.nu - self.mu**2).clamp(min=1e-4).sqrt()

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x + self.b  # x: (..., G)

    def denormalized(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.normalized(x) + self.mu

    def standardized(self, q: torch.Tensor) -> torch.Tensor:
        """(Q - mu) / sigma for denormalised values q: (..., G). For the dep critic this equals its normalised output."""
        return (q - self.mu) / self.sigma

    @torch.no_grad()
    def update(self, y: torch.Tensor):
        """y: (M, G) valid TD targets. Bias-corrected rate beta_t = beta / (1 - (1 - beta)^t)."""
        self.updates += 1
        beta_t = self.beta / (1 - (1 - self.beta) ** self.updates)
        old_mu, old_sigma = self.mu.clone(), self.sigma
        mean, sq_mean = mean_over_ranks(torch.cat([y, y.pow(2)], -1))[0].chunk(2)  # over every rank's targets
        self.mu.lerp_(mean, beta_t)
        self.nu.lerp_(sq_mean, beta_t)
        self.w.mul_(old_sigma / self.sigma)
        self.b.copy_((old_sigma * self.b + old_mu - self.mu) / self.sigma)


class Agent(nn.Module):
    """Timestep encoder -> Transformer -> h_t; actor and critic heads on h_t; EMA copies of the heads only."""

    def __init__(self, obs_space: gym.spaces.Dict, action_dim: int, args: Args):
        super().__init__()
        self.action_dim, self.obs_keys = action_dim, list(obs_space.keys())
        self.register_buffer("gammas", torch.tensor(args.gammas))
        self.rollout_gamma = args.gammas.index(args.rollout_gamma)
        self.register_buffer("bins", bin_supports(args.num_bins))
        self.encoder = TimestepEncoder(obs_space, action_dim, args)
        self.transformer = Transformer(args.d_token, args.d_model, args.n_layers, args.n_heads, args.d_ff, args.dropout)
        self.actor = Actor(args.d_model, action_dim, len(args.gammas), args.head_hidden)
        out = args.num_bins if args.critic_loss == "ind" else 1
        self.critics = CriticEnsemble(args.d_model, action_dim, self.gammas, args.head_hidden, out, args.num_critics)
        self.popart = PopArt(len(args.gammas), args.popart_beta)
        # CRUCIAL: no target encoder or Transformer; only the heads have EMA copies
        self.target_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)

    def states(self, batch: dict, mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """h for every timestep of a batch of windows: (B, L) -> (B, L, d_model); with a cache, one new timestep per env."""
        obs = {k: batch[k] for k in self.obs_keys}
        tokens = self.encoder(obs, batch["prev_action"], batch["prev_reward"], batch["reset"], mask)
        return self.transformer(tokens, batch["time"], cache)

    def scalar_q(self, out: torch.Tensor, standardized: bool = False) -> torch.Tensor:
        """Critic outputs (..., G, C, out) -> scalar Q (..., G, C), in fp32 (also under bf16 autocast): the two-hot
        expectation or PopArt's denormalised output; standardized: (Q - mu) / sigma by the global PopArt statistics."""
        out = out.float()
        if out.shape[-1] > 1:
            q = bins_to_scalar(out.softmax(-1), self.bins).transpose(-1, -2)  # (..., C, G): PopArt is per gamma
            q = self.popart.standardized(q) if standardized else q
        else:
            x = out[..., 0].transpose(-1, -2)
            q = self.popart.normalized(x) if standardized else self.popart.denormalized(x)
        return q.transpose(-1, -2)

    def q_values(self, critics: CriticEnsemble, h: torch.Tensor, actions: torch.Tensor, standardized: bool = False):
        """h: (N, d), actions: (N, K, G or 1) -> scalar Q (N, K, G, C)."""
        return self.scalar_q(critics(h, action_features(actions, self.action_dim)), standardized)

    def forward(self, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
        """The training loss, compute_losses below: a forward pass, so that DistributedDataParallel can wrap it."""
        return compute_losses(self, batch, args)

    @torch.no_grad()
    def ema_update(self, tau: float):
        for online, target in [(self.actor, self.target_actor), (self.critics, self.target_critics)]:
            for p, tp in zip(online.parameters(), target.parameters()):
                tp.lerp_(p, tau)


# ==== Losses (paper Sec. 3, App. B): TD target, critic Eqs. 1 / 3, actor Eqs. 2 / 4 ===================================
# compute_losses is the update: TD targets from the target heads (td_target), the critic loss (Eq. 3 two-hot or Eq. 1
# PopArt MSE), the actor loss (Eq. 4 CRR filter or Eq. 2 -Q), then diagnostics. Its helpers follow in that order.
def compute_losses(agent: Agent, batch: dict, args: Args) -> tuple[torch.Tensor, dict]:
    """Both losses on a batch of windows of l+1 timesteps: transition t uses h_t, h_{t+1} and the data of row t+1.
    A window's row t+1 holds the timestep o_{t+1}, a_t (prev_action), r_t as the policy saw it (prev_reward) and the
    reset bit d (1 where an inner episode starts), plus the transition t -> t+1's learning reward and terminal flag
    (reward, terminal); row 0 only gives h_0. Returns actor + critic_weight * critic, and the logged metrics."""
    valid = batch["mask"][:, 1:].reshape(-1)  # (N = B * l,): transition t is real iff timestep t+1 is real
    h = agent.states(batch, batch["mask"])  # (B, l+1, d)
    h_t, h_next = h[:, :-1].flatten(0, 1), h[:, 1:].detach().flatten(0, 1)  # (N, d)
    action = replayed_actions(batch, valid)  # (N, 1, 1, ...): a_t, one per state, the same for every gamma
    # CRUCIAL: done is 1 only where the whole meta-rollout terminated, never at inner episode ends
    reward, done = (batch[k][:, 1:].reshape(-1).float() for k in ("reward", "terminal"))
    y = td_target(agent, h_next, reward, done, args)  # (N, G)
    out = agent.critics(h_t, action_features(action, agent.action_dim))[:, 0]  # (N, G, C, out)
    # global PopArt statistics follow the TD targets on every update, whatever the critic: the dep critic is
    # their output layer (Eq. 1) and the dep actor standardises Q by them (Eq. 2, paper App. B)
    agent.popart.update(y[valid])
    critic = critic_loss_ind(agent, out, y) if args.critic_loss == "ind" else critic_loss_dep(agent, out, y)

    q_buffer = agent.scalar_q(out.detach())  # (N, G, C): the critics' value of the buffer actions
    pi = agent.actor(h_t)  # G distributions over (N,)
    if args.actor_loss == "ind":
        keep = crr_filter(agent, h_t, pi, q_buffer, args)  # (N, G)
        actor = -keep * pi.log_prob(action[:, 0])  # the buffer action broadcast over the G heads: (N, G)
    else:
        actor, keep = dpg_actor_loss(agent, h_t, pi), None

    actor_loss, critic_loss = masked_mean(actor, valid), masked_mean(critic, valid)
    metrics = {"losses/actor": actor_loss, "losses/critic": critic_loss}
    metrics |= diagnostics(agent, batch, pi, q_buffer, keep, y, valid, args)
    return actor_loss + args.critic_weight * critic_loss, metrics


def replayed_actions(batch: dict, valid: torch.Tensor) -> torch.Tensor:
    """a_t, the previous action of row t+1: (B, l+1) -> (N, 1, 1). Padding past a rollout's end may hold the next
    rollout's NO_ACTION (-1): action 0 keeps the maths finite there (masked out of every loss)."""
    action = batch["prev_action"][:, 1:].reshape(-1)
    return torch.where(valid, action, torch.zeros_like(action)).view(-1, 1, 1)


def td_target(agent: Agent, h_next: torch.Tensor, reward: torch.Tensor, done: torch.Tensor, args: Args) -> torch.Tensor:
    """y = reward_multiplier * r + gamma * (1 - done) * Qbar(h', a'), in fp32. Qbar combines 2 of the target critics
    drawn at random (with replacement) per sample and per gamma: their mean (official library, two-hot agent), or their min,
    clipped double-Q, with the dep actor (official library, DPG agent). h_next: (N, d), reward / done: (N,) -> (N, G)."""
    with torch.no_grad():
        q = next_state_values(agent, h_next, args.actor_loss)  # (N, G, C)
        q_two = q.gather(-1, torch.randint(q.shape[-1], (*q.shape[:-1], 2), device=q.device))  # (N, G, 2)
        q_bar = q_two.min(-1).values if args.actor_loss == "dep" else q_two.mean(-1)
        return args.reward_multiplier * reward[:, None] + agent.gammas * (1 - done[:, None]) * q_bar


def next_state_values(agent, h_next: torch.Tensor, actor_loss: str) -> torch.Tensor:
    """Each target critic's value of the target policy at t+1, (N, d) -> (N, G, C), denormalised, no grad. As in the
    official library: for the dep actor (its DPG agent) the exact expectation over the target policy,
    sum_a pi'(a|h') Q_c(h', a); for the ind actor (its multi-task agent) the value of one sampled a' ~ pi'."""
    pi = agent.target_actor(h_next)  # G distributions over (N,): each gamma's own policy
    if actor_loss == "dep":
        q = agent.q_values(agent.target_critics, h_next, every_action(agent, len(h_next), h_next.device))  # (N, A, G, C)
        return (pi.probs.transpose(1, 2)[..., None] * q).sum(1)  # probs (N, G, A) -> (N, A, G, 1)
    return agent.q_values(agent.target_critics, h_next, pi.sample()[:, None])[:, 0]


def critic_loss_ind(agent: Agent, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 3: cross-entropy to twohot(symlog(y)), the same label for every critic. out: (N, G, C, B) -> (N, G, C)."""
    label = twohot(symlog(y), agent.bins)[:, :, None]  # (N, G, 1, B)
    return -(label * out.float().log_softmax(-1)).sum(-1)


def critic_loss_dep(agent: Agent, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 1 with PopArt (statistics already updated from this batch's targets): (w x + b - (y - mu) / sigma)^2."""
    target = agent.popart.standardized(y)  # (N, G)
    pred = agent.popart.normalized(out[..., 0].float().transpose(1, 2))  # (N, C, G)
    return (pred - target[:, None]).pow(2).transpose(1, 2)  # (N, G, C)


def crr_filter(agent: Agent, h: torch.Tensor, pi, q_buffer: torch.Tensor, args: Args) -> torch.Tensor:
    """Eq. 4's binary weight 1{A > threshold}, A = mean_c Q_c(h, a_buffer) - mean over policy samples of mean_c Q_c(h, a_k).
    Online critics, no grad. h: (N, d), q_buffer: (N, G, C) -> (N, G)."""
    with torch.no_grad():
        samples = pi.sample((args.crr_samples,)).transpose(0, 1)  # (N, K, G)
        baseline = agent.q_values(agent.critics, h.detach(), samples).mean(-1).mean(1)  # (N, G)
        return (q_buffer.mean(-1) - baseline > args.crr_threshold).float()


def dpg_actor_loss(agent, h: torch.Tensor, pi) -> torch.Tensor:
    """Eq. 2, discrete: -min_c sum_a pi(a|h) Q_c(h, a), each critic's exact expectation over actions, then the
    pessimistic min over the ensemble (official library: the min is taken after the expectation), with Q standardised
    by the global PopArt statistics (paper App. B) so that its scale does not depend on the rewards'. Returns (N, G).
    CRUCIAL: Q is computed without grad on a detached state, so this loss trains only the actor (and, through the
    actor head, the Transformer) and never the critics."""
    with torch.no_grad():
        q = agent.q_values(agent.critics, h.detach(), every_action(agent, len(h), h.device), standardized=True)  # (N, A, G, C)
    expected = (pi.probs.transpose(1, 2)[..., None] * q).sum(1)  # probs (N, G, A) -> (N, A, G, 1); sum: (N, G, C)
    return -expected.min(-1).values


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid transitions, x: (N, ...) -> scalar (filtered CRR steps stay in the denominator)."""
    return (x.reshape(len(valid), -1).mean(-1) * valid).sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def diagnostics(agent: Agent, batch: dict, pi, q_buffer: torch.Tensor, keep, y: torch.Tensor, valid: torch.Tensor, args: Args):
    """What to read when a run does not learn. The acting gamma's head (the one rollouts use) is also logged on its own:
    low gammas see little reward and sharpen first. keep: the CRR filter (N, G), None for the dep actor; q_buffer: (N, G, C).
    policy_entropy is a one-sample estimate, -log pi(a) of a ~ pi; policy_stats adds the distribution's own numbers."""
    g = agent.rollout_gamma
    metrics = {"losses/td_target_mean": masked_mean(y, valid), "losses/q_mean": masked_mean(q_buffer, valid)}
    if keep is not None:
        metrics["losses/crr_kept_fraction"] = masked_mean(keep, valid)
        metrics["losses/crr_kept_fraction_acting"] = masked_mean(keep[:, g], valid)
    minus_log_pi = -pi.log_prob(pi.sample())  # (N, G)
    metrics["losses/policy_entropy"] = masked_mean(minus_log_pi, valid)
    metrics["losses/policy_entropy_acting"] = masked_mean(minus_log_pi[:, g], valid)
    metrics |= {k: masked_mean(v, valid) for k, v in policy_stats(pi, g).items()}
    # the acting gamma's Q against the discounted return that followed, in windows that reach their rollout's end: a
    # scalar critic approaches it as values propagate; two-hot Q (symexp of a symlog-space mean) lags below a positive one
    B, l = batch["reward"][:, 1:].shape
    real = valid.view(B, l)
    ends = real & (batch["terminal"][:, 1:].bool() & real).any(1, keepdim=True)  # (B, l)
    if ends.any():
        reward = args.reward_multiplier * batch["reward"][:, 1:].float()
        mc = monte_carlo_returns(reward, real, agent.gammas[g].item())  # (B, l)
        metrics["losses/mc_return"] = mc[ends].mean()
        metrics["losses/q_minus_mc"] = (q_buffer[:, g].mean(-1).view(B, l) - mc)[ends].mean()
    return metrics


def monte_carlo_returns(reward: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_{k >= t} gamma^(k - t) r_k over the valid transitions of each window, (B, l) -> (B, l). The observed discounted
    return only in windows that hold their rollout's terminal (windows never cross rollouts)."""
    steps = torch.arange(reward.shape[1], device=reward.device)
    ahead = (steps[None, :] - steps[:, None]).float()  # (l, l): k - t
    discount = torch.where(ahead >= 0, gamma ** ahead.clamp(min=0), 0.0)  # (t, k)
    return (reward * valid) @ discount.T


def grad_norms(agent: Agent, actor_loss: torch.Tensor, weighted_critic_loss: torch.Tensor) -> dict:
    """The gradient norms of the actor's loss and of critic_weight * the critic's loss apart, before the joint clip (one
    backward pass each, on a graph the update's own backward still uses): which of the two the clip scales down."""
    params = [p for p in agent.parameters() if p.requires_grad]
    norms = {}
    for name, loss in (("actor", actor_loss), ("critic", weighted_critic_loss)):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        norms[f"losses/grad_norm_{name}"] = torch.stack([g.norm() for g in grads if g is not None]).norm()
    return norms


# ==== Rollouts and evaluation =========================================================================================
class MetaRollouts:
    """A vector env plus what each token needs beyond the observation: the previous action and reward, the reset bit d
    (1 at the first step of every inner episode), the absolute time index and the rollout id. With a buffer, every
    timestep (the final one of each rollout included) is written to it."""

    def __init__(self, envs: gym.vector.VectorEnv, agent: Agent, args: Args, device, buffer: ReplayBuffer | None = None):
        self.envs, self.buffer, self.device = envs, buffer, device
        E, space = envs.num_envs, envs.single_action_space
        self.cache = KVCache(agent.transformer, E, args.context_len, device)
        self.now = {k: np.zeros((E, *s.shape), s.dtype) for k, s in envs.single_observation_space.items()}
        self.now["prev_action"] = np.zeros((E, *space.shape), space.dtype)
        self.now |= {k: np.zeros(E, np.float32) for k in ("prev_reward", "reset")}
        self.now |= {k: np.zeros(E, np.int64) for k in ("time", "rollout_id")}  # absolute time index, rollout id

    def restart(self, seed: int):
        """Start a new meta-rollout in every env."""
        obs, _ = self.envs.reset(seed=[seed + i for i in range(self.envs.num_envs)])
        self._begin(np.arange(self.envs.num_envs), obs)

    def _begin(self, idx: np.ndarray, obs: dict):
        for k in obs:
            self.now[k][idx] = obs[k][idx]
        self.now["prev_action"][idx], self.now["prev_reward"][idx], self.now["time"][idx] = NO_ACTION, 0.0, 0
        self.now["reset"][idx] = 1.0  # the first step of a meta-rollout is the first step of an episode
        self.now["rollout_id"][idx] = self.buffer.new_rollout_ids(len(idx)) if self.buffer else 0
        self.cache.length[torch.as_tensor(idx, device=self.device)] = 0  # empty the cache of these envs
        self._record(idx, np.zeros(len(idx), np.float32), np.zeros(len(idx), bool))

    def _record(self, idx: np.ndarray, reward: np.ndarray, terminal: np.ndarray):
        if self.buffer is not None:
            self.buffer.add({k: v[idx] for k, v in self.now.items()} | {"reward": reward, "terminal": terminal}, idx)

    @torch.no_grad()
    def act(self, agent: Agent) -> np.ndarray:
        """Sample from the rollout gamma's actor head given each env's current token and its context."""
        x = {k: torch.as_tensor(v, device=self.device)[:, None] for k, v in self.now.items()}  # (E, 1): one new timestep
        h = agent.states(x, cache=self.cache)[:, 0]  # (E, d_model)
        return agent.actor(h).sample()[:, agent.rollout_gamma].cpu().numpy()

    def step(self, actions: np.ndarray) -> tuple[list, np.ndarray]:
        """Returns (env index, task, metrics) for each meta-rollout that ended, and the (E,) done mask."""
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        self.now.update(obs)
        self.now["prev_action"] = np.asarray(actions, self.now["prev_action"].dtype)
        self.now["prev_reward"] = info["prev_reward"].astype(np.float32)  # the reward the policy sees, an input
        self.now["reset"] = info["new_episode"].astype(np.float32)  # an inner episode restarted: d = 1, memory kept
        self.now["time"] = self.now["time"] + 1
        self._record(np.arange(self.envs.num_envs), reward.astype(np.float32), terminated)
        done = terminated | truncated
        idx = np.flatnonzero(done)
        # the vector env adds a mask per key ("_return": which envs set it) inside info["metrics"]: keep the values only
        metrics = {k: v for k, v in info.get("metrics", {}).items() if not k.startswith("_")}
        finished = [(i, str(info["task"][i]), {k: float(v[i]) for k, v in metrics.items()}) for i in idx]
        if done.any():
            new_obs, _ = self.envs.reset(options={"reset_mask": done})
            self._begin(idx, new_obs)
        return finished, done


def evaluate(agent: Agent, rollouts: MetaRollouts, episodes: int, seed: int) -> dict[str, dict[str, float]]:
    """Run every eval env for `episodes` meta-rollouts with no epsilon (actions still sampled): mean metrics per task."""
    agent.eval()
    results, counts = {}, np.zeros(rollouts.envs.num_envs, dtype=int)
    rollouts.restart(seed)
    while (counts < episodes).any():
        finished, done = rollouts.step(rollouts.act(agent))
        for i, task, metrics in finished:
            if counts[i] < episodes:
                results.setdefault(task, []).append(metrics)
        counts += done
    return {task: {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} for task, ms in sorted(results.items())}


def log_eval(writer, per_task: dict[str, dict[str, float]], step: int) -> dict[str, float]:
    """Log each task's metrics and the benchmark's summary under eval/; returns the summary."""
    summary = summarize_eval(per_task)
    for k, v in ({f"{task}/{k}": v for task, m in per_task.items() for k, v in m.items()} | summary).items():
        writer.add_scalar(f"eval/{k}", v, step)
    return summary


def evaluate_only(agent: Agent, eval_envs: gym.vector.VectorEnv, args: Args, device):
    """--resume RUN_DIR --eval-only: the saved agent plays --eval-episodes meta-rollouts per evaluation task. The summary
    is printed and logged to runs/<run_name>/eval_only at the checkpoint's step; the checkpoint is only read."""
    state = read_checkpoint(args.resume)
    agent.load_state_dict(state["agent"])
    step = state["counters"]["global_step"]
    per_task = evaluate(agent, MetaRollouts(eval_envs, agent, args, device), args.eval_episodes, seed=10**6 + step)
    eval_envs.close()  # writes the last video (--capture-video)
    with SummaryWriter(os.path.join("runs", args.run_name, "eval_only")) as writer:
        summary = log_eval(writer, per_task, step)
    tqdm.write(f"eval-only: {args.run_name} at step {step:,}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))


def replay_fields(obs_space: gym.spaces.Dict, action_space: gym.Space) -> dict:
    """Per timestep: the observation, the token's other inputs, and the learner's reward and terminal flag into it."""
    fields = {k: (s.shape, s.dtype) for k, s in obs_space.items()} | {"prev_action": (action_space.shape, action_space.dtype)}
    scalars = {"prev_reward": np.float32, "reset": np.float32, "reward": np.float32, "terminal": bool}
    return fields | {k: ((), dtype) for k, dtype in scalars.items()}


def make_vector_env(thunks: list, async_envs: bool) -> gym.vector.VectorEnv:
    """Autoreset is off: a finished env is reset explicitly so that the final timestep is kept for the buffer."""
    cls = gym.vector.AsyncVectorEnv if async_envs else gym.vector.SyncVectorEnv
    return cls(thunks, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def epsilon(args: Args, global_step: int) -> float:
    """Linear anneal from eps_start to eps_end over eps_anneal_steps steps per env (global_step counts every rank's)."""
    frac = min(1.0, global_step / (args.num_envs * rank_and_world()[1]) / args.eps_anneal_steps)
    return args.eps_start + frac * (args.eps_end - args.eps_start)


def explore(actions: np.ndarray, eps: np.ndarray, action_space: gym.spaces.Discrete, rng: np.random.Generator) -> np.ndarray:
    """Epsilon-greedy on top of policy sampling: each env replaces its action by a uniform one with probability eps."""
    random_actions = rng.integers(action_space.n, size=len(actions))
    return np.where(rng.random(len(actions)) < eps, random_actions, actions)


# ==== Run plumbing (progress bar, checkpoints, flag checks): a first read can skip this ===============================
class Progress:
    """A tqdm bar over environment steps with updates, SPS and the recent return. Its ETA is tqdm's at the average rate
    since the start (smoothing=0): wall time per step, so update phases and evaluations are counted in it."""

    def __init__(self, args: Args, global_step: int, updates: int):
        self.updates, self.collected, self.seconds = updates, 0, 0.0
        self.recent = collections.deque(maxlen=100)  # returns of the last finished meta-rollouts
        fmt = "{percentage:3.0f}%|{bar}| {n:,}/{total:,} steps [{elapsed}<{remaining}{postfix}]"
        style = dict(bar_format=fmt, mininterval=args.log_every, smoothing=0)  # smoothing 0: the ETA at the average rate
        self.bar = tqdm(total=args.total_timesteps, initial=global_step, disable=rank_and_world()[0] > 0, **style)

    def collect(self, steps: int, seconds: float):
        self.collected, self.seconds = self.collected + steps, self.seconds + seconds
        self.bar.update(steps)
        self.show()

    def update(self, seconds: float):
        self.updates, self.seconds = self.updates + 1, self.seconds + seconds
        self.show()
        self.bar.update(0)  # no steps, but redraw once --log-every seconds have passed

    def sps(self) -> float:
        """Environment steps per second of wall time spent collecting and updating (evaluations left out)."""
        return self.collected / max(self.seconds, 1e-9)

    def show(self):
        ret = f"{np.mean(self.recent):.3f}" if self.recent else "n/a"
        self.bar.set_postfix_str(f"{self.updates:,} updates, {self.sps():,.0f} SPS, return {ret}", refresh=False)


def cpu_notice(args: Args, device: torch.device) -> str | None:
    """A line where a CPU makes the run slow (the bar's ETA says how slow): bf16 without AVX-512, a paper-size model."""
    if device.type == "cpu" and args.precision == "bf16" and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return "note: --precision bf16 on a CPU without AVX-512 emulates bf16 matmuls, far slower than fp32; use fp32 here"
    if device.type == "cpu" and args.d_model >= Args.d_model:
        return "note: a paper-size model on CPU is a GPU job (see the bar's ETA); CPU demos: README.md#quick-start"


def crossed(before: int, after: int, every: int) -> bool:
    """Did this epoch take the step count past a multiple of `every` (0: never)? Evaluations and checkpoints."""
    return every > 0 and after // every > before // every


def init_distributed(args: Args) -> torch.device:
    """This rank's device; under torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but torch sees no GPU; use --device auto or cpu")
    device = torch.device("cpu")
    if args.device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if rank_and_world()[1] > 1:
        # rank 0 evaluates and checkpoints alone while the others wait in the next update's all-reduce: allow for it
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return device


def buffer_folder(args: Args) -> str:
    """This rank's --buffer-dir ("": in RAM); under torchrun each rank keeps its shard in a folder of its own."""
    rank, world = rank_and_world()
    return os.path.join(args.buffer_dir, f"rank{rank}") if args.buffer_dir and world > 1 else args.buffer_dir


class NullWriter:
    """The TensorBoard writer of ranks other than 0: every call does nothing (rank 0 alone writes the log)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def save_checkpoint(
    run_dir: str, agent, optimizer, scheduler, buffer: ReplayBuffer, global_step: int, updates: int, rng, args
):
    """A run killed at any moment resumes from its last good checkpoint: every rank writes its buffer shard and its
    random state (rank<r>/buffer-<step>/), then rank 0 state.pt by atomic rename (the commit point), then old ones go."""
    rank, world = rank_and_world()
    folder = os.path.join(run_dir, "checkpoint")
    shard, snapshot = os.path.join(folder, f"rank{rank}"), f"buffer-{global_step}"
    buffer.save(os.path.join(shard, snapshot))
    rng_state = {"python": random.getstate(), "numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}
    rng_state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save(rng_state, os.path.join(shard, snapshot, "rng.pt"))
    if dist.is_initialized():
        dist.barrier()  # every shard is in before state.pt names it
    if rank == 0:
        state = {"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        counters = {"global_step": global_step, "updates": updates}
        state |= {"counters": counters, "buffer": snapshot, "args": asdict(args), "world_size": world}
        state["script"] = os.path.basename(__file__)  # a checkpoint resumes only with the script that wrote it
        torch.save(state, os.path.join(folder, "state.pt.tmp"))
        os.replace(os.path.join(folder, "state.pt.tmp"), os.path.join(folder, "state.pt"))
    if dist.is_initialized():
        dist.barrier()  # state.pt names the new shards: only now may the older ones go
    ReplayBuffer.remove_snapshots(shard, keep=snapshot)


def read_checkpoint(run_dir: str) -> dict:
    """A run folder's state.pt, or one error line: no checkpoint, a damaged file, or another script's checkpoint."""
    path = os.path.join(run_dir, "checkpoint", "state.pt")
    if not os.path.exists(path):
        fail(f"--resume {run_dir}: no checkpoint at {path} (was the run started with --save-model?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or overwritten: torch's own error is a long traceback
        fail(f"--resume {run_dir}: {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0].split('. ')[0]})")
    mine = os.path.basename(__file__)  # checkpoints older than the "script" entry: known by their flags
    by = state.get("script") or (mine if set(state["args"]) <= set(Args.__dataclass_fields__) else "another script")
    if by != mine:
        fail(f"--resume {run_dir}: the checkpoint was written by {by}; use that script")
    return state


def load_checkpoint(run_dir: str, agent, optimizer, scheduler, buffer: ReplayBuffer, rng) -> tuple[int, int]:
    """Restores everything save_checkpoint wrote; returns (global_step, updates)."""
    folder = os.path.join(run_dir, "checkpoint")
    state = read_checkpoint(run_dir)
    for name, obj in [("agent", agent), ("optimizer", optimizer), ("scheduler", scheduler)]:
        obj.load_state_dict(state[name])
    shard = os.path.join(folder, f"rank{rank_and_world()[0]}", state["buffer"])
    buffer.load(shard)
    saved_rng = torch.load(os.path.join(shard, "rng.pt"), weights_only=False)
    random.setstate(saved_rng["python"])
    rng.bit_generator.state = saved_rng["numpy"]
    torch.set_rng_state(saved_rng["torch"])
    if saved_rng["cuda"] and torch.cuda.is_available():  # a GPU run's sampling continues where it stopped
        torch.cuda.set_rng_state_all(saved_rng["cuda"])
    return state["counters"]["global_step"], state["counters"]["updates"]


def fail(message: str):
    """Bad input: a clear message and exit code 2, no traceback (under torchrun every rank exits, rank 0 says why)."""
    if rank_and_world()[0] == 0:
        tqdm.write(f"error: {message}", file=sys.stderr)  # on a line of its own, above a progress bar if one is drawn
    sys.exit(2)


def check_ranges(args: Args):
    """The valid range of every numeric flag of the shared core (the benchmark's own: check_env_args)."""
    ranges = [  # (valid range, test, flags)
        ("an integer >= 1", lambda x: x >= 1, "total_timesteps num_envs steps_per_epoch buffer_size batch_size context_len"),
        ("an integer >= 1", lambda x: x >= 1, "d_token d_model d_ff n_layers n_heads num_critics head_hidden crr_samples"),
        ("an integer >= 1", lambda x: x >= 1, "warmup_updates eps_anneal_steps eval_episodes checkpoint_every"),
        ("an integer >= 0", lambda x: x >= 0, "updates_per_epoch eval_every"),
        ("an integer >= 2", lambda x: x >= 2, "num_bins"),
        ("> 0", lambda x: x > 0, "learning_rate grad_clip reward_multiplier log_every"),
        (">= 0", lambda x: x >= 0, "weight_decay critic_weight"),
        ("in [0, 1)", lambda x: 0 <= x < 1, "dropout"),
        ("in (0, 1]", lambda x: 0 < x <= 1, "tau popart_beta"),
        ("in [0, 1]", lambda x: 0 <= x <= 1, "eps_start eps_end"),
        ("a finite number", np.isfinite, "crr_threshold"),
        ("discounts in [0, 1)", lambda gammas: len(gammas) > 0 and all(0 <= g < 1 for g in gammas), "gammas"),
    ]
    for valid, ok, names in ranges:
        for name in names.split():
            if not ok(getattr(args, name)):  # NaN compares False: refused too
                fail(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: it must be {valid}")


def resolve_args(args: Args) -> Args:
    """Resume: take the saved run's flags (a larger --total-timesteps is kept); then check every flag."""
    if args.eval_only and (not args.resume or rank_and_world()[1] > 1):
        fail("--eval-only evaluates a saved run under plain python: give its folder, --resume runs/<run_name>")
    if args.resume:
        state = read_checkpoint(args.resume)
        saved, n, world = state["args"], state["world_size"], rank_and_world()[1]
        if n != world and not args.eval_only:
            how = "plain python" if n == 1 else f"torchrun with {n} ranks in all (e.g. --nproc-per-node {n})"
            fail(f"--resume {args.resume}: the run was saved by {n} rank(s) and this job has {world}; resume it with {how}")
        total = args.total_timesteps if args.total_timesteps != Args.total_timesteps else saved["total_timesteps"]
        if (step := state["counters"]["global_step"]) >= total and not args.eval_only:  # nothing to train, no final eval
            fail(f"--resume {args.resume}: the run is done ({step:,} steps); raise --total-timesteps to train on past it")
        given = {"resume": args.resume, "total_timesteps": total, "eval_only": args.eval_only}
        if args.eval_only:  # how to evaluate is this command's to say
            given |= {"eval_episodes": args.eval_episodes, "capture_video": args.capture_video, "device": args.device}
        args = Args(**{**saved, **given})
    check_ranges(args)
    if args.d_model % args.n_heads:
        fail(f"--d-model {args.d_model} must be divisible by --n-heads {args.n_heads}")
    if args.rollout_gamma not in args.gammas:
        fail(f"--rollout-gamma {args.rollout_gamma} must be one of --gammas {args.gammas}")
    window = args.context_len + 1
    if args.buffer_size // args.num_envs < window or args.buffer_size < args.batch_size * window:
        fail(
            f"--buffer-size {args.buffer_size} cannot serve batches of {args.batch_size} windows of {window} timesteps "
            f"with {args.num_envs} envs: it needs at least {max(args.batch_size, args.num_envs) * window} timesteps; "
            "raise --buffer-size or lower --batch-size / --context-len"
        )
    folder = buffer_folder(args)
    if folder and not args.resume and os.path.isdir(folder) and os.listdir(folder):
        fail(f"--buffer-dir {folder} already holds a replay buffer: resume its run with --resume, or choose an empty folder")
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    if args.compile and on_cpu and not shutil.which(os.environ.get("CXX", "g++")):
        fail("--compile on a CPU needs a C++ compiler for torch.compile (g++, or set CXX): install one or drop --compile")
    check_env_args(args)
    if args.capture_video:
        try:  # gymnasium's RecordVideo writes with moviepy: find out here, not in an env subprocess
            import moviepy  # noqa: F401
        except ImportError as e:
            fail(f"--capture-video needs moviepy, which does not import ({e}); see requirements.txt")
    if not args.run_name:
        args.run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track and not args.wandb_id:
        args.wandb_id = os.urandom(4).hex()
    return args


if __name__ == "__main__":
    args = resolve_args(tyro.cli(Args))
    # under torchrun every rank runs this script on its own envs and replay shard; rank 0 alone reports and evaluates
    rank, world = rank_and_world()
    device = init_distributed(args)
    say = tqdm.write if rank == 0 else lambda *_, **__: None  # a line of its own, above the progress bar
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # CPU: subnormal floats in the update's intermediates made a late Meta-World update 1.65x slower (docs/speed.md)
    torch.set_flush_denormal(True)
    rng = np.random.default_rng(args.seed + rank)
    run_dir = f"runs/{args.run_name}"

    thunks = [make_env(args, rank * args.num_envs + i, train=True) for i in range(args.num_envs)]
    envs = None if args.eval_only else make_vector_env(thunks, args.async_envs)  # eval-only plays the eval envs alone
    eval_envs = make_vector_env(make_eval_envs(args), args.async_envs) if rank == 0 else None
    spaces = eval_envs if args.eval_only else envs
    obs_space, action_space = spaces.single_observation_space, spaces.single_action_space
    action_dim = int(action_space.n) if isinstance(action_space, gym.spaces.Discrete) else int(action_space.shape[0])
    agent = Agent(obs_space, action_dim, args).to(device)
    if args.eval_only:
        evaluate_only(agent, eval_envs, args, device)
        sys.exit(0)
    params = [p for p in agent.parameters() if p.requires_grad]  # not the EMA heads
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / args.warmup_updates))
    if args.compile:  # the first updates pay the compile time (dynamic: batches are trimmed to varying lengths)
        torch._functorch.config.donated_buffer = False  # grad_norms runs the logged update's backward graph twice
        agent.critics.compile(dynamic=True)
        agent.target_critics.compile(dynamic=True)
    if world > 1:
        torch.manual_seed(args.seed + rank)  # each rank samples its own actions and dropout masks
    # DDP averages the gradients of every rank in backward (the loss is Agent.forward, so DDP can hook into it)
    learner = DistributedDataParallel(agent, broadcast_buffers=False) if world > 1 else agent
    try:
        fields = replay_fields(obs_space, action_space)
        buffer = ReplayBuffer(fields, args.buffer_size, args.num_envs, buffer_folder(args), sampling=args.replay_sampling)
    except MemoryError as e:
        fail(str(e))
    except OSError as e:  # the buffer creates its folder and files
        fail(f"--buffer-dir {args.buffer_dir} cannot be created or written ({e.strerror}): choose a folder you can write to")
    say(buffer.footprint())
    prefetch = Prefetcher(buffer)  # decodes the next batch in a thread while an update runs
    global_step, updates = 0, 0  # environment steps and gradient updates so far
    if args.resume:
        global_step, updates = load_checkpoint(run_dir, agent, optimizer, scheduler, buffer, rng)
        say(f"resumed {run_dir} at step {global_step:,} after {updates:,} updates")
    if args.track and rank == 0:  # before the writer: wandb mirrors what it writes (sync_tensorboard)
        import wandb

        names = dict(project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, id=args.wandb_id)
        wandb.init(**names, resume="allow", sync_tensorboard=True, config=vars(args), save_code=True)
    writer = SummaryWriter(run_dir, purge_step=global_step or None) if rank == 0 else NullWriter()
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    n = sum(p.numel() for p in params)
    say(f"{args.run_name}: {n:,} parameters on {device} x {world} rank(s), actor {args.actor_loss}, critic {args.critic_loss}")
    if notice := cpu_notice(args, device):
        say(notice)

    rollouts = MetaRollouts(envs, agent, args, device, buffer)
    eval_rollouts = MetaRollouts(eval_envs, agent, args, device) if rank == 0 else None
    # environments cannot be checkpointed: a resumed run starts new meta-rollouts, seeded by the step count
    rollouts.restart(args.seed + global_step + rank * args.num_envs)
    eps_mult = rng.random(args.num_envs)  # each env scales epsilon by a fresh U[0, 1) draw per meta-rollout
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    start_time = time.time()
    progress = Progress(args, global_step, updates)
    summary = {}  # the last evaluation's summary, for the final line

    while global_step < args.total_timesteps:
        epoch_start = global_step
        # ---- collect: steps_per_epoch steps in every env ----
        agent.eval()
        for _ in range(args.steps_per_epoch):
            step_start = time.time()
            actions = explore(rollouts.act(agent), epsilon(args, global_step) * eps_mult, action_space, rng)
            try:
                finished, done = rollouts.step(actions)
            except ReplayMemoryError as e:  # the filling buffer would outgrow free RAM or disk: stop before the OS kills us
                if args.save_model and world == 1:  # under torchrun the other ranks would wait in the checkpoint's barrier
                    save_checkpoint(run_dir, agent, optimizer, scheduler, buffer, global_step, updates, rng, args)
                fail(str(e))
            global_step += args.num_envs * world  # --total-timesteps counts the steps of every rank
            for i, task, metrics in finished:
                for k, v in metrics.items():
                    writer.add_scalar(f"tasks/{task}/{k}", v, global_step)
                writer.add_scalar("charts/return", metrics["return"], global_step)
                progress.recent.append(metrics["return"])
            if done.any():
                eps_mult[done] = rng.random(int(done.sum()))
            progress.collect(args.num_envs * world, time.time() - step_start)
            if global_step >= args.total_timesteps:
                break
        writer.add_scalar("charts/epsilon", epsilon(args, global_step), global_step)
        writer.add_scalar("charts/SPS", progress.sps(), global_step)
        writer.add_scalar("charts/replay_gib", buffer.bytes_used() / 2**30, global_step)

        # ---- update: updates_per_epoch gradient steps on windows of l+1 timesteps ----
        agent.train()
        update_start = step_start = time.time()
        for i, batch in enumerate(prefetch.batches(args.updates_per_epoch, args.batch_size, args.context_len + 1, rng)):
            batch = trim_padding(batch)  # (B, <= l+1)
            batch = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
            with autocast:
                loss, metrics = learner(batch, args)  # compute_losses
            if i == args.updates_per_epoch - 1:  # the update whose metrics are logged: the two losses' gradients apart
                metrics |= grad_norms(agent, metrics["losses/actor"], args.critic_weight * metrics["losses/critic"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.grad_clip)
            if not torch.isfinite(grad_norm):  # all-reduced by DDP: the same on every rank, so every rank stops here
                losses = ", ".join(f"{k} {v.item():.4g}" for k, v in metrics.items())
                fail(f"non-finite gradient norm at update {updates} ({losses}): resume with a lower --learning-rate or fp32")
            optimizer.step()
            scheduler.step()
            agent.ema_update(args.tau)
            updates += 1
            progress.update(time.time() - step_start)  # long update phases (CPU, paper sizes) keep reporting
            step_start = time.time()
        if args.updates_per_epoch:
            for k, v in metrics.items():
                writer.add_scalar(k, v.item(), global_step)
            writer.add_scalar("losses/grad_norm", grad_norm.item(), global_step)
            writer.add_scalar("charts/updates_per_second", args.updates_per_epoch / (time.time() - update_start), global_step)
            writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], global_step)

        # ---- evaluate and checkpoint at epoch boundaries ----
        final = global_step >= args.total_timesteps
        if rank == 0 and (crossed(epoch_start, global_step, args.eval_every) or final):
            per_task = evaluate(agent, eval_rollouts, args.eval_episodes, seed=10**6 + global_step)
            summary = log_eval(writer, per_task, global_step)
            say("eval: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
        if args.save_model and (crossed(epoch_start, global_step, args.checkpoint_every) or final):
            save_checkpoint(run_dir, agent, optimizer, scheduler, buffer, global_step, updates, rng, args)
            say(f"checkpoint: {run_dir}/checkpoint at step {global_step:,}")

    progress.bar.close()
    say(
        f"done: {global_step:,} steps, {updates:,} updates in {(time.time() - start_time) / 60:.1f} min"
        + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "")
        + f"; final eval: {', '.join(f'{k} {v:.3f}' for k, v in summary.items())}; TensorBoard: tensorboard --logdir runs"
    )
    for vector_env in filter(None, (envs, eval_envs)):  # eval_envs: rank 0 only
        vector_env.close()
    writer.close()
    if dist.is_initialized():
        dist.destroy_process_group()
