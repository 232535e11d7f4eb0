# AMAGO-2 on multi-game Procgen (easy / memory-hard, two attempts per level): results table in README.md#procgen
import contextlib
import io
from typing import Callable

import gymnasium as gym
import numpy as np

with contextlib.redirect_stderr(io.StringIO()):  # procgen imports the legacy gym package, which prints a notice
    from procgen import ProcgenGym3Env

# The standard Procgen score ranges (R_min, R_max) that normalise returns (Cobbe et al. 2020, "Leveraging Procedural
# Generation to Benchmark Reinforcement Learning", App. C). Memory mode has none of its own: like the AMAGO-2 paper
# (App. B) it is normalised with the hard-mode ranges.
EASY_SCORE_RANGES = {
    "bigfish": (1, 40), "bossfight": (0.5, 13), "caveflyer": (3.5, 12), "chaser": (0.5, 13),
    "climber": (2, 12.6), "coinrun": (5, 10), "dodgeball": (1.5, 19), "fruitbot": (-1.5, 32.4),
    "heist": (3.5, 10), "jumper": (3, 10), "leaper": (3, 10), "maze": (5, 10),
    "miner": (1.5, 13), "ninja": (3.5, 10), "plunder": (4.5, 30), "starpilot": (2.5, 64),
}
HARD_SCORE_RANGES = {
    "bigfish": (0, 40), "bossfight": (0.5, 13), "caveflyer": (2, 13.4), "chaser": (0.5, 14.2),
    "climber": (1, 12.6), "coinrun": (5, 10), "dodgeball": (1.5, 19), "fruitbot": (-0.5, 27.2),
    "heist": (2, 10), "jumper": (1, 10), "leaper": (1.5, 10), "maze": (4, 10),
    "miner": (1.5, 20), "ninja": (2, 10), "plunder": (3, 30), "starpilot": (1.5, 35),
}
PROCGEN_GAMES = list(HARD_SCORE_RANGES)  # all 16 games
# The six games that have a "memory" distribution (procgen aborts the whole process if another game asks for it).
MEMORY_GAMES = {"caveflyer", "dodgeball", "heist", "jumper", "maze", "miner"}
# mode -> (default games, meta-rollout cap H across both attempts, score ranges): paper Sec. 5 and App. B
MODES = {
    "easy": (["climber", "coinrun", "jumper", "ninja", "leaper"], 2500, EASY_SCORE_RANGES),
    "memory-hard": (PROCGEN_GAMES, 5000, HARD_SCORE_RANGES),
}
BOX_SIZE = 8  # side in pixels of the black box in the top-left corner of every attempt-2 frame
EVAL_START_LEVEL = 10**6  # unseen levels: evaluation draws from [10**6, 2**31 - 1), training from [0, num_train_levels)


def distribution_mode(mode: str, game: str) -> str:
    """easy: "easy" for every game; memory-hard: "memory" where the game has it, else "hard" (paper App. B)."""
    if mode == "easy":
        return "easy"
    return "memory" if game in MEMORY_GAMES else "hard"


class ProcgenMetaEnv(gym.Env):
    """One episode of this env is one meta-rollout: draw a game, then play one of its levels twice.

    One procgen env per game is built on first use and kept; procgen draws the level (uniform over the env's level
    range) whenever one of its episodes starts. The state at the start of attempt 1 is saved with get_state and
    restored with set_state when attempt 1 ends, so attempt 2 replays exactly that level (its RNG included). Building
    a fresh single-level env per meta-rollout would also work (about 1 ms), but gym3 keeps every env's cffi library
    handle until the process exits: about 11 KB lost per meta-rollout.
    """

    def __init__(self, mode: str = "easy", games: list[str] | None = None, train: bool = True,
                 num_train_levels: int = 2000, reward_scales: dict[str, float] | None = None,
                 task: str | None = None, horizon: int | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown Procgen mode {mode!r}; choose from: {', '.join(MODES)}")
        default_games, default_horizon, self.score_ranges = MODES[mode]
        self.mode, self.games, self.pinned = mode, list(games or default_games), task
        unknown = sorted(set(self.games + ([task] if task else [])) - set(PROCGEN_GAMES))
        if unknown:
            raise ValueError(f"unknown Procgen game(s) {unknown}; choose from: {', '.join(PROCGEN_GAMES)}")
        self.reward_scales = dict(reward_scales or {})
        if set(self.reward_scales) - set(self.games):
            raise ValueError(f"reward scales for games not played: {sorted(set(self.reward_scales) - set(self.games))}")
        if not 0 < num_train_levels <= EVAL_START_LEVEL:
            raise ValueError(f"num_train_levels must be in [1, {EVAL_START_LEVEL}]: more reach the evaluation levels")
        self.horizon = horizon or default_horizon
        # procgen's (start_level, num_levels): training levels, or unseen levels that training never draws
        self.level_range = (0, num_train_levels) if train else (EVAL_START_LEVEL, 2**31 - 1 - EVAL_START_LEVEL)
        self.procgen = {}  # game -> its kept ProcgenGym3Env
        self.unfinished = None  # the game whose env was left mid-level by the last meta-rollout
        self.observation_space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
        self.action_space = gym.spaces.Discrete(15)

    def _obs(self, frame: np.ndarray) -> dict:
        # frame is a copy already (gym3's observe copies its buffers): the box never reaches procgen's own frame
        if self.attempt == 2:
            frame[:BOX_SIZE, :BOX_SIZE] = 0  # lets even a memoryless critic tell the attempts apart (paper App. B)
        return {"image": frame}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # procgen draws levels from its own RNG: rebuild every env from the new seed
            self.close()
        elif self.unfinished is not None:  # the cap or an early reset left it mid-level: build it afresh
            self.procgen.pop(self.unfinished).close()
        self.game = self.pinned or self.games[self.np_random.integers(len(self.games))]
        if self.game not in self.procgen:
            start_level, num_levels = self.level_range
            self.procgen[self.game] = ProcgenGym3Env(
                num=1, env_name=self.game, distribution_mode=distribution_mode(self.mode, self.game),
                start_level=start_level, num_levels=num_levels, rand_seed=int(self.np_random.integers(2**31 - 1)),
                num_threads=0,  # step in this thread: faster than gym3's worker threads for a single env
            )
        self.env = self.procgen[self.game]
        # A kept env sits at the start of a fresh level: procgen auto-reset it when its last meta-rollout ended.
        self.level_start = self.env.get_state()
        self.level = int(self.env.get_info()[0]["level_seed"])
        self.unfinished, self.attempt, self.t, self.returns = self.game, 1, 0, [0.0, 0.0]
        return self._obs(self.env.observe()[1]["rgb"][0]), {}

    def step(self, action):
        self.env.act(np.array([action], dtype=np.int32))
        raw, ob, first = self.env.observe()
        raw = float(raw[0])  # the game's own reward (default scale)
        self.returns[self.attempt - 1] += raw
        self.t += 1
        new_episode = terminated = False
        # first: the level just ended and procgen auto-reset to a fresh level (a level's last frame is never shown)
        if first[0] and self.attempt == 1:
            # CRUCIAL: not a terminal. The same level restarts inside the same meta-rollout; memory is kept and
            # the critic bootstraps across the boundary.
            self.env.set_state(self.level_start)
            ob = self.env.observe()[1]
            self.attempt, new_episode = 2, True
        elif first[0]:
            # The meta-rollout ends. The frame returned is the next level's first one: a terminal never
            # bootstraps from it, and the env is left ready for this game's next meta-rollout.
            terminated, self.unfinished = True, None
        truncated = not terminated and self.t >= self.horizon
        reward = raw * self.reward_scales.get(self.game, 1.0)  # rescaled-reward experiment (paper Fig. 6)
        info = {"new_episode": new_episode, "policy_reward": reward}
        if terminated or truncated:
            info["task"], info["metrics"] = self.game, self.metrics()
        return self._obs(ob["rgb"][0]), reward, terminated, truncated, info

    def metrics(self) -> dict[str, float]:
        """Per-attempt returns on the default reward scale and normalised by the mode's score ranges. An attempt
        that the cap cut short counts what it earned; one it never reached counts as return 0."""
        lo, hi = self.score_ranges[self.game]
        norm = [(r - lo) / (hi - lo) for r in self.returns]
        return {"return_1": self.returns[0], "return_2": self.returns[1], "norm_1": norm[0], "norm_2": norm[1],
                "steps": float(self.t)}

    def close(self):
        # Close what you build: a gym3 env left to the garbage collector deadlocks the process if it is collected
        # while another procgen env is being built (gym3 looks up libenv_close lazily, under cffi's lock).
        for env in self.procgen.values():
            env.close()
        self.procgen, self.unfinished = {}, None


def parse_reward_scales(s: str) -> dict[str, float]:
    """"coinrun=100,climber=0.1" -> {"coinrun": 100.0, "climber": 0.1}; "" -> {} (every game on its own scale)."""
    scales = {}
    for item in filter(None, (part.strip() for part in s.split(","))):
        game, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            raise ValueError(f"reward scale {item!r} is not GAME=FACTOR (example: coinrun=100,climber=0.1)")
        if game not in PROCGEN_GAMES:
            raise ValueError(f"reward scale for unknown Procgen game {game!r}; games: {', '.join(PROCGEN_GAMES)}")
        if game in scales:
            raise ValueError(f"reward scale for {game!r} given twice")
        try:
            scales[game] = float(value)
        except ValueError:
            raise ValueError(f"reward scale {item!r}: {value!r} is not a number") from None
        if not (np.isfinite(scales[game]) and scales[game] > 0):
            raise ValueError(f"reward scale {item!r}: the factor must be a positive finite number")
    return scales


def make_env(args, env_idx: int, train: bool, task: str | None = None) -> Callable[[], gym.Env]:
    # Reads args.mode ("easy" | "memory-hard"), args.games (Procgen games; empty = the mode's own list),
    # args.reward_scales ("coinrun=100,climber=0.1", training only: evaluation always plays the default scale) and
    # args.num_train_levels. Seeds come from MetaRollouts.restart (reset(seed=...)), so args.seed and env_idx are
    # not needed here. train=False plays unseen levels; task pins one game.
    scales = parse_reward_scales(args.reward_scales) if train else {}  # bad flags fail here, not in a worker

    def thunk():
        return ProcgenMetaEnv(args.mode, args.games, train, args.num_train_levels, scales, task)

    return thunk


def summarize_eval(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    """Means over games (each game's metrics averaged over its rollouts first): normalised score by attempt and
    the attempt-2 return."""
    return {f"{k}_mean": float(np.mean([m[k] for m in per_task.values()])) for k in ("norm_1", "norm_2", "return_2")}


# ---- shared core goes here ----
