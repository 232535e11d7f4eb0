"""Meta-World: the meta-rollout protocol, the timestep encoder, the tanh-Gaussian actor, DPG gradient isolation,
exploration and the evaluation summary."""

import os
import pickle
import sys
from types import SimpleNamespace

import gymnasium as gym
import metaworld
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from amago2_metaworld import (  # noqa: E402
    Agent,
    Args,
    MetaWorldMetaEnv,
    TanhGaussian,
    TimestepEncoder,
    dpg_actor_loss,
    explore,
    make_env,
    make_eval_envs,
    metaworld_benchmark,
    policy_stats,
    rollout_end_epsilon,
    summarize_eval,
)

EP_LEN, K = 20, 3  # short inner episodes keep the tests fast; the logic does not depend on 500


def rollout(env, seed=None, action=None):
    """Play one meta-rollout; return per-step records."""
    obs, info = env.reset(seed=seed)
    steps = [
        dict(
            obs=obs["obs"],
            info=info,
            reward=0.0,
            terminated=False,
            truncated=False,
            goal=env.sim._target_pos.copy(),
            rand_vec=env.sim._last_rand_vec.copy(),
        )
    ]
    while True:
        a = env.action_space.sample() if action is None else action
        obs, reward, terminated, truncated, info = env.step(a)
        steps.append(
            dict(
                obs=obs["obs"],
                info=info,
                reward=reward,
                terminated=terminated,
                truncated=truncated,
                goal=env.sim._target_pos.copy(),
                rand_vec=env.sim._last_rand_vec.copy(),
            )
        )
        if terminated or truncated:
            return steps


@pytest.fixture(scope="module")
def ml1_env():
    env = MetaWorldMetaEnv("ML1", "reach-v3", train=True, k_episodes=K, episode_length=EP_LEN, seed=0)
    yield env
    env.close()


def test_spaces_and_reset(ml1_env):
    obs, info = ml1_env.reset(seed=1)
    assert isinstance(ml1_env.observation_space, gym.spaces.Dict)
    assert ml1_env.observation_space["obs"].shape == (39,)
    assert ml1_env.action_space.shape == (4,) and ml1_env.action_space.dtype == np.float32
    assert obs["obs"].shape == (39,) and obs["obs"].dtype == np.float32
    assert ml1_env.observation_space.contains(obs)
    assert np.all(obs["obs"][36:] == 0)  # ML benchmarks hide the goal
    assert info["new_episode"] is True


def test_episode_boundaries_and_flags(ml1_env):
    steps = rollout(ml1_env, seed=2)
    assert len(steps) - 1 == K * EP_LEN  # the protocol ends exactly at step k * episode_length
    flags = [s["info"]["new_episode"] for s in steps[1:]]
    expected = [(t % EP_LEN == 0) and t < K * EP_LEN for t in range(1, K * EP_LEN + 1)]
    assert flags == expected  # True exactly at the K-1 inner boundaries
    # the k-th episode's end is a terminal (official library), never a truncation; inner ends are neither
    assert not any(s["truncated"] for s in steps)
    assert [s["terminated"] for s in steps[1:]] == [False] * (K * EP_LEN - 1) + [True]
    for s in steps[1:]:
        assert s["info"]["prev_reward"] == s["reward"]
    # task / metrics only at the end of the meta-rollout
    assert all("metrics" not in s["info"] and "task" not in s["info"] for s in steps[:-1])
    assert steps[-1]["info"]["task"] == "reach-v3"


def test_same_variant_across_attempts(ml1_env):
    steps = rollout(ml1_env, seed=3)
    starts = [0] + [i for i, s in enumerate(steps) if s["info"]["new_episode"] and i > 0]
    assert len(starts) == K
    for i in starts[1:]:
        np.testing.assert_array_equal(steps[i]["rand_vec"], steps[0]["rand_vec"])
        np.testing.assert_array_equal(steps[i]["goal"], steps[0]["goal"])
        # the simulator restarts from the variant's exact initial state
        np.testing.assert_allclose(steps[i]["obs"], steps[0]["obs"], atol=1e-6)
    # and the obs right before an inner reset is not the initial obs (it really was reset)
    assert not np.allclose(steps[starts[1] - 1]["obs"], steps[0]["obs"])


def test_variants_change_between_meta_rollouts(ml1_env):
    goals = {tuple(rollout(ml1_env, seed=s)[0]["rand_vec"]) for s in range(4)}
    assert len(goals) > 1


def test_seeding_reproducible():
    a = MetaWorldMetaEnv("ML1", "reach-v3", k_episodes=1, episode_length=5, seed=0)
    b = MetaWorldMetaEnv("ML1", "reach-v3", k_episodes=1, episode_length=5, seed=0)
    for _ in range(3):
        a.reset(), b.reset()
        np.testing.assert_array_equal(a.sim._last_rand_vec, b.sim._last_rand_vec)


def test_train_and_test_variants_differ():
    """ML1: the held-out goals are other variants of the same class."""

    def goals(train):
        env = MetaWorldMetaEnv("ML1", "reach-v3", train=train, seed=0)
        return {tuple(pickle.loads(v.data)["rand_vec"]) for v in env.variants["reach-v3"]}

    train, test = goals(True), goals(False)
    assert len(train) == 50 and len(test) == 50 and train.isdisjoint(test)


def test_success_bookkeeping(ml1_env):
    metrics = rollout(ml1_env, seed=4)[-1]["info"]["metrics"]
    assert set(metrics) == {"success_1", "success_2", "success_3", "success", "return", "return_1", "return_2", "return_3"}
    assert all(type(v) is float for v in metrics.values())
    assert metrics["return"] == pytest.approx(sum(metrics[f"return_{i}"] for i in range(1, K + 1)))
    assert all(0.0 <= metrics[f"success_{i}"] <= 1.0 for i in range(1, K + 1))
    assert metrics["success"] == pytest.approx(np.mean([metrics[f"success_{i}"] for i in range(1, K + 1)]))


def test_success_counts_any_step_per_attempt(ml1_env, monkeypatch):
    """Force the raw env's success flag on one step of attempt 2 only: success_2 = 1, others 0; reward i per step in
    attempt i: each attempt's return is its own."""
    ml1_env.reset(seed=5)
    real_step = ml1_env.sim.step
    calls = {"n": 0}

    def fake_step(action):
        obs, r, te, tr, info = real_step(action)
        calls["n"] += 1
        attempt = (calls["n"] - 1) // EP_LEN + 1
        return obs, float(attempt), te, tr, dict(info, success=float(calls["n"] == EP_LEN + 3))

    monkeypatch.setattr(ml1_env.sim, "step", fake_step)
    while True:
        _, _, terminated, truncated, info = ml1_env.step(np.zeros(4, np.float32))
        if terminated or truncated:
            break
    m = info["metrics"]
    assert (m["success_1"], m["success_2"], m["success_3"]) == (0.0, 1.0, 0.0)
    assert m["success"] == pytest.approx(1 / 3)
    assert [m[f"return_{i}"] for i in range(1, K + 1)] == pytest.approx([EP_LEN * i for i in range(1, K + 1)])
    assert m["return"] == pytest.approx(EP_LEN * K * (K + 1) / 2)  # total return over all k episodes


def test_k_attempt_keys_general():
    env = MetaWorldMetaEnv("ML1", "reach-v3", k_episodes=2, episode_length=3, seed=0)
    m = rollout(env, seed=0)[-1]["info"]["metrics"]
    assert set(m) == {"success_1", "success_2", "success", "return", "return_1", "return_2"}


@pytest.fixture
def few_goals(monkeypatch):
    """Build ML45 with 2 goal variants per class instead of 50 (~7 s instead of ~25 s); the
    class lists do not depend on it. The cache is cleared so no later user sees this copy."""
    monkeypatch.setattr(metaworld, "_N_GOALS", 2)
    metaworld_benchmark.cache_clear()
    yield
    metaworld_benchmark.cache_clear()


def test_ml45_classes_and_pinned_test_task(few_goals):
    bench = metaworld_benchmark("ML45", "reach-v3")
    assert sorted(bench.test_classes) == sorted(
        ["bin-picking-v3", "box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3"]
    )
    assert len(bench.train_classes) == 45 and not set(bench.train_classes) & set(bench.test_classes)
    env = MetaWorldMetaEnv("ML45", train=False, k_episodes=1, episode_length=3, seed=0)
    assert sorted(env.task_names) == sorted(bench.test_classes)
    env = MetaWorldMetaEnv("ML45", train=False, task="door-lock-v3", k_episodes=1, episode_length=3, seed=0)
    assert rollout(env)[-1]["info"]["task"] == "test/door-lock-v3"  # held-out tasks are labelled apart
    env = MetaWorldMetaEnv("ML45", train=True, k_episodes=1, episode_length=3, seed=0)
    seen = {rollout(env)[-1]["info"]["task"] for _ in range(6)}
    assert seen <= set(bench.train_classes) and len(seen) > 1  # samples among the 45 classes
    with pytest.raises(AssertionError):
        MetaWorldMetaEnv("ML45", train=True, task="door-lock-v3")  # a test class is not a train task


def test_make_env_vector():
    args = SimpleNamespace(seed=7, benchmark="ML1", ml1_task="push-v3", k_episodes=2, episode_length=500, capture_video=False)
    envs = gym.vector.SyncVectorEnv([make_env(args, i, train=True) for i in range(2)])
    obs, _ = envs.reset()
    assert obs["obs"].shape == (2, 39)
    assert [e.np_random is not None for e in envs.envs] == [True, True]
    for _ in range(2 * 500):
        obs, rew, term, trunc, info = envs.step(envs.action_space.sample())
    assert term.all() and not trunc.any()  # the k-th episode ends the protocol: a terminal
    assert list(info["task"]) == ["push-v3", "push-v3"]
    assert info["metrics"]["success"].shape == (2,)
    envs.close()


def test_make_eval_envs_one_per_train_and_test_task():
    args = SimpleNamespace(seed=0, benchmark="ML1", ml1_task="reach-v3", k_episodes=1, episode_length=2, capture_video=False)
    envs = [thunk() for thunk in make_eval_envs(args)]
    assert [rollout(env, seed=0)[-1]["info"]["task"] for env in envs] == ["reach-v3", "test/reach-v3"]
    test_goals = {tuple(pickle.loads(v.data)["rand_vec"]) for v in envs[1].variants["reach-v3"]}
    assert tuple(envs[1].sim._last_rand_vec) in test_goals  # the test env plays held-out variants


def test_summarize_eval():
    per_task = {
        "a": {"success_1": 1.0, "success_2": 1.0, "success_3": 0.0, "success": 2 / 3, "return": 30.0},
        "b": {"success_1": 0.0, "success_2": 0.0, "success_3": 1.0, "success": 1 / 3, "return": 10.0},
        "c": {"success_1": 1.0, "success_2": 1.0, "success_3": 1.0, "success": 1.0, "return": 50.0},
        "test/d": {"success_1": 0.0, "success_2": 1.0, "success_3": 1.0, "success": 2 / 3, "return": 7.0},
        "test/e": {"success_1": 0.0, "success_2": 0.0, "success_3": 0.0, "success": 0.0, "return": 1.0},
    }
    out = summarize_eval(per_task)
    assert out["train/success"] == pytest.approx(2 / 3)
    assert (out["train/success_1"], out["train/success_2"], out["train/success_3"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert out["train/skill_coverage"] == 2.0  # a (exactly 2/3) and c
    assert out["train/return"] == pytest.approx(30.0)
    assert out["test/success"] == pytest.approx(1 / 3) and out["test/success_2"] == pytest.approx(0.5)
    assert out["test/skill_coverage"] == 1.0 and out["test/return"] == pytest.approx(4.0)
    assert set(summarize_eval({"a": per_task["a"]})) == {f"train/{k}" for k in [*per_task["a"], "skill_coverage"]}


def test_encoder_shape_and_running_stats():
    torch.manual_seed(0)
    space = gym.spaces.Dict({"obs": gym.spaces.Box(-np.inf, np.inf, (39,), np.float32)})
    enc = TimestepEncoder(space, 4, Args(d_token=256))
    B, L = 3, 7
    obs = {"obs": torch.randn(B, L, 39) * 5 + 2}
    act, rew, reset = torch.rand(B, L, 4) * 2 - 1, torch.rand(B, L) * 10, torch.zeros(B, L)
    reset[:, 0] = 1
    assert {"norm.mean", "norm.sq_mean", "norm.count"} <= set(enc.state_dict())

    enc.eval()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    out = enc(obs, act, rew, reset)
    assert out.shape == (B, L, 256)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # eval: no update

    enc.train()
    out = enc(obs, act, rew, reset)
    assert out.shape == (B, L, 256) and torch.isfinite(out).all()
    assert enc.norm.count.item() == 1
    # first update is bias-corrected: the statistics equal the batch statistics (to float32 rounding of the
    # 1e-4 momentum step and its correction)
    x = torch.cat([obs["obs"], act, rew[..., None], reset[..., None]], -1).reshape(-1, 45)
    mean = enc.norm.mean / (1 - (1 - enc.norm.momentum) ** enc.norm.count)
    torch.testing.assert_close(mean, x.mean(0), rtol=1e-3, atol=1e-3)
    out.sum().backward()  # gradients flow and the statistics are not parameters
    assert all(p.grad is not None for p in enc.parameters())

    # mask: statistics only from valid timesteps
    enc2 = TimestepEncoder(space, 4, Args(d_token=32)).train()
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :3] = True
    obs_pad = {"obs": obs["obs"].clone()}
    obs_pad["obs"][:, 3:] = 1e6  # padding garbage must not leak into the statistics
    enc2(obs_pad, act, rew, reset, mask=mask)
    mean2 = enc2.norm.mean / (1 - (1 - enc2.norm.momentum) ** enc2.norm.count)
    torch.testing.assert_close(mean2[:39], obs["obs"][:, :3].reshape(-1, 39).mean(0), rtol=1e-3, atol=1e-3)
    enc2(obs_pad, act, rew, reset, mask=torch.zeros(B, L, dtype=torch.bool))
    assert enc2.norm.count.item() == 1  # an all-padding batch leaves the statistics alone


# ---- the continuous action distribution, DPG and exploration ----
def test_tanh_gaussian_log_prob_matches_torch():
    """log pi(a) of buffer actions equals torch's TransformedDistribution(Normal, Tanh) inside (-0.99, 0.99),
    sums over action dims, and clamps at the box edge instead of returning inf."""
    torch.manual_seed(0)
    N, G, A = 5, 7, 4
    mean, std = torch.randn(N, G, A), torch.rand(N, G, A) + 0.1
    dist = TanhGaussian(mean, std)
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Independent(torch.distributions.Normal(mean, std), 1), [torch.distributions.TanhTransform()]
    )
    a = torch.rand(N, G, A) * 1.9 - 0.95  # inside the clamp
    torch.testing.assert_close(dist.log_prob(a), ref.log_prob(a), rtol=1e-4, atol=1e-4)
    assert dist.log_prob(a).shape == (N, G)
    edge = torch.ones(N, G, A)  # clipped exploration noise lands exactly on the box edge
    assert torch.isfinite(dist.log_prob(edge)).all()
    torch.testing.assert_close(dist.log_prob(edge), ref.log_prob(torch.full_like(edge, 0.99)), rtol=1e-4, atol=1e-4)
    # samples: (*sample_shape, N, G, A) inside [-1, 1]; rsample carries gradient to mean and std
    assert dist.sample((3,)).shape == (3, N, G, A) and dist.sample().abs().max() <= 1
    mean.requires_grad_(True)
    TanhGaussian(mean, std).rsample().sum().backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0


def tiny_agent(critic_loss="ind"):
    args = Args(
        d_token=16,
        d_model=32,
        d_ff=64,
        n_layers=1,
        n_heads=2,
        head_hidden=32,
        num_bins=16,
        critic_loss=critic_loss,
        actor_loss="dep",
    )
    space = gym.spaces.Dict({"obs": gym.spaces.Box(-np.inf, np.inf, (39,), np.float32)})
    return Agent(space, 4, args), args


def test_actor_log_std_range():
    torch.manual_seed(0)
    agent, _ = tiny_agent()
    dist = agent.actor(torch.randn(10, 32) * 1000)  # extreme inputs saturate the squash
    log_std = dist.normal.scale.log()
    assert log_std.shape == (10, 7, 4) and log_std.min() >= -5 - 1e-5 and log_std.max() <= 2 + 1e-5


def test_policy_stats_tell_saturation_from_narrowing():
    """Pre-tanh mean 3 (saturated: tanh(3) = 0.995) with log sigma -1.5 (the squash's midpoint, -5 + 7 / 2): the
    diagnostics read |mu| 3 and log sigma -1.5 for the acting head alone, while -log pi of a squashed sample reads far
    lower than the Gaussian's own entropy (0.5 log(2 pi e) - 1.5 = -0.08 nats per dim) because of log(1 - tanh^2)."""
    agent, args = tiny_agent()
    G, A_ = len(args.gammas), 4
    with torch.no_grad():
        agent.actor.mlp[-1].weight.zero_()
        bias = torch.zeros(G, 2, A_)
        bias[:, 0] = 0.5  # every other head: |mu| 0.5
        bias[agent.rollout_gamma, 0] = torch.tensor([3.0, -3.0, 3.0, -3.0])  # log-std pre-squash 0 -> log sigma -1.5
        agent.actor.mlp[-1].bias.copy_(bias.flatten())
    pi = agent.actor(torch.randn(64, 32))
    stats = policy_stats(pi, agent.rollout_gamma)
    torch.testing.assert_close(stats["losses/policy_abs_mu_acting"], torch.full((64,), 3.0))
    torch.testing.assert_close(stats["losses/policy_log_sigma_acting"], torch.full((64,), -1.5))
    torch.manual_seed(0)
    minus_log_pi = -pi.log_prob(pi.sample())[:, agent.rollout_gamma].mean() / A_  # per action dim
    assert minus_log_pi < 0.5 * np.log(2 * np.pi * np.e) - 1.5 - 3.0  # saturation reads as a much narrower policy


@pytest.mark.parametrize("critic_loss", ["ind", "dep"])
def test_dpg_actor_loss_trains_actor_not_critics(critic_loss):
    """CRUCIAL: -Q(h, a ~ pi) reaches the actor (and the Transformer through it) but never the critic weights."""
    torch.manual_seed(0)
    agent, args = tiny_agent(critic_loss)
    B, L = 2, 5
    batch = {
        "obs": torch.randn(B, L, 39),
        "prev_action": torch.rand(B, L, 4) * 2 - 1,
        "prev_reward": torch.rand(B, L),
        "reset": torch.zeros(B, L),
        "time": torch.arange(L).expand(B, L),
    }
    h = agent.states(batch).reshape(B * L, -1)
    loss = dpg_actor_loss(agent, h, agent.actor(h))
    assert loss.shape == (B * L, len(args.gammas))
    loss.mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in agent.critics.parameters())
    assert all(p.grad is not None and p.grad.any() for p in agent.actor.parameters())
    assert agent.transformer.inp.weight.grad is not None and agent.transformer.inp.weight.grad.any()


def test_explore_noise_decays_within_the_rollout_and_clips():
    args = Args(k_episodes=3, episode_length=500)
    space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
    rng = np.random.default_rng(0)
    E = 20_000
    actions = np.zeros((E, 4), np.float32)
    for t, expected_std in [(0, 0.3), (750, 0.3 + (0.05 - 0.3) * 0.5), (1499, 0.3 + (0.05 - 0.3) * 1499 / 1500)]:
        out = explore(actions, np.full(E, 0.3), space, rng, np.full(E, t), np.full(E, 0.05), args)
        assert out.dtype == np.float32 and out.shape == (E, 4)
        assert out.std() == pytest.approx(expected_std, rel=0.03)
    out = explore(np.full((E, 4), 0.9, np.float32), np.ones(E), space, rng, np.zeros(E), np.ones(E), args)
    assert out.max() == 1.0 and out.min() >= -1.0  # clipped to the action box
    zero = np.zeros(E)
    np.testing.assert_array_equal(explore(actions, zero, space, rng, zero, zero, args), actions)  # epsilon 0


def test_rollout_end_epsilon_anneals_from_its_own_start_to_the_floor():
    """Official library: the last step's noise starts at 0.8 and falls linearly to 0.01 over the anneal (per env)."""
    args = Args(num_envs=2, eps_anneal_steps=1000)
    assert rollout_end_epsilon(args, 0) == pytest.approx(0.8)
    assert rollout_end_epsilon(args, 2 * 250) == pytest.approx(0.8 - 0.79 / 4)  # 250 steps per env
    assert rollout_end_epsilon(args, 2 * 1000) == pytest.approx(0.01)
    assert rollout_end_epsilon(args, 2 * 5000) == pytest.approx(0.01)


@pytest.mark.parametrize("flag", ["eps_rollout_end", "eps_rollout_floor"])
def test_rollout_noise_out_of_range_is_refused(flag, capsys):
    import amago2_metaworld as M

    with pytest.raises(SystemExit) as exit_info:
        M.resolve_args(M.Args(**{flag: 1.5}))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: --{flag.replace('_', '-')} 1.5 is out of range: it must be in [0, 1]\n"
