"""amago2_popgym.py: the one-shot env protocol and numerical checks of the shared core."""
import copy
import os

import numpy as np
import pytest
import torch

import amago2_popgym as A


def tiny_args(**kw) -> A.Args:
    base = dict(tasks=["RepeatPreviousEasy", "MineSweeperEasy"], d_model=32, d_ff=64, n_layers=2, n_heads=4, d_token=24,
                context_len=16, batch_size=4, num_bins=16, head_hidden=32, num_envs=2, buffer_size=2000, dropout=0.0)
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
        assert A.flat_size(e.observation_space) <= A.OBS_PAD, name
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
            episode_one_rewards.append((reward, info["policy_reward"]))
        if info["new_episode"]:
            assert boundary is None and not (terminated or truncated)  # the inner episode end is not a terminal
            boundary = step
        if terminated or truncated:
            break
    # episode 1: the policy sees the real reward, the learner gets 0
    assert all(r == 0.0 for r, _ in episode_one_rewards)
    assert any(p != 0.0 for _, p in episode_one_rewards)
    assert boundary == 51 and step == 102  # RepeatFirstEasy: 51 steps per episode, two episodes
    assert set(info["metrics"]) == {"return", "explore_return"} and info["task"] == "RepeatFirstEasy"


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
        assert not info["new_episode"] and r == info["policy_reward"]
        rewards.append(r)
        done = term or trunc
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
    popart.update(torch.full((8, 1), 3.0))  # first update: beta_1 = 1, statistics jump to the batch
    assert popart.mu.item() == pytest.approx(3.0, rel=1e-3) and popart.nu.item() == pytest.approx(9.0, rel=1e-3)  # float32


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
    stepped = torch.stack([cache(tr, tokens[:, i : i + 1], t[:, i : i + 1]) for i in range(args.context_len)], 1)
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
            cache.reset(torch.tensor([1]))
        outs.append(cache(tr, tokens[:, i : i + 1], t[:, i : i + 1]))
    outs = torch.stack(outs, 1)
    assert torch.allclose(outs[0], tr(tokens[:1], t[:1])[0], atol=1e-4)
    assert torch.allclose(outs[1, 5:], tr(tokens[1:, 5:], t[1:, 5:])[0], atol=1e-4)


def test_sliding_window_past_context_matches_token_history():
    """Past l tokens the cache keeps the last l keys; full recompute over the last l tokens is the other inference mode."""
    agent, args = make_agent(context_len=6)
    tr = agent.transformer.eval()
    tokens, t = random_tokens(2, 10, args.d_token)
    history = A.TokenHistory(2, 6, args.d_token, "cpu")
    cache = A.KVCache(tr, 2, 6, "cpu")
    for i in range(10):
        h_full = history(tr, tokens[:, i : i + 1], t[:, i : i + 1])
        h_kv = cache(tr, tokens[:, i : i + 1], t[:, i : i + 1])
        lo = max(0, i - 5)
        assert torch.allclose(h_full, tr(tokens[:, lo : i + 1], t[:, lo : i + 1])[:, -1], atol=1e-4)
        if i < 6:
            assert torch.allclose(h_kv, h_full, atol=1e-4)


def test_sigma_reparam_power_iteration_only_in_training():
    layer = A.SigmaReparamLinear(8, 5)
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
    return {"obs": torch.randn(B, L, 27), "prev_action": prev_action,
            "prev_reward": torch.randn(B, L), "reset": torch.zeros(B, L), "time": torch.arange(L).repeat(B, 1),
            "reward": torch.randn(B, L), "terminal": torch.zeros(B, L, dtype=torch.bool), "mask": mask}


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
    counters = {"global_step": 10, "updates": 3, "next_eval": 0, "next_checkpoint": 0}
    A.save_checkpoint(str(tmp_path), agent, opt, sched, buffer, counters, rng, args)
    saved = {k: v.clone() for k, v in agent.state_dict().items()}
    # a later save killed mid-write: a half-written buffer snapshot and state.pt.tmp, no rename yet
    os.makedirs(tmp_path / "checkpoint" / "buffer-20.tmp")
    (tmp_path / "checkpoint" / "state.pt.tmp").write_bytes(b"garbage")
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(1.0)
    loaded = A.load_checkpoint(str(tmp_path), agent, opt, sched, buffer, rng)
    assert loaded["global_step"] == 10
    assert all(torch.equal(agent.state_dict()[k], v) for k, v in saved.items())


def test_chunked_no_grad_critic_equals_one_pass():
    torch.manual_seed(0)
    ens = A.CriticEnsemble(6, 3, torch.tensor([0.9, 0.99, 0.999]), 8, 5, 2)
    h, a = torch.randn(50, 6), A.action_features(torch.randint(0, 3, (50, 2, 3)), 3)
    whole = ens(h, a)  # grad enabled: one pass
    with torch.no_grad():
        chunked = ens(h, a, chunk_rows=12)  # 2 states per chunk
    assert torch.allclose(whole, chunked, atol=1e-6)
