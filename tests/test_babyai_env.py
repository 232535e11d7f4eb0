"""BabyAI meta-rollout wrapper, tokeniser, eval summary and timestep encoder of amago2_babyai.py."""

import os
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import scipy.stats
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minigrid.utils.baby_ai_bot import BabyAIBot  # noqa: E402

import amago2_babyai as ab  # noqa: E402

# The 28 registered BabyAI ids that are not tasks here: multi-step and Synth/Boss families.
EXCLUDED_PREFIXES = (
    "PutNext",
    "GoToSeq",
    "MoveTwoAcross",
    "OpenDoorsOrder",
    "OpenTwoDoors",
    "OpenRedBlueDoorsDebug",
    "Synth",
    "BossLevel",
    "MiniBossLevel",
)
TURN_LEFT = 0  # never finishes a task: every attempt runs to the time limit


def test_tokenize_known_ids():
    # ids follow VOCAB order from 2: a=2, ball=3, blue=5, door=7, "door,"=8, go=10, open=19, red=22, the=24,
    # then=25, to=26
    assert ab.tokenize("go to the red ball").tolist() == [10, 26, 24, 22, 3, 0, 0, 0, 0]
    assert ab.tokenize("Open the RED door, then open the blue door").tolist() == [19, 24, 22, 8, 25, 19, 24, 5, 7]
    assert ab.tokenize("put the ball next to a key").tolist() == [1, 24, 3, 1, 26, 2, 14, 0, 0]  # unknown -> 1
    assert ab.tokenize("").tolist() == [0] * 9
    long = ab.tokenize("go to the red ball " * 3)
    assert long.dtype == np.int64 and long.shape == (ab.MAX_MISSION_LEN,) and long.tolist()[-1] == 22


def test_vocabulary():
    assert len(ab.VOCAB) == 29 and len(set(ab.VOCAB)) == 29 and ab.VOCAB_SIZE == 31
    assert sorted(ab.WORD_TO_ID.values()) == list(range(2, 31))


def test_split_sizes_and_disjoint():
    assert len(ab.TRAIN_TASKS) == len(set(ab.TRAIN_TASKS)) == 50
    assert len(ab.TEST_TASKS) == len(set(ab.TEST_TASKS)) == 18
    assert not set(ab.TRAIN_TASKS) & set(ab.TEST_TASKS)
    assert ab.TRAIN_SEED_RANGE == (0, 5_000)  # the authors' launch script: train layouts from [0, 5000)
    assert ab.TRAIN_SEED_RANGE[1] <= ab.EVAL_SEED_RANGE[0]


def test_split_is_the_registry_minus_excluded_families():
    registered = {env_id for env_id in gym.registry if env_id.startswith("BabyAI-")}
    excluded = {env_id for env_id in registered if env_id.split("-")[1].startswith(EXCLUDED_PREFIXES)}
    assert len(registered) == 96 and len(excluded) == 28
    ours = {ab.babyai_id(task) for task in ab.TRAIN_TASKS + ab.TEST_TASKS}
    assert registered - excluded == ours
    assert "BabyAI-GoToObjS6-v1" in ours and "BabyAI-GoToObjS6-v0" not in registered


def test_every_task_builds_and_its_missions_fit():
    env = ab.BabyAIMetaEnv(train=True, seed=0)
    for task in ab.TRAIN_TASKS + ab.TEST_TASKS:
        env.tasks = [task]
        for seed in range(4):
            obs, _ = env.reset(seed=seed)
            assert env.observation_space.contains(obs), task
            words = env.env.unwrapped.mission.lower().split()
            assert len(words) <= ab.MAX_MISSION_LEN, (task, words)
            assert ab.UNKNOWN not in obs["mission"].tolist(), (task, words)
            obs, *_ = env.step(env.action_space.sample())
            assert env.observation_space.contains(obs), task


def test_time_limit_boundaries_and_metrics():
    # GoToObjS4 has max_steps 16: with k = 3 attempts, boundaries after steps 16 and 32, and the protocol's end at
    # step 48, a terminal although the last attempt only ran out of time (official library: done).
    env = ab.BabyAIMetaEnv(train=False, task="GoToObjS4", k_episodes=3, seed=1)
    obs, _ = env.reset()
    assert env.env.unwrapped.max_steps == 16 and obs["progress"][0] == 0.0
    boundaries = []
    for t in range(1, 49):
        obs, reward, terminated, truncated, info = env.step(TURN_LEFT)
        assert reward == 0.0 and info["prev_reward"] == 0.0
        if info["new_episode"]:
            boundaries.append(t)
            assert obs["progress"][0] == 0.0  # first obs of the next attempt
        else:
            assert obs["progress"][0] == pytest.approx((t % 16 or 16) / 16)
        assert (terminated, truncated) == ((True, False) if t == 48 else (False, False))
        assert ("metrics" in info) == (t == 48) and ("task" in info) == (t == 48)
    assert boundaries == [16, 32]
    assert info["task"] == "test/GoToObjS4"  # a held-out task: logged as eval/test/GoToObjS4/...
    assert info["metrics"] == {"return": 0.0, **{f"{m}_{a}": 0.0 for m in ("return", "success") for a in (1, 2, 3)}}


def test_same_layout_every_attempt_and_success_terminates():
    env = ab.BabyAIMetaEnv(train=True, task="GoToObjS4", k_episodes=2, seed=3)
    obs, _ = env.reset()
    firsts, rewards, infos = [obs], [], []
    grids = [env.env.unwrapped.grid.encode()]
    starts = [(tuple(env.env.unwrapped.agent_pos), env.env.unwrapped.agent_dir)]
    bot = BabyAIBot(env.env.unwrapped)
    for _ in range(100):
        obs, reward, terminated, truncated, info = env.step(bot.replan())
        rewards.append(reward)
        infos.append(info)
        if info["new_episode"]:
            firsts.append(obs)
            grids.append(env.env.unwrapped.grid.encode())
            starts.append((tuple(env.env.unwrapped.agent_pos), env.env.unwrapped.agent_dir))
            bot = BabyAIBot(env.env.unwrapped)
        if terminated or truncated:
            break
    assert terminated and not truncated
    assert sum(i["new_episode"] for i in infos) == 1 and len(firsts) == 2
    for key in ("image", "direction", "mission", "progress"):
        np.testing.assert_array_equal(firsts[0][key], firsts[1][key])
    # the attempt index / k is what tells attempt 2's first observation from attempt 1's (official library)
    assert firsts[0]["attempt"][0] == 0.5 and firsts[1]["attempt"][0] == 1.0  # 1/k, 2/k
    np.testing.assert_array_equal(grids[0], grids[1])
    assert starts[0] == starts[1]
    m = info["metrics"]
    assert m["success_1"] == m["success_2"] == 1.0
    assert m["return_1"] == m["return_2"] > 0.1  # the bot repeats its path on the same layout
    assert all(type(v) is float for v in m.values())
    assert sorted(m) == ["return", "return_1", "return_2", "success_1", "success_2"]
    assert sum(rewards) == pytest.approx(m["return_1"] + m["return_2"]) == pytest.approx(m["return"])


def test_failure_terminates_without_success():
    # PickupDistDebug is strict: picking up the wrong object ends the attempt with reward 0 (minigrid "failure").
    env = ab.BabyAIMetaEnv(train=True, task="PickupDistDebug", k_episodes=2)

    def wrong_object_ahead(seed, prefix):
        env.reset(seed=seed)
        for a in prefix:
            env.step(a)
        u = env.env.unwrapped
        obj = u.grid.get(*u.front_pos)
        return obj is not None and obj.can_pickup() and not any(o is obj for o in u.instrs.desc.obj_set)

    prefixes = ((0,), (1,), (2,), (2, 0), (2, 1), (0, 2), (1, 2))  # a turn and/or a step forward
    seed, prefix = next((s, p) for s in range(50) for p in prefixes if wrong_object_ahead(s, p))
    env.reset(seed=seed)
    for attempt in (1, 2):
        for a in prefix:
            assert env.step(a)[1:4] == (0.0, False, False)
        obs, reward, terminated, truncated, info = env.step(3)  # pick up the wrong object
        assert reward == 0.0 and info["new_episode"] == (attempt == 1)
    assert terminated and not truncated
    assert info["metrics"] == {"return": 0.0, "return_1": 0.0, "return_2": 0.0, "success_1": 0.0, "success_2": 0.0}
    assert info["task"] == "PickupDistDebug"  # a training task keeps its plain name


def test_success_on_the_last_allowed_step_is_a_success_and_a_termination():
    # minigrid sets terminated and truncated together when the goal is reached at step max_steps (16 here):
    # the wrapper reports a termination only, and the attempt counts as a success with reward 1 - 0.9 = 0.1.
    env = ab.BabyAIMetaEnv(train=True, task="GoToObjS4", k_episodes=2)
    for seed in range(50):  # find a layout the bot solves in 2 steps
        env.reset(seed=seed)
        bot, steps, new_episode = BabyAIBot(env.env.unwrapped), 0, False
        while not new_episode:
            new_episode = env.step(bot.replan())[4]["new_episode"]
            steps += 1
        if steps == 2:
            break
    assert steps == 2
    for _ in range(7):  # turn left then right: 14 steps that end where they began
        env.step(0)
        env.step(1)
    bot = BabyAIBot(env.env.unwrapped)
    for _ in range(2):
        obs, reward, terminated, truncated, info = env.step(bot.replan())
    assert env.env.unwrapped.step_count == 16
    assert terminated and not truncated and reward == pytest.approx(0.1)
    assert info["metrics"]["success_2"] == 1.0 and info["metrics"]["return_2"] == pytest.approx(0.1)


def test_task_and_seed_sampling():
    train, test = ab.BabyAIMetaEnv(train=True, seed=0), ab.BabyAIMetaEnv(train=False, seed=0)
    train_tasks, test_tasks = set(), set()
    for _ in range(200):
        train.reset()
        test.reset()
        train_tasks.add(train.task)
        test_tasks.add(test.task)
        assert ab.TRAIN_SEED_RANGE[0] <= train.layout_seed < ab.TRAIN_SEED_RANGE[1]
        assert ab.EVAL_SEED_RANGE[0] <= test.layout_seed < ab.EVAL_SEED_RANGE[1]
    assert train_tasks <= set(ab.TRAIN_TASKS) and len(train_tasks) > 40
    assert test_tasks == set(ab.TEST_TASKS)
    assert len(train.envs) == len(train_tasks)  # one cached minigrid env per task


def test_make_env_in_a_vector_env():
    args = SimpleNamespace(seed=7, k_episodes=2, tasks=ab.TRAIN_TASKS, test_tasks=ab.TEST_TASKS, capture_video=False)
    envs = gym.vector.SyncVectorEnv([ab.make_env(args, i, train=True) for i in range(2)])
    obs, _ = envs.reset()
    assert obs["image"].shape == (2, 7, 7, 3) and obs["mission"].shape == (2, ab.MAX_MISSION_LEN)
    assert envs.single_action_space == gym.spaces.Discrete(7)
    for _ in range(5):
        obs, reward, terminated, truncated, info = envs.step(envs.action_space.sample())
    envs.close()
    a, b = ab.make_env(args, 0, True)(), ab.make_env(args, 0, True)()
    a.reset(), b.reset()
    assert (a.task, a.layout_seed) == (b.task, b.layout_seed)  # seed = args.seed + env_idx, reproducible


def test_summarize_eval_known_answer():
    returns = [0.0, 0.1, 0.2, 0.3, 1.0]  # IQM with n = 5 drops one task at each end: mean(0.1, 0.2, 0.3) = 0.2
    per_task = {
        f"t{i}": {"return": r, "return_1": r, "return_2": [r, 2 * r], "success_1": float(r > 0), "success_2": 1.0}
        for i, r in enumerate(returns)
    }
    # held-out tasks ("test/<task>") are summarised on their own: returns 0.5 and 0.7, nothing mixes across splits
    per_task.update(
        {
            f"test/u{i}": {"return": r, "return_1": r, "return_2": r, "success_1": 1.0, "success_2": 0.0}
            for i, r in enumerate([0.5, 0.7])
        }
    )
    s = ab.summarize_eval(per_task)
    assert s["train_return_1_median"] == pytest.approx(0.2)
    assert s["train_return_1_mean"] == pytest.approx(0.32)
    assert s["train_return_1_iqm"] == pytest.approx(0.2)
    assert s["train_success_1_mean"] == pytest.approx(0.8) and s["train_success_2_mean"] == 1.0
    assert s["train_return_2_mean"] == pytest.approx(0.48)  # each task's rollouts are averaged first: 1.5 * returns
    assert s["test_return_1_median"] == s["test_return_2_iqm"] == pytest.approx(0.6)
    assert s["test_success_1_mean"] == 1.0 and s["test_success_2_mean"] == 0.0
    assert len(s) == 2 * 2 * 4  # split x attempt x (median, mean, IQM, success)
    for x in ([3.0], [1.0, 5.0], [4.0, 1.0, 2.0], [8.0, 1.0, 2.0, 3.0], list(np.random.default_rng(0).random(68))):
        s = ab.summarize_eval({f"test/{i}": {"return_1": v, "success_1": 0.0} for i, v in enumerate(x)})
        assert s["test_return_1_iqm"] == pytest.approx(scipy.stats.trim_mean(x, 0.25)) and "train_return_1_iqm" not in s
    assert (
        ab.summarize_eval({str(i): {"return_1": v, "success_1": 0.0} for i, v in enumerate([8.0, 1.0, 2.0, 3.0])})[
            "train_return_1_iqm"
        ]
        == 2.5
    )


def test_eval_envs_cover_both_splits_on_unseen_layouts():
    args = SimpleNamespace(
        seed=0, k_episodes=2, eval_tasks_per_split=None, tasks=ab.TRAIN_TASKS, test_tasks=ab.TEST_TASKS, capture_video=False
    )
    envs = [thunk() for thunk in ab.make_eval_envs(args)]
    assert [e.tasks[0] for e in envs] == ab.TRAIN_TASKS + ab.TEST_TASKS
    assert all(e.seed_range == ab.EVAL_SEED_RANGE for e in envs)  # training tasks too: unseen layouts
    args.eval_tasks_per_split = 3  # spread over each list
    tasks = [thunk().tasks[0] for thunk in ab.make_eval_envs(args)]
    assert tasks == [ab.TRAIN_TASKS[i] for i in (0, 16, 33)] + [ab.TEST_TASKS[i] for i in (0, 6, 12)]
    args.eval_tasks_per_split = 20  # more than the 18 held-out tasks: all of them
    assert len(ab.make_eval_envs(args)) == 20 + 18


def _batch(B, L, seed=0):
    env = ab.BabyAIMetaEnv(train=True, seed=seed)
    obs = {k: [] for k in env.observation_space}
    for _ in range(B * L):
        o, _ = env.reset()
        for k in obs:
            obs[k].append(o[k])
    obs = {k: torch.as_tensor(np.stack(v)).reshape(B, L, *v[0].shape) for k, v in obs.items()}
    g = torch.Generator().manual_seed(seed)
    prev_action, prev_reward = torch.randint(0, 7, (B, L), generator=g), torch.rand(B, L, generator=g)
    return env, obs, prev_action, prev_reward, (torch.rand(B, L, generator=g) < 0.2).float()


def test_encoder_shape_and_grad():
    torch.manual_seed(0)
    env, obs, prev_action, prev_reward, reset = _batch(3, 5)
    enc = ab.TimestepEncoder(env.observation_space, 7, ab.Args(d_token=64))
    out = enc(obs, prev_action, prev_reward, reset)
    assert out.shape == (3, 5, 64) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert enc.word_embed.weight.grad[ab.BLANK].abs().sum() == 0  # padding_idx: the blank token learns nothing
    assert all(p.grad is not None for p in enc.parameters())
    # direction may also come as (B, L) rather than (B, L, 1)
    obs2 = dict(obs, direction=obs["direction"][..., 0])
    torch.testing.assert_close(enc(obs2, prev_action, prev_reward, reset), out.detach())


def test_encoder_no_action_is_zeros_and_mask_is_accepted():
    # the core stores prev_action = NO_ACTION (-1) at meta-rollout starts: its one-hot must be all zeros
    torch.manual_seed(0)
    env, obs, prev_action, prev_reward, reset = _batch(2, 3)
    prev_action[:, 0] = ab.NO_ACTION
    enc = ab.TimestepEncoder(env.observation_space, 7, ab.Args(d_token=32))
    seen = []
    enc.extras[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = enc(obs, prev_action, prev_reward, reset, mask)  # the core's call: mask is accepted, and unused
    x = seen[0].reshape(2, 3, -1)[..., 6:13]  # [direction (4), progress, attempt, prev action (7), reward, reset]
    assert torch.isfinite(out).all() and (x[:, 0] == 0).all()
    assert (x[:, 1:].sum(-1) == 1).all() and (x[:, 1:].argmax(-1) == prev_action[:, 1:]).all()
    torch.testing.assert_close(enc(obs, prev_action, prev_reward, reset, ~mask), out)


def test_encoder_mission_ignores_padding_and_batch_mates():
    torch.manual_seed(0)
    env, obs, prev_action, prev_reward, reset = _batch(2, 6, seed=1)
    enc = ab.TimestepEncoder(env.observation_space, 7, ab.Args(d_token=256)).eval()
    with torch.no_grad():
        full = enc(obs, prev_action, prev_reward, reset)
        for b in range(2):
            for t in range(6):
                one = enc(
                    {k: v[b : b + 1, t : t + 1] for k, v in obs.items()},
                    prev_action[b : b + 1, t : t + 1],
                    prev_reward[b : b + 1, t : t + 1],
                    reset[b : b + 1, t : t + 1],
                )
                torch.testing.assert_close(one[0, 0], full[b, t])
    # the mission vector is the RNN state after the last real word: the unpadded sequence gives the same one
    tokens = torch.as_tensor(
        np.stack([ab.tokenize("go to the red ball"), ab.tokenize("pick up a key"), ab.tokenize("go to the red ball")])
    )
    with torch.no_grad():
        feats = enc.mission_features(tokens)
        for row, n in ((0, 5), (1, 4), (2, 5)):
            _, h = enc.rnn(enc.word_embed(tokens[None, row, :n]))
            torch.testing.assert_close(feats[row], h[0, 0])
        out, _ = enc.rnn(enc.word_embed(tokens[None, 0]))
        assert not torch.allclose(out[0, -1], feats[0])  # running on through the padding would differ
