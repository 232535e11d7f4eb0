"""Procgen meta-rollout wrapper, reward-scale parser and eval summary of amago2_procgen.py."""

import os
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from procgen import ProcgenGym3Env  # noqa: E402

import amago2_procgen as ap  # noqa: E402

B = ap.BOX  # (rows 1-4, cols 1-4), the official library's box
NOOP = 4  # procgen's action 4 presses nothing: in maze the agent stands still and no level ever ends


@pytest.fixture
def make():
    """Builds ProcgenMetaEnvs and closes them after the test, pass or fail. A gym3 env left to the garbage collector
    (a failing test's traceback keeps envs in a reference cycle) deadlocks the process if it is collected while
    another procgen env is being built: a failure would hang the session instead of being reported."""
    envs = []

    def build(*args, **kwargs):
        envs.append(ap.ProcgenMetaEnv(*args, **kwargs))
        return envs[-1]

    yield build
    for env in envs:
        env.close()


def level_start_frame(game: str, level: int, distribution: str) -> np.ndarray:
    """The first frame of `level` from a brand-new single-level procgen env (the known answer)."""
    env = ProcgenGym3Env(num=1, env_name=game, start_level=level, num_levels=1, distribution_mode=distribution)
    frame = env.observe()[1]["rgb"][0]
    env.close()
    return frame


def outside_box(frame: np.ndarray) -> np.ndarray:
    out = frame.copy()
    out[B] = 0
    return out


def play(env, actions, seed=None):
    """Reset (seeded if given), then step through `actions` until the meta-rollout ends.
    Returns the frames (reset frame first), and per step: rewards, infos, terminated and truncated flags."""
    obs, _ = env.reset(seed=seed)
    frames, rewards, infos, terms, truncs = [obs["image"]], [], [], [], []
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        frames.append(obs["image"]), rewards.append(r), infos.append(info), terms.append(term), truncs.append(trunc)
        if term or trunc:
            break
    return frames, rewards, infos, terms, truncs


def test_spaces_and_first_frame_is_the_drawn_level(make):
    env = make("easy")
    assert env.action_space.n == 15 and env.observation_space["image"].shape == (64, 64, 3)
    games = set()
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        assert env.observation_space.contains(obs)
        assert env.game in ap.MODES["easy"][0] and 0 <= env.level < 2000
        np.testing.assert_array_equal(obs["image"], level_start_frame(env.game, env.level, "easy"))
        games.add(env.game)
    assert len(games) > 1


def test_attempt_two_replays_the_same_level_with_the_box(make):
    env = make("easy", games=["leaper"])  # leaper: random play ends levels quickly
    rng = np.random.default_rng(0)
    actions = rng.integers(15, size=5000)
    frames, _, infos, terms, truncs = play(env, actions, seed=3)
    boundary = [i for i, info in enumerate(infos) if info["new_episode"]]
    assert len(boundary) == 1
    n1 = boundary[0] + 1  # steps in attempt 1
    # Attempt 2 under attempt 1's actions again: procgen is deterministic for a fixed level, so it must replay it
    env2 = make("easy", games=["leaper"])
    replay = np.concatenate([actions[:n1], actions[:n1]])
    frames, rewards, infos, terms, truncs = play(env2, replay, seed=3)
    assert len(infos) == 2 * n1  # attempt 2 ended on the same step count
    assert [i["new_episode"] for i in infos] == [i == n1 - 1 for i in range(2 * n1)]  # only at the boundary
    assert terms == [False] * (2 * n1 - 1) + [True] and not any(truncs)
    attempt1, attempt2 = frames[:n1], frames[n1 : 2 * n1]
    for f1, f2 in zip(attempt1, attempt2):
        np.testing.assert_array_equal(outside_box(f1), outside_box(f2))
    assert all((f[B] == 0).all() for f in frames[n1:])  # the box in every attempt-2 frame (and the final one)
    assert ap.BOX == (slice(1, 5), slice(1, 5))  # 4x4 at rows/cols 1-4 (official library)
    assert any(f[B].any() for f in attempt1)  # ...and not forced in attempt 1
    assert env2.env.observe()[1]["rgb"][0][B].any()  # drawn into a copy: procgen's own frame is untouched
    m = infos[-1]["metrics"]
    assert infos[-1]["task"] == "leaper" and m["steps"] == 2 * n1
    assert m["return_1"] == m["return_2"] == sum(rewards[:n1]) and m["return"] == sum(rewards)
    assert m["norm_1"] == pytest.approx((m["return_1"] - 3) / (10 - 3))  # leaper easy range (3, 10)
    assert all("metrics" not in i and "task" not in i for i in infos[:-1])
    # procgen moved the kept env on to a fresh level: the next meta-rollout starts there without rebuilding it
    kept = env2.env
    obs, _ = env2.reset()
    assert env2.env is kept
    np.testing.assert_array_equal(obs["image"], level_start_frame("leaper", env2.level, "easy"))


def test_reward_scale_reaches_the_learner_and_not_the_metrics(make):
    actions = np.random.default_rng(1).integers(15, size=5000)  # chaser: random play eats orbs (0.04 each)
    _, raw, raw_infos, _, _ = play(make("easy", games=["chaser"]), actions, seed=5)
    _, scaled, infos, terms, _ = play(make("easy", games=["chaser"], reward_scales={"chaser": 100.0}), actions, seed=5)
    assert terms[-1] and len(scaled) == len(raw) and np.count_nonzero(raw) > 0
    np.testing.assert_allclose(scaled, 100 * np.array(raw))
    assert [i["prev_reward"] for i in infos] == scaled
    assert infos[-1]["metrics"] == raw_infos[-1]["metrics"]  # metrics stay on the default scale
    m = infos[-1]["metrics"]
    assert m["return_1"] + m["return_2"] == pytest.approx(sum(raw)) and all(type(v) is float for v in m.values())


@pytest.mark.parametrize("mode, norm", [("easy", -1.0), ("memory-hard", -4 / 6)])  # maze: easy (5, 10), hard (4, 10)
def test_cap_in_attempt_one_truncates_and_counts_attempt_two_as_zero(make, mode, norm):
    env = make(mode, games=["maze"], horizon=37)
    _, _, infos, terms, truncs = play(env, [NOOP] * 100, seed=0)
    assert len(infos) == 37 and truncs == [False] * 36 + [True] and not any(terms)
    assert not any(i["new_episode"] for i in infos)
    m = infos[-1]["metrics"]
    assert m == {
        "return": 0.0,
        "return_1": 0.0,
        "return_2": 0.0,
        "norm_1": pytest.approx(norm),
        "norm_2": pytest.approx(norm),
        "steps": 37.0,
    }


def test_cap_in_attempt_two_and_next_rollout_starts_a_fresh_level(make):
    actions = np.random.default_rng(2).integers(15, size=5000)
    _, _, infos, _, _ = play(make("easy", games=["leaper"]), actions, seed=9)
    n1 = next(i for i, info in enumerate(infos) if info["new_episode"]) + 1
    assert n1 > 3
    replay = np.concatenate([actions[:n1], actions[:n1]])
    # the cap falls on attempt 2's last step: termination wins
    _, _, infos, terms, truncs = play(make("easy", games=["leaper"], horizon=2 * n1), replay, seed=9)
    assert len(infos) == 2 * n1 and terms[-1] and not any(truncs)
    # the cap falls 3 steps before attempt 2 would end
    env = make("easy", games=["leaper"], horizon=2 * n1 - 3)
    frames, rewards, infos, terms, truncs = play(env, replay, seed=9)
    assert len(infos) == 2 * n1 - 3 and truncs[-1] and not any(terms) and (frames[-1][B] == 0).all()
    assert infos[-1]["metrics"]["steps"] == 2 * n1 - 3 and infos[-1]["metrics"]["return_1"] == sum(rewards[:n1])
    # the procgen env was left mid-level: the next meta-rollout must still start at the start of a level
    obs, _ = env.reset()
    assert env.attempt == 1 and obs["image"][B].any()
    np.testing.assert_array_equal(obs["image"], level_start_frame("leaper", env.level, "easy"))


def test_level_ranges_and_seeding(make):
    env = make("easy", games=["coinrun"], num_train_levels=3)
    levels = set()
    for seed in range(12):
        env.reset(seed=seed)
        levels.add(env.level)
        env.step(NOOP)
        env.reset()  # unseeded, after an unfinished rollout
        levels.add(env.level)
    assert levels == {0, 1, 2}
    env = make("easy", train=False)
    for _ in range(10):
        env.reset()
        assert ap.EVAL_START_LEVEL <= env.level < 2**31 - 1
    # the same seed gives the same games, levels and frames, also to an env that has already played
    a, b = (make("memory-hard", games=["maze", "bigfish"]) for _ in range(2))
    actions = np.random.default_rng(3).integers(15, size=50)
    for seed in (4, 5, 4):
        play(b, actions, seed=seed + 100)
        fa, ra, _, _, _ = play(a, actions, seed=seed)
        fb, rb, _, _, _ = play(b, actions, seed=seed)
        assert (a.game, a.level) == (b.game, b.level) and ra == rb
        np.testing.assert_array_equal(np.array(fa), np.array(fb))


def test_memory_hard_distributions(make):
    assert [g for g in ap.PROCGEN_GAMES if ap.distribution_mode("memory-hard", g) == "memory"] == [
        "caveflyer",
        "dodgeball",
        "heist",
        "jumper",
        "maze",
        "miner",
    ]
    assert {ap.distribution_mode("easy", g) for g in ap.PROCGEN_GAMES} == {"easy"}
    env = make("memory-hard")
    assert env.horizon == 5000 and len(env.games) == 16
    for game in ap.PROCGEN_GAMES:  # a wrong "memory" request would abort this process
        env.fixed_task = game
        obs, _ = env.reset()
        assert env.game == game
        dist = ap.distribution_mode("memory-hard", game)
        np.testing.assert_array_equal(obs["image"], level_start_frame(game, env.level, dist))
        for _ in range(5):
            obs, *_ = env.step(env.action_space.sample())
        assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    env.fixed_task = "maze"  # memory maze is not hard maze
    env.reset()
    memory, hard = (level_start_frame("maze", env.level, dist) for dist in ("memory", "hard"))
    assert not np.array_equal(memory, hard)


def test_constructor_errors():
    with pytest.raises(ValueError, match="unknown Procgen mode"):
        ap.ProcgenMetaEnv("hard")
    with pytest.raises(ValueError, match="unknown Procgen game"):
        ap.ProcgenMetaEnv("easy", games=["coinrun", "pong"])
    with pytest.raises(ValueError, match="unknown Procgen game"):
        ap.ProcgenMetaEnv("easy", task="pong")
    for scales in ({"maze": 2.0}, {"coinrun": 0.0}, {"coinrun": float("nan")}):  # a game not played; factors <= 0, NaN
        with pytest.raises(ValueError, match="each must name a game played"):
            ap.ProcgenMetaEnv("easy", reward_scales=scales)
    with pytest.raises(ValueError, match="--num-train-levels must be in"):
        ap.ProcgenMetaEnv("easy", num_train_levels=0)


def test_make_env():
    args = SimpleNamespace(
        seed=1,
        mode="easy",
        games=[],
        reward_scales={"coinrun": 100.0, "climber": 0.1},
        num_train_levels=500,
        horizon=None,
        capture_video=False,
    )
    train = ap.make_env(args, 0, train=True)()
    assert train.games == ap.MODES["easy"][0] and train.horizon == 2500
    assert train.reward_scales == {"coinrun": 100.0, "climber": 0.1} and train.level_range == (0, 500)
    with ap.make_env(args, 0, train=False, task="ninja")() as evaluation:  # closes its procgen env, pass or fail
        assert evaluation.reward_scales == {"coinrun": 100.0, "climber": 0.1} and evaluation.fixed_task == "ninja"
        assert evaluation.level_range[0] == ap.EVAL_START_LEVEL
        evaluation.reset(seed=0)
        assert evaluation.game == "ninja"
    args = SimpleNamespace(
        seed=1,
        mode="memory-hard",
        games=["maze", "heist"],
        reward_scales={"maze": 2.0},
        num_train_levels=2000,
        horizon=None,
        capture_video=False,
    )
    env = ap.make_env(args, 3, train=True)()
    assert env.games == ["maze", "heist"] and env.horizon == 5000 and env.reward_scales == {"maze": 2.0}
    env.close()
    with ap.make_env(SimpleNamespace(**{**vars(args), "horizon": 9}), 0, train=True)() as capped:
        assert capped.horizon == 9


def test_vector_env_as_the_core_drives_it():
    """SyncVectorEnv without autoreset, finished envs reset by mask (MetaRollouts in amago2_popgym.py)."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: ap.ProcgenMetaEnv("easy", games=["maze"], horizon=7)] * 2, autoreset_mode=gym.vector.AutoresetMode.DISABLED
    )
    try:
        obs, _ = envs.reset(seed=[1, 2])
        assert obs["image"].shape == (2, 64, 64, 3) and obs["image"].dtype == np.uint8
        for _ in range(7):
            obs, reward, terminated, truncated, info = envs.step(np.array([NOOP, NOOP]))
            assert info["new_episode"].tolist() == [False, False] and info["prev_reward"].dtype == np.float64
        assert truncated.tolist() == [True, True] and info["task"].tolist() == ["maze", "maze"]
        assert info["metrics"]["steps"].tolist() == [7.0, 7.0] and info["metrics"]["norm_2"].tolist() == [-1.0, -1.0]
        obs, _ = envs.reset(options={"reset_mask": np.array([True, False])})
        assert [env.t for env in envs.envs] == [0, 7]
    finally:
        envs.close()


def test_summarize_eval():
    per_task = {
        "coinrun": {"return_1": 5.0, "return_2": 10.0, "norm_1": 0.0, "norm_2": 1.0, "steps": 100.0},
        "leaper": {"return_1": 3.0, "return_2": 6.5, "norm_1": 0.0, "norm_2": 0.5, "steps": 50.0},
    }
    assert ap.summarize_eval(per_task) == {"norm_1_mean": 0.0, "norm_2_mean": 0.75, "return_2_mean": 8.25}
