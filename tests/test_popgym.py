"""amago2_popgym.py: the one-shot env protocol and numerical checks of the shared core."""

import copy
import os
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from token_history import TokenHistory

import amago2_popgym as A


def tiny_args(**kw) -> A.Args:
    base = dict(
        tasks=["RepeatPreviousEasy", "MineSweeperEasy"],
        d_model=32,
        d_ff=64,
        n_layers=2,
        n_heads=4,
        d_token=24,
        context_len=16,
        batch_size=4,
        num_bins=16,
        head_hidden=32,
        num_envs=2,
        buffer_size=2000,
        dropout=0.0,
    )
    base.update(kw)
    return A.Args(**base)


# ---- environment ----
def test_padding_and_action_space():
    env = A.POPGymMetaEnv(A.POPGYM_TASKS)
    obs, _ = env.reset(seed=0)
    assert obs["obs"].shape == (27,) and obs["obs"].dtype == np.float32
    # installed popgym: CountRecallEasy answers counts 0..26, so 27 actions keep every answer reachable
    assert env.action_space.n == max(A.num_actions(e.action_space) for e in env.envs.values()) == 27
    for name, e in env.envs.items():
        assert gym.spaces.flatdim(e.observation_space) <= A.OBS_PAD, name
    env = A.POPGymMetaEnv(["CountRecallHard"], task="CountRecallHard")
    obs, _ = env.reset(seed=0)
    assert obs["obs"][:26].sum() == 2 and obs["obs"][-1] == 1  # two one-hot parts of 13, padded; valid flag


def test_invalid_action_is_replaced_and_flagged():
    env = A.POPGymMetaEnv(["RepeatPreviousEasy"])
    env.reset(seed=0)
    obs, *_ = env.step(25)  # RepeatPreviousEasy has 4 actions
    assert obs["obs"][-1] == 0.0
    obs, *_ = env.step(1)
    assert obs["obs"][-1] == 1.0


def test_one_shot_protocol():
    env = A.POPGymMetaEnv(["RepeatFirstEasy"], one_shot=True)
    obs, _ = env.reset(seed=3)
    step, episode_one_rewards, boundary = 0, [], None
    while True:
        obs, reward, terminated, truncated, info = env.step(0)
        step += 1
        if boundary is None:
            episode_one_rewards.append((reward, info["prev_reward"]))
        if info["new_episode"]:
            assert boundary is None and not (terminated or truncated)  # the inner episode end is not a terminal
            boundary = step
        if terminated or truncated:
            break
    # episode 1: the policy sees the real reward, the learner gets 0
    assert all(r == 0.0 for r, _ in episode_one_rewards)
    assert any(p != 0.0 for _, p in episode_one_rewards)
    assert boundary == 51 and step == 102  # RepeatFirstEasy: 51 steps per episode, two episodes
    assert terminated and not truncated
    assert set(info["metrics"]) == {"return", "explore_return"} and info["task"] == "RepeatFirstEasy"


@pytest.mark.parametrize("one_shot", [True, False])
def test_protocol_end_is_a_terminal_even_on_a_time_limit(one_shot):
    """MultiarmedBanditEasy ends every episode by its 200-step time limit (truncated); the end of the protocol is a
    terminal all the same (official library: done), so the critic never bootstraps past the scored episode."""
    env = A.POPGymMetaEnv(["MultiarmedBanditEasy"], one_shot=one_shot)
    env.reset(seed=0)
    flags = []
    while not (flags and any(flags[-1])):
        _, _, terminated, truncated, info = env.step(0)
        flags.append((terminated, truncated))
    assert len(flags) == (400 if one_shot else 200) and flags[-1] == (True, False)


def test_new_variant_for_episode_two():
    env = A.POPGymMetaEnv(["RepeatFirstEasy"])
    firsts = []
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        firsts.append(obs["obs"][:4].argmax())
        while True:
            obs, _, term, trunc, info = env.step(0)
            if info["new_episode"]:
                firsts.append(obs["obs"][:4].argmax())
            if term or trunc:
                break
    assert len(set(firsts)) > 1  # the card to repeat is re-drawn


def test_standard_protocol_learns_from_the_only_episode():
    env = A.POPGymMetaEnv(["RepeatPreviousEasy"], one_shot=False)
    env.reset(seed=0)
    rewards, done = [], False
    while not done:
        _, r, term, trunc, info = env.step(0)
        assert not info["new_episode"] and r == info["prev_reward"]
        rewards.append(r)
        done = term or trunc
    assert term and not trunc  # the only episode's end is the protocol's end: a terminal
    assert info["metrics"]["return"] == pytest.approx(sum(rewards)) and "explore_return" not in info["metrics"]


# ---- model ----
def test_popart_preserves_outputs():
    torch.manual_seed(0)
    popart = A.PopArt(3, beta=0.3)
    x = torch.randn(10, 3)
    before = popart.denormalized(x)
    for _ in range(3):
        popart.update(torch.randn(50, 3) * 40 + 7)
        assert torch.allclose(popart.denormalized(x), before, atol=1e-4)
    assert not torch.allclose(popart.mu, torch.zeros(3))


def test_popart_statistics_bias_corrected():
    popart = A.PopArt(1, beta=5e-4)
    # the official library's counter starts at 1: the first update has t = 2, beta_t = beta / (1 - (1 - beta)^2)
    # = 1 / (2 - beta) ~ 0.5, so the prior (mu 0, nu 100) is averaged with the batch, not discarded
    popart.update(torch.full((8, 1), 3.0))
    beta_t = 1 / (2 - 5e-4)
    assert popart.mu.item() == pytest.approx(3.0 * beta_t, rel=1e-3)  # float32 statistics
    assert popart.nu.item() == pytest.approx(100.0 + beta_t * (9.0 - 100.0), rel=1e-3)


def make_agent(**kw):
    args = tiny_args(**kw)
    env = A.POPGymMetaEnv(args.tasks)
    return A.Agent(env.observation_space, env.action_space.n, args), args


def random_tokens(B, L, d):
    torch.manual_seed(1)
    return torch.randn(B, L, d), torch.arange(L).repeat(B, 1) + torch.randint(0, 50, (B, 1))


def test_kv_cache_equals_full_forward():
    agent, args = make_agent()
    tr = agent.transformer.eval()
    tokens, t = random_tokens(3, args.context_len, args.d_token)
    full = tr(tokens, t)
    cache = A.KVCache(tr, 3, args.context_len, "cpu")
    stepped = torch.stack([tr(tokens[:, i : i + 1], t[:, i : i + 1], cache)[:, 0] for i in range(args.context_len)], 1)
    assert torch.allclose(stepped, full, atol=1e-4)


def test_kv_cache_per_env_lengths_and_reset():
    """Env 1 starts a new meta-rollout half way: its outputs must equal a fresh full pass over its new tokens."""
    agent, args = make_agent()
    tr = agent.transformer.eval()
    tokens, t = random_tokens(2, 12, args.d_token)
    cache = A.KVCache(tr, 2, args.context_len, "cpu")
    outs = []
    for i in range(12):
        if i == 5:
            cache.length[1] = 0  # env 1 starts a new meta-rollout: its cache is emptied
        outs.append(tr(tokens[:, i : i + 1], t[:, i : i + 1], cache)[:, 0])
    outs = torch.stack(outs, 1)
    assert torch.allclose(outs[0], tr(tokens[:1], t[:1])[0], atol=1e-4)
    assert torch.allclose(outs[1, 5:], tr(tokens[1:, 5:], t[1:, 5:])[0], atol=1e-4)


def test_sliding_window_past_context_matches_token_history():
    """Past l tokens the cache keeps the last l keys; full recompute over the last l tokens (TokenHistory, the tests'
    reference) is the other inference mode."""
    agent, args = make_agent(context_len=6)
    tr = agent.transformer.eval()
    tokens, t = random_tokens(2, 10, args.d_token)
    history = TokenHistory(2, 6, args.d_token, "cpu")
    cache = A.KVCache(tr, 2, 6, "cpu")
    for i in range(10):
        h_full = history(tr, tokens[:, i : i + 1], t[:, i : i + 1])
        h_kv = tr(tokens[:, i : i + 1], t[:, i : i + 1], cache)[:, 0]
        lo = max(0, i - 5)
        assert torch.allclose(h_full, tr(tokens[:, lo : i + 1], t[:, lo : i + 1])[:, -1], atol=1e-4)
        if i < 6:
            assert torch.allclose(h_kv, h_full, atol=1e-4)


@pytest.mark.parametrize("d_in,d_out", [(64, 256), (256, 64), (768, 3072)])
def test_sigma_reparam_sigma_is_the_spectral_norm_from_construction(d_in, d_out):
    """Rollouts run in eval mode from the first step: sigma must already be the weight's spectral norm (random u, v
    gave 0.015-0.087 of either sign against norms of 0.86-1.7)."""
    torch.manual_seed(0)
    layer = A.SigmaReparamLinear(d_in, d_out).eval()
    sigma = layer.u @ layer.weight @ layer.v
    assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(layer.weight, ord=2).item(), rel=0.05)
    x = torch.randn(5, d_in)
    torch.testing.assert_close(layer(x), x @ layer.weight.T / sigma + layer.bias)  # gain 1 at init


def test_sigma_reparam_power_iteration_only_in_training():
    layer = A.SigmaReparamLinear(8, 5)
    layer.u.copy_(torch.nn.functional.normalize(torch.randn(5), dim=0))  # an estimate away from the converged one
    u = layer.u.clone()
    layer.eval()(torch.randn(3, 8))
    assert torch.equal(layer.u, u)
    layer.train()
    for _ in range(50):
        layer(torch.randn(3, 8))
    assert not torch.equal(layer.u, u)
    sigma = layer.u @ layer.weight @ layer.v
    assert sigma.item() == pytest.approx(torch.linalg.matrix_norm(layer.weight, ord=2).item(), rel=1e-3)


def test_critic_ensemble_matches_concatenated_input_mlp():
    """The split first layer equals running each critic on concat([h, gamma feature, action])."""
    torch.manual_seed(0)
    gammas = torch.tensor([0.9, 0.99])
    ens = A.CriticEnsemble(6, 3, gammas, 8, 5, 2)
    h, a = torch.randn(4, 6), A.action_features(torch.randint(0, 3, (4, 2, 2)), 3)
    out = ens(h, a)  # (N, K, G, C, out)
    for c in range(2):
        w1 = torch.cat([ens.w_state[c], ens.w_gamma[c], ens.w_action[c]], 0)
        for g in range(2):
            x = torch.cat([h[:, None].expand(4, 2, 6), ens.gamma_feature[g].expand(4, 2, 1), a[:, :, g]], -1)
            y = torch.nn.functional.leaky_relu(x @ w1 + ens.b1[c])
            y = torch.nn.functional.leaky_relu(y @ ens.w2[c] + ens.b2[c]) @ ens.w3[c] + ens.b3[c]
            assert torch.allclose(out[:, :, g, c], y, atol=1e-4)


def random_batch(agent, args, B=3):
    L = args.context_len + 1
    torch.manual_seed(2)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 9:] = False
    prev_action = torch.randint(0, agent.action_dim, (B, L))
    prev_action[0, 9] = A.NO_ACTION  # padding: the next rollout's first timestep
    return {
        "obs": torch.randn(B, L, 27),
        "prev_action": prev_action,
        "prev_reward": torch.randn(B, L),
        "reset": torch.zeros(B, L),
        "time": torch.arange(L).repeat(B, 1),
        "reward": torch.randn(B, L),
        "terminal": torch.zeros(B, L, dtype=torch.bool),
        "mask": mask,
    }


@pytest.mark.parametrize("actor_loss,critic_loss", [("ind", "ind"), ("dep", "ind"), ("ind", "dep"), ("dep", "dep")])
def test_actor_gradients_leave_critics_unchanged(actor_loss, critic_loss):
    agent, args = make_agent(actor_loss=actor_loss, critic_loss=critic_loss, critic_weight=0.0)
    loss, _ = A.compute_losses(agent, random_batch(agent, args), args)
    loss.backward()
    for name, p in agent.critics.named_parameters():
        assert p.grad is None or p.grad.abs().max() == 0, name
    assert agent.actor.mlp[0].weight.grad.abs().max() > 0
    assert agent.transformer.inp.weight.grad.abs().max() > 0  # the actor trains the Transformer through its head


def test_critic_loss_trains_critics_and_transformer():
    agent, args = make_agent()
    loss, metrics = A.compute_losses(agent, random_batch(agent, args), args)
    loss.backward()
    assert agent.critics.w2.grad.abs().max() > 0 and agent.transformer.inp.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in agent.target_critics.parameters())
    assert 0.0 <= metrics["losses/crr_kept_fraction"].item() <= 1.0


def test_diagnostics_entropy_of_a_uniform_policy_and_q_of_constant_critics():
    """policy_entropy is log A for a uniform policy (every sample has -log pi = log A); q_mean is the critics' value."""
    agent, args = make_agent(critic_loss="dep")
    with torch.no_grad():
        agent.actor.mlp[-1].weight.zero_()
        agent.actor.mlp[-1].bias.zero_()  # equal logits: uniform over the A actions
        agent.critics.w3.zero_()
        agent.critics.b3.fill_(0.5)  # every critic outputs 0.5 (normalised); PopArt starts at mu 0, sigma 10
    _, metrics = A.compute_losses(agent, random_batch(agent, args), args)
    assert metrics["losses/policy_entropy"].item() == pytest.approx(np.log(agent.action_dim), abs=1e-5)
    assert metrics["losses/policy_entropy_acting"].item() == pytest.approx(np.log(agent.action_dim), abs=1e-5)
    # Q = sigma * (w x + b) + mu = 10 * 0.5 + 0, and the update inside compute_losses preserves that output
    assert metrics["losses/q_mean"].item() == pytest.approx(5.0, abs=1e-4)


def test_grad_norms_of_the_two_losses_apart_sum_to_the_joint_gradient():
    """grad_norms gives each loss's gradient norm as its own backward would, leaves .grad untouched, and the update's
    joint gradient (what clip_grad_norm_ sees) is their sum: |g_a + g_c| <= |g_a| + |g_c|, equal to the norm of the sum."""
    agent, args = make_agent()
    batch = random_batch(agent, args)
    params = [p for p in agent.parameters() if p.requires_grad]

    def norm_of_grads():
        return torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm()

    grads, start = {}, copy.deepcopy(agent.state_dict())  # each pass updates PopArt, input and sigma-reparam statistics
    for name in ("actor", "critic"):
        agent.load_state_dict(start)
        torch.manual_seed(5)  # the same CRR and target-critic draws for every pass
        loss, metrics = A.compute_losses(agent, batch, args)
        weighted = {"actor": metrics["losses/actor"], "critic": args.critic_weight * metrics["losses/critic"]}
        agent.zero_grad(set_to_none=True)
        weighted[name].backward()
        grads[name] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        assert norm_of_grads() > 0
        grads[name + " norm"] = norm_of_grads()
    agent.load_state_dict(start)
    torch.manual_seed(5)
    loss, metrics = A.compute_losses(agent, batch, args)
    agent.zero_grad(set_to_none=True)
    norms = A.grad_norms(agent, metrics["losses/actor"], args.critic_weight * metrics["losses/critic"])
    assert all(p.grad is None for p in params)  # a diagnostic: nothing accumulates
    torch.testing.assert_close(norms["losses/grad_norm_actor"], grads["actor norm"])
    torch.testing.assert_close(norms["losses/grad_norm_critic"], grads["critic norm"])
    loss.backward()  # the graph survived both diagnostic passes
    joint = torch.stack([(a + c).norm() for a, c in zip(grads["actor"], grads["critic"])]).norm()
    torch.testing.assert_close(torch.nn.utils.clip_grad_norm_(params, 1.0), joint)


def test_discrete_policy_stats_max_prob_of_a_uniform_head():
    agent, args = make_agent()
    with torch.no_grad():
        agent.actor.mlp[-1].weight.zero_()
        agent.actor.mlp[-1].bias.zero_()
    _, metrics = A.compute_losses(agent, random_batch(agent, args), args)
    assert metrics["losses/policy_max_prob_acting"].item() == pytest.approx(1 / agent.action_dim, abs=1e-6)


def test_acting_entropy_is_the_rollout_gammas_own():
    """Only the rollout gamma's head is uniform (log A nats); the other heads are near-deterministic (the clamp's floor)."""
    agent, args = make_agent()
    G, A_ = len(args.gammas), agent.action_dim
    with torch.no_grad():
        agent.actor.mlp[-1].weight.zero_()
        logits = torch.zeros(G, A_)
        logits[:, 0] = 50.0
        logits[agent.rollout_gamma] = 0.0
        agent.actor.mlp[-1].bias.copy_(logits.flatten())
    _, metrics = A.compute_losses(agent, random_batch(agent, args), args)
    assert metrics["losses/policy_entropy_acting"].item() == pytest.approx(np.log(A_), abs=1e-5)
    assert metrics["losses/policy_entropy"].item() < 0.5 * np.log(A_)


def test_td_target_bootstraps_across_everything_but_termination():
    agent, args = make_agent()
    h = torch.randn(4, args.d_model)
    reward, done = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    y = A.td_target(agent, h, reward, done, args)  # (N, G)
    assert torch.allclose(y[1], torch.full_like(y[1], args.reward_multiplier))  # terminal: no bootstrap
    assert torch.allclose(y[3], torch.zeros_like(y[3]))
    assert not torch.allclose(y[0], torch.full_like(y[0], args.reward_multiplier))


def test_masked_steps_do_not_change_the_loss():
    agent, args = make_agent()
    batch = random_batch(agent, args)
    torch.manual_seed(5)
    loss1, _ = A.compute_losses(copy.deepcopy(agent), batch, args)  # copies: a training forward updates statistics
    batch["reward"][0, 9:] = 1e6  # padding past the end of env 0's rollout
    batch["obs"][0, 9:] = 1e3
    torch.manual_seed(5)
    loss2, _ = A.compute_losses(copy.deepcopy(agent), batch, args)
    assert torch.allclose(loss1, loss2)


def test_checkpoint_survives_a_crash_mid_write(tmp_path):
    agent, args = make_agent()
    opt = torch.optim.AdamW(agent.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    fields = {"obs": ((27,), np.float32), "reward": ((), np.float32)}
    buffer = A.ReplayBuffer(fields, 100, 2)
    rng = np.random.default_rng(0)
    A.save_checkpoint(str(tmp_path), agent, opt, sched, buffer, 10, 3, rng, args)
    saved = {k: v.clone() for k, v in agent.state_dict().items()}
    # a later save killed mid-write: a half-written buffer snapshot and state.pt.tmp, no rename yet
    os.makedirs(tmp_path / "checkpoint" / "rank0" / "buffer-20.tmp")
    (tmp_path / "checkpoint" / "state.pt.tmp").write_bytes(b"garbage")
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(1.0)
    assert A.load_checkpoint(str(tmp_path), agent, opt, sched, buffer, rng) == (10, 3)
    assert all(torch.equal(agent.state_dict()[k], v) for k, v in saved.items())


@pytest.mark.parametrize(
    "before, after, every, expected",
    [
        (0, 512, 1000, False),
        (512, 1024, 1000, True),
        (1000, 1512, 1000, False),
        (1512, 2000, 1000, True),
        (0, 5000, 1000, True),
        (5000, 5512, 0, False),
    ],
)
def test_crossed_a_multiple_of_every(before, after, every, expected):
    """Evaluations and checkpoints fire in the epoch that takes the step count past a multiple of N; 0 means never."""
    assert A.crossed(before, after, every) == expected


def test_chunked_no_grad_critic_equals_one_pass():
    torch.manual_seed(0)
    ens = A.CriticEnsemble(6, 3, torch.tensor([0.9, 0.99, 0.999]), 8, 5, 2)
    h, a = torch.randn(50, 6), A.action_features(torch.randint(0, 3, (50, 2, 3)), 3)
    whole = ens(h, a)  # grad enabled: one pass
    with torch.no_grad():
        chunked = ens(h, a, chunk_rows=12)  # 2 states per chunk
    assert torch.allclose(whole, chunked, atol=1e-6)


# ---- faithfulness fixes (issue 9): each test has a known answer ----
def test_dpg_with_twohot_critic_is_standardised_by_popart():
    """Eq. 2 for the ind critic: -min_c sum_a pi(a|h) (Q_c(h, a) - mu) / sigma, with the global PopArt statistics."""
    agent, args = make_agent(actor_loss="dep", critic_loss="ind")
    agent.popart.mu.fill_(300.0)
    agent.popart.nu.fill_(300.0**2 + 50.0**2)  # sigma = 50
    torch.manual_seed(0)
    h = torch.randn(5, args.d_model)
    dist = agent.actor(h)
    loss = A.dpg_actor_loss(agent, h, dist)  # (N, G)
    with torch.no_grad():
        per_action = []
        for a in range(agent.action_dim):
            q = agent.q_values(agent.critics, h, torch.full((5, 1, 1), a))[:, 0]  # (N, G, C), raw symexp values
            per_action.append((q - 300.0) / 50.0)
        expected = -(dist.probs[..., None] * torch.stack(per_action, -2)).sum(-2).min(-1).values  # (N, G, A, C)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_dpg_takes_the_ensemble_min_after_the_expectation(monkeypatch):
    """Two critics, two equally likely actions: Q_1 = (1, 0), Q_2 = (0, 1). The official library's min of the
    expectations is min(0.5, 0.5) = 0.5; the expectation of the per-action min would be 0."""
    agent, args = make_agent(actor_loss="dep", critic_loss="dep", num_critics=2)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (A, C) for actions 0 and 1
    monkeypatch.setattr(
        agent,
        "q_values",
        lambda critics, h, actions, standardized=False: q.expand(len(h), len(args.gammas), 2, 2).transpose(1, 2),
    )
    dist = torch.distributions.Categorical(probs=torch.tensor([0.5, 0.5]).expand(3, len(args.gammas), 2))
    torch.testing.assert_close(
        A.dpg_actor_loss(agent, torch.zeros(3, args.d_model), dist), torch.full((3, len(args.gammas)), -0.5)
    )


@pytest.mark.parametrize("threshold,kept", [(-1e-4, 1.0), (0.0, 0.0)])
def test_crr_threshold_decides_ties(threshold, kept):
    """Critics that value every action alike give A = 0 exactly: the paper-era -1e-4 keeps every buffer action, Eq. 4's
    strict A > 0 keeps none (the case of a two-hot critic that has not yet seen reward)."""
    agent, args = make_agent(crr_threshold=threshold)
    with torch.no_grad():
        agent.critics.w3.zero_()  # every critic outputs the same logits for every input
    _, metrics = A.compute_losses(agent, random_batch(agent, args), args)
    assert metrics["losses/crr_kept_fraction"].item() == kept
    assert metrics["losses/crr_kept_fraction_acting"].item() == kept


@pytest.mark.parametrize("critic_loss", ["ind", "dep"])
def test_popart_statistics_follow_td_targets_for_every_critic(critic_loss):
    agent, args = make_agent(critic_loss=critic_loss)
    batch = random_batch(agent, args)
    A.compute_losses(agent, batch, args)
    assert agent.popart.updates.item() == 2  # one update (the counter starts at 1)
    assert (agent.popart.mu != 0).all()  # moved half way towards the mean TD target of each gamma


def test_scalar_q_is_fp32_under_bf16_autocast():
    """The two-hot expectation under CPU bf16 autocast equals fp32 to 1e-3 relative for Q of 1e3-1e4."""
    agent, _ = make_agent(num_bins=64)
    torch.manual_seed(0)
    logits = torch.randn(200, 7, 4, 64)
    target_bin = torch.randint(50, 57, (200, 7, 4, 1))  # bins at symlog(Q) ~ 6.8-9.4: Q ~ 1e3-1e4
    logits.scatter_add_(-1, target_bin, torch.full((200, 7, 4, 1), 8.0))
    fp32 = agent.scalar_q(logits)
    assert 1e3 < fp32.median() < 2e4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = agent.scalar_q(logits.bfloat16())
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, agent.scalar_q(logits.bfloat16().float()), rtol=1e-3, atol=0)  # inputs rounded alike


@pytest.mark.parametrize("actor_loss,expected", [("ind", 2.5), ("dep", 1.875)])
def test_td_target_mean_or_clipped_min_of_two_random_critics(actor_loss, expected, monkeypatch):
    """Target critics worth 1, 2, 3, 4: the mean of 2 drawn with replacement averages 2.5 (ind actor); their min
    (clipped double-Q with the dep actor) averages 1 + (3/4)^2 + (2/4)^2 + (1/4)^2 = 1.875."""
    agent, args = make_agent(actor_loss=actor_loss)
    N, G = 20_000, len(args.gammas)
    monkeypatch.setattr(A, "next_state_values", lambda agent, h, actor_loss: torch.arange(1.0, 5.0).expand(N, G, 4))
    torch.manual_seed(0)
    y = A.td_target(agent, torch.zeros(N, args.d_model), torch.zeros(N), torch.zeros(N), args)
    q_bar = y / agent.gammas
    assert q_bar.mean().item() == pytest.approx(expected, abs=0.02)


def test_dep_actor_backs_up_the_expectation_over_the_target_policy():
    """Discrete dep actor (official library's DPG agent): sum_a pi'(a|h') Q_c(h', a), no sampled a'."""
    agent, args = make_agent(actor_loss="dep")
    torch.manual_seed(0)
    h = torch.randn(6, args.d_model)
    with torch.no_grad():
        v = A.next_state_values(agent, h, "dep")  # (N, G, C)
        probs = agent.target_actor(h).probs  # (N, G, A)
        q = torch.stack(
            [agent.q_values(agent.target_critics, h, torch.full((6, 1, 1), a))[:, 0] for a in range(agent.action_dim)], -1
        )  # (N, G, C, A)
    torch.testing.assert_close(v, (q * probs[:, :, None]).sum(-1), rtol=1e-5, atol=1e-5)


def test_checkpoint_keeps_the_cuda_rng(tmp_path, monkeypatch):
    """A GPU run saves and restores the CUDA generators too (faked here: this machine has no GPU)."""
    agent, args = make_agent()
    opt = torch.optim.AdamW(agent.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    buffer = A.ReplayBuffer({"reward": ((), np.float32)}, 100, 2)
    rng = np.random.default_rng(0)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([7], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    A.save_checkpoint(str(tmp_path), agent, opt, sched, buffer, 1, 0, rng, args)
    A.load_checkpoint(str(tmp_path), agent, opt, sched, buffer, rng)
    assert len(restored) == 1 and restored[0][0].tolist() == [7]


def test_transformer_layer_as_the_official_library():
    """qkv without bias; dropout only on the feed-forward output (none on the attention residual, none inside FF)."""
    layer = A.TransformerLayer(16, 4, 32, dropout=0.5).train()
    assert layer.qkv.bias is None and layer.attn_out.bias is not None
    seen = {}
    layer.ff2.register_forward_hook(lambda m, inp, out: seen.setdefault("ff2", out))
    layer.dropout.register_forward_hook(lambda m, inp, out: seen.setdefault("dropout_inputs", []).append(inp[0]))
    layer(torch.randn(2, 5, 16))
    assert len(seen["dropout_inputs"]) == 1 and seen["dropout_inputs"][0] is seen["ff2"]


def test_reward_scale_reaches_the_learner_and_the_policy_not_the_metrics():
    plain = A.POPGymMetaEnv(["RepeatFirstEasy"], one_shot=False)
    scaled = A.POPGymMetaEnv(["RepeatFirstEasy"], one_shot=False, reward_scales={"RepeatFirstEasy": 100.0})
    plain.reset(seed=4)
    scaled.reset(seed=4)
    for _ in range(51):
        _, r1, *_, info1 = plain.step(1)
        _, r2, *_, info2 = scaled.step(1)
        assert r2 == pytest.approx(100 * r1) and info2["prev_reward"] == pytest.approx(100 * info1["prev_reward"])
    assert info2["metrics"]["return"] == pytest.approx(info1["metrics"]["return"])  # reported on the default scale


def test_progress_eta_counts_the_update_phases():
    """SPS = steps / (collection + update seconds); the ETA is tqdm's at the run's average rate (smoothing 0), so the
    update phases and evaluations are in it: 1,000 of 10,000 steps in 7 s of wall time leave 63 s."""
    args = tiny_args(total_timesteps=10_000, num_envs=10, steps_per_epoch=100, updates_per_epoch=50, log_every=60.0)
    progress = A.Progress(args, global_step=0, updates=0)
    progress.collect(1000, seconds=2.0)  # one epoch: 1000 steps at 500 steps/s ...
    for _ in range(50):
        progress.update(seconds=0.1)  # ... then its 50 updates at 10/s
    assert progress.sps() == pytest.approx(1000 / 7.0) and progress.updates == 50
    line = A.tqdm.format_meter(**{**progress.bar.format_dict, "elapsed": 7.0})
    assert "1,000/10,000 steps [00:07<01:03, 50 updates, 143 SPS" in line
    progress.bar.close()


def test_cpu_notice_for_a_paper_width_model():
    """A paper-width model on CPU gets one line: a GPU job, and the way to the CPU demo. A cut-down model gets none."""
    assert A.cpu_notice(tiny_args(), torch.device("cpu")) is None  # d_model 32 < the paper's 256
    notice = A.cpu_notice(A.Args(), torch.device("cpu"))
    assert notice.startswith("note: a paper-size model on CPU") and "README.md#quick-start" in notice and "\n" not in notice
    assert A.cpu_notice(A.Args(), torch.device("cuda")) is None  # GPUs need no warning


def test_trimmed_padding_gives_the_same_losses():
    """Trailing padding is dead weight: the losses of a window equal those of the window cut at its last real step
    (one window, the sampling-free dep/dep update, no dropout, so both draw the same random critics)."""
    agent, args = make_agent(actor_loss="dep", critic_loss="dep", dropout=0.0)
    batch = {k: v[:1] for k, v in random_batch(agent, args).items()}  # window 0: real up to column 8 of 17
    trimmed = A.trim_padding({k: v.numpy() for k, v in batch.items()})
    assert trimmed["mask"].shape == (1, 9)
    torch.manual_seed(3)
    loss, metrics = A.compute_losses(copy.deepcopy(agent), batch, args)
    torch.manual_seed(3)
    loss_t, metrics_t = A.compute_losses(copy.deepcopy(agent), {k: torch.as_tensor(v) for k, v in trimmed.items()}, args)
    torch.testing.assert_close(loss_t, loss, rtol=1e-5, atol=1e-6)
    for k in metrics:
        if not k.startswith("losses/policy_entropy"):  # sampled estimates: their draws depend on the batch length
            torch.testing.assert_close(metrics_t[k], metrics[k], rtol=1e-5, atol=1e-6)


def test_critic_pre_activation_stays_bf16_under_autocast(monkeypatch):
    """The (C, N, K, G, H) pre-activation, the update's largest tensor, is bf16 under bf16 autocast (an fp32 bias
    once promoted it back to fp32) and fp32 without autocast."""
    torch.manual_seed(0)
    ens = A.CriticEnsemble(8, 3, torch.tensor([0.9, 0.99]), 16, 5, 2)
    h, a = torch.randn(6, 8), A.action_features(torch.randint(0, 3, (6, 2, 2)), 3)
    seen = []
    leaky_relu = torch.nn.functional.leaky_relu
    monkeypatch.setattr(A.F, "leaky_relu", lambda x, *args, **kw: seen.append(x.dtype) or leaky_relu(x, *args, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ens(h, a)
    ens(h, a)
    assert seen == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]


def test_monte_carlo_returns_known_answer():
    """gamma 0.5: rewards 1, 2, 3 give 1 + 0.5 * 2 + 0.25 * 3 = 2.75, 2 + 1.5 = 3.5, 3; padding counts nothing."""
    reward = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    torch.testing.assert_close(A.monte_carlo_returns(reward, valid, 0.5), torch.tensor([[2.75, 3.5, 3.0], [2.0, 2.0, 0.0]]))
    torch.testing.assert_close(A.monte_carlo_returns(reward, valid, 1.0), torch.tensor([[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]]))


def test_q_against_monte_carlo_only_where_the_rollout_ends_in_the_window():
    agent, args = make_agent(critic_loss="dep")
    with torch.no_grad():
        agent.critics.w3.zero_()
        agent.critics.b3.fill_(0.5)  # Q = 5 everywhere (PopArt sigma 10), preserved through the update's PopArt step
    batch = random_batch(agent, args)
    _, metrics = A.compute_losses(agent, batch, args)
    assert "losses/q_minus_mc" not in metrics  # no window reaches a terminal: no fully observed return
    batch["terminal"][0, 8] = True  # window 0's rollout ends at its last real timestep (its row 8)
    _, metrics = A.compute_losses(agent, batch, args)
    r = args.reward_multiplier * batch["reward"][0, 1:9]  # transitions 0..7 of window 0
    mc = [sum(args.rollout_gamma**j * r[t + j].item() for j in range(8 - t)) for t in range(8)]
    assert metrics["losses/mc_return"].item() == pytest.approx(np.mean(mc), rel=1e-4)
    assert metrics["losses/q_minus_mc"].item() == pytest.approx(5.0 - np.mean(mc), rel=1e-4, abs=1e-3)


def test_cpu_notice_says_bf16_is_slow_without_avx512(monkeypatch):
    args = tiny_args(precision="bf16")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "bf16 matmuls" in A.cpu_notice(args, torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert A.cpu_notice(args, torch.device("cpu")) is None  # a cut-down model on a CPU with bf16 units


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_critics_match_eager():
    """--compile: the torch.compile'd critic ensemble gives the eager outputs and gradients (to float tolerance)."""
    agent, args = make_agent()
    compiled = copy.deepcopy(agent)
    compiled.critics.compile(dynamic=True)
    torch.manual_seed(0)
    h = torch.randn(7, args.d_model)
    actions = torch.randint(0, agent.action_dim, (7, 3, len(args.gammas)))
    for length in (7, 5):  # two batch sizes: trimmed batches vary in length
        feats = A.action_features(actions[:length], agent.action_dim)
        eager, out = agent.critics(h[:length], feats), compiled.critics(h[:length], feats)
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    eager.sum().backward()
    out.sum().backward()
    for (name, p), q in zip(agent.critics.named_parameters(), compiled.critics.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("cuda_present", [False, True])  # --device cpu compiles for the CPU even beside a GPU
def test_compile_without_a_compiler_is_refused(cuda_present, monkeypatch, capsys):
    monkeypatch.setattr(A.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)
    with pytest.raises(SystemExit) as exit_info:
        A.resolve_args(A.Args(compile=True, device="cpu"))
    assert exit_info.value.code == 2 and "--compile on a CPU needs a C++ compiler" in capsys.readouterr().err
