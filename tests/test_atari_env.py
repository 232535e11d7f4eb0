"""Atari wrapper, pixel timestep encoder and DrQ-v2 shift of amago2_atari.py (fast, CPU only)."""

import os
import sys
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import amago2_atari as atari  # noqa: E402


def make_args(**kw):
    args = dict(seed=3, games=list(atari.GAMES), clip_rewards=False, capture_video=False, run_name="test", eval_only=False)
    args.update(kw)
    return SimpleNamespace(**args)


def play(env, n_steps, seed=0):
    """Random play from a fixed action sequence; returns the list of (reward, info) per step."""
    rng = np.random.default_rng(seed)
    env.reset()
    out = []
    for _ in range(n_steps):
        _, r, term, trunc, info = env.step(rng.integers(18))
        out.append((r, info))
        if term or trunc:
            break
    return out


# ---------------------------------------------------------------- env wrapper


def test_obs_and_action_spaces():
    env = atari.AtariEnv("Pong", seed=0)
    assert env.action_space == gym.spaces.Discrete(18)
    assert env.observation_space["image"].shape == (84, 84, 3)
    obs, info = env.reset()
    assert set(obs) == {"image"}
    assert obs["image"].shape == (84, 84, 3) and obs["image"].dtype == np.uint8
    assert env.observation_space.contains(obs)
    obs, r, term, trunc, info = env.step(0)
    assert obs["image"].shape == (84, 84, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 0  # a real frame, not a blank one
    assert info["new_episode"] is False and "metrics" not in info and "task" not in info
    assert isinstance(r, float) and r == info["prev_reward"]


def test_v5_settings():
    env = atari.AtariEnv("Breakout", seed=0)
    ale = env.ale.unwrapped
    assert env.ale.spec.id == "ALE/Breakout-v5"
    assert ale._frameskip == 4
    assert ale.ale.getFloat("repeat_action_probability") == pytest.approx(0.25)
    assert len(ale._action_set) == 18


def test_env_i_plays_game_i_mod_n():
    games = ["Pong", "Boxing", "Breakout"]
    args = make_args(games=games)
    for i in range(5):
        env = atari.make_env(args, i, train=True)()
        assert env.game == games[i % 3]
        assert env.ale.spec.id == f"ALE/{games[i % 3]}-v5"
        assert env._seed == args.seed + i
    assert atari.make_env(args, 1, train=False, task="Qbert")().game == "Qbert"
    # the default list is the paper's ten games, in order
    assert atari.make_env(make_args(), 13, train=True)().game == atari.GAMES[3] == "Gopher"


def test_same_seed_same_game_stream_and_vector_env():
    args = make_args(games=["Pong", "Boxing"])
    envs = gym.vector.SyncVectorEnv([atari.make_env(args, i, train=True) for i in range(2)])
    obs, _ = envs.reset()
    assert obs["image"].shape == (2, 84, 84, 3) and obs["image"].dtype == np.uint8
    obs, r, term, trunc, info = envs.step(np.array([1, 2]))
    assert r.shape == (2,) and info["prev_reward"].shape == (2,)
    # seeded through make_env: two fresh copies of env 0 give identical frames
    a, b = atari.make_env(args, 0, True)(), atari.make_env(args, 0, True)()
    for env in (a, b):
        env.reset()
        for _ in range(30):
            frame = env.step(3)[0]["image"]
        env.last = frame
    np.testing.assert_array_equal(a.last, b.last)


def test_rewards_unclipped_by_default_and_sign_clipped_when_asked():
    # Boxing scores 2 points for a close punch, within ~15 steps of random play (seeded)
    raw = play(atari.AtariEnv("Boxing", seed=5), 300)
    raw_r = np.array([r for r, _ in raw])
    assert np.abs(raw_r).max() > 1, "expected an unclipped reward with |r| > 1"
    assert all(r == info["prev_reward"] for r, info in raw)
    # the same seed and actions replay the same game, now with sign-clipped rewards
    clipped = play(atari.AtariEnv("Boxing", seed=5, clip_rewards=True), 300)
    clip_r = np.array([r for r, _ in clipped])
    np.testing.assert_array_equal(clip_r, np.sign(raw_r))
    assert all(r == info["prev_reward"] for r, info in clipped)
    assert set(np.unique(clip_r)) <= {-1.0, 0.0, 1.0}


def test_metrics_at_episode_end():
    # A random Breakout game loses its five lives in about 200 steps.
    steps = play(atari.AtariEnv("Breakout", seed=1), 5000)
    *middle, (r_last, info) = steps
    assert all("metrics" not in i and "task" not in i for _, i in middle)
    assert info["task"] == "Breakout" and info["new_episode"] is False
    ret = sum(r for r, _ in steps)
    assert info["metrics"]["return"] == pytest.approx(ret)
    assert info["metrics"]["hns"] == pytest.approx((ret - 1.7) / (30.5 - 1.7))


def test_metrics_return_is_raw_when_clipping():
    steps = play(atari.AtariEnv("MsPacman", seed=0, clip_rewards=True), 5000)
    info = steps[-1][1]
    assert info["task"] == "MsPacman"
    assert sum(r for r, _ in steps) < info["metrics"]["return"]  # pellets are 10 points each
    assert info["metrics"]["return"] % 10 == 0


def test_truncation_is_not_termination():
    env = atari.AtariEnv("Pong", seed=0, max_num_frames_per_episode=40)  # 10 agent steps
    env.reset()
    for t in range(1, 20):
        _, _, term, trunc, info = env.step(0)
        if trunc:
            break
    assert trunc and not term and t == 10
    assert info["task"] == "Pong" and "metrics" in info


def test_an_explicit_seed_replaces_the_construction_seed():
    """A seeded reset (MetaRollouts.restart) must not leave the construction seed for the next, unseeded reset:
    that would replay the construction seed's sticky-action stream in the second game."""

    def frames_after(env, seed=None):
        env.reset(seed=seed)
        return np.stack([env.step(a)[0]["image"] for a in [1] + [3, 4] * 60])

    env = atari.AtariEnv("Breakout", seed=3)
    frames_after(env, seed=7)
    second_game = frames_after(env)  # unseeded: the game's RNG runs on from seed 7
    first_game_of_seed_3 = frames_after(atari.AtariEnv("Breakout", seed=3))
    assert not np.array_equal(second_game, first_game_of_seed_3)
    # and the construction seed alone still gives a reproducible first game
    np.testing.assert_array_equal(first_game_of_seed_3, frames_after(atari.AtariEnv("Breakout", seed=3)))


def test_human_normalized_score_known_values():
    assert atari.human_normalized_score("Pong", -20.7) == pytest.approx(0.0)
    assert atari.human_normalized_score("Pong", 14.6) == pytest.approx(1.0)
    assert atari.human_normalized_score("Pong", 21.0) == pytest.approx(41.7 / 35.3)
    assert atari.human_normalized_score("Seaquest", 68.4 + 2 * (42054.7 - 68.4)) == pytest.approx(2.0)
    assert set(atari.RANDOM_SCORES) == set(atari.HUMAN_SCORES) == set(atari.GAMES)


def test_summarize_eval():
    per_task = {
        "Pong": {"return": 0.0, "hns": 0.5},
        "Boxing": {"return": 10.0, "hns": 3.0},
        "Qbert": {"return": 200.0, "hns": 1.0},
    }
    s = atari.summarize_eval(per_task)
    assert s == pytest.approx({"hns_mean": 1.5, "hns_median": 1.0, "return_mean": 70.0})


def test_capture_video_wraps_eval_env_0_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/<run_name>/videos is relative to the working directory
    args = make_args(capture_video=True)
    assert isinstance(atari.make_env(args, 0, train=True)(), atari.AtariEnv)
    assert isinstance(atari.make_env(args, 1, train=False)(), atari.AtariEnv)
    pytest.importorskip("moviepy")  # gymnasium's RecordVideo needs moviepy
    env = atari.make_env(args, 0, train=False)()
    assert isinstance(env, gym.wrappers.RecordVideo)
    env.reset()
    assert env.render().shape == (210, 160, 3)
    for _ in range(5):
        env.step(0)
    env.close()  # writes the episode recorded so far
    assert os.listdir(tmp_path / "runs" / "test" / "videos") == ["rl-video-episode-0.mp4"]


# ---------------------------------------------------------------- replay of uint8 frames on disk


def test_disk_backed_buffer_round_trip(tmp_path):
    """uint8 frames stay uint8 in a memory-mapped buffer, come back exactly, and survive save / reopen / load."""
    from common.replay import ReplayBuffer

    fields = {
        "image": ((84, 84, 3), np.uint8),
        "prev_action": ((), np.int64),
        "prev_reward": ((), np.float32),
        "reset": ((), np.float32),
        "reward": ((), np.float32),
        "terminal": ((), bool),
    }
    buf = ReplayBuffer(fields, 200, 2, path=str(tmp_path / "buf"), compress=False)  # raw frames (compressed: its own test)
    assert isinstance(buf.data["image"], np.memmap) and (tmp_path / "buf" / "image.npy").exists()
    assert "memory-mapped" in buf.footprint()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (30, 2, 84, 84, 3), dtype=np.uint8)
    ids = buf.new_rollout_ids(2)
    for t in range(30):
        buf.add(
            {
                "image": frames[t],
                "prev_action": np.full(2, t % 18),
                "prev_reward": np.zeros(2, np.float32),
                "reset": np.zeros(2, np.float32),
                "reward": np.ones(2, np.float32),
                "terminal": np.zeros(2, bool),
                "rollout_id": ids,
                "time": np.full(2, t),
            }
        )
    batch = buf.sample(8, 6, rng)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 6, 84, 84, 3)
    env_of = np.where(batch["rollout_id"] == ids[0], 0, 1)  # (B, L)
    np.testing.assert_array_equal(batch["image"], frames[batch["time"], env_of])
    buf.save(str(tmp_path / "snapshot"))
    del buf
    again = ReplayBuffer(fields, 200, 2, path=str(tmp_path / "buf"), compress=False)  # reopens the same files
    again.load(str(tmp_path / "snapshot"))
    assert again.num_timesteps() == 60
    np.testing.assert_array_equal(again.data["image"][:30], frames)
    # the training batch's augmentation keeps dtype and shape
    shifted = atari.random_shift(torch.as_tensor(batch["image"]))
    assert shifted.dtype == torch.uint8 and shifted.shape == batch["image"].shape


# ---------------------------------------------------------------- DrQ-v2 random shift


def edge_crops(frame, pad):
    """All (2 pad + 1)^2 crops of the edge-padded frame (H, W, C), by brute force."""
    x = F.pad(frame.permute(2, 0, 1)[None].float(), (pad,) * 4, mode="replicate")[0].permute(1, 2, 0)
    H, W = frame.shape[:2]
    return {(dy, dx): x[dy : dy + H, dx : dx + W].to(frame.dtype) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}


def noise_frames(n, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_random_shift_shape_dtype_and_input_untouched():
    frames = noise_frames(16)
    before = frames.clone()
    out = atari.random_shift(frames)
    assert out.shape == frames.shape and out.dtype == torch.uint8
    assert torch.equal(frames, before)
    # leading (B, L) dims are folded and restored
    seq = noise_frames(6).reshape(2, 3, 12, 10, 3)
    assert atari.random_shift(seq).shape == (2, 3, 12, 10, 3)


def test_random_shift_is_edge_pad_then_crop_with_independent_offsets():
    torch.manual_seed(0)
    pad, frames = 4, noise_frames(40)
    out = atari.random_shift(frames, pad=pad, fraction=1.0)
    offsets = []
    for f, o in zip(frames, out):
        match = [k for k, crop in edge_crops(f, pad).items() if torch.equal(crop, o)]
        assert len(match) == 1, "every shifted frame is an edge-padded crop at an offset in [0, 2 pad]"
        offsets.append(match[0])
    # independent per frame: 40 draws from 81 offsets are far from all equal
    assert len(set(offsets)) > 20
    assert len({dy for dy, _ in offsets}) > 3 and len({dx for _, dx in offsets}) > 3


def test_random_shift_fraction_leaves_the_rest_untouched():
    torch.manual_seed(1)
    frames = noise_frames(64)
    out = atari.random_shift(frames, fraction=0.5)
    same = (out == frames).flatten(1).all(1)  # (N,) frame left as it was
    # 32 frames untouched, plus any shifted frame whose offset happened to be (pad, pad)
    assert 32 <= same.sum() < 40
    assert torch.equal(atari.random_shift(frames, fraction=0.0), frames)
    torch.manual_seed(2)
    assert (atari.random_shift(frames) == frames).flatten(1).all(1).sum() < 24  # 75% shifted


# ---------------------------------------------------------------- pixel timestep encoder


def encoder_inputs(B, L, hw=84, num_actions=18):
    g = torch.Generator().manual_seed(0)
    obs = {"image": torch.randint(0, 256, (B, L, hw, hw, 3), generator=g, dtype=torch.uint8)}
    prev_action = torch.randint(0, num_actions, (B, L), generator=g)
    prev_action[:, 0] = -1  # no previous action at the start of a meta-rollout
    prev_reward = torch.randn(B, L, generator=g) * 100
    reset = torch.zeros(B, L)
    reset[:, 0] = 1.0
    return obs, prev_action, prev_reward, reset


def test_encoder_output_shape_and_layernorm():
    torch.manual_seed(0)
    env = atari.AtariEnv("Pong")
    enc = atari.TimestepEncoder(env.observation_space, 18, atari.Args(d_token=256))
    out = enc(*encoder_inputs(2, 3))
    assert out.shape == (2, 3, 256) and torch.isfinite(out).all()
    # final LayerNorm at init: every token has mean 0 and std 1 over features
    assert torch.allclose(out.mean(-1), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(out.std(-1, unbiased=False), torch.ones(2, 3), atol=1e-3)
    # IMPALA 16, 32, 32 on 84x84, unpadded max-pools as the official library: 84 -> 41 -> 20 -> 9, 32 x 9 x 9 features
    assert enc.image_proj[0].in_features == 32 * 9 * 9
    assert enc.cnn[:-1](torch.zeros(1, 3, 84, 84)).shape == (1, 32, 9, 9)
    # GroupNorm on every residual sum (official library): 3 blocks x 2 residual blocks
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in enc.modules()) == 6


def test_encoder_tokens_are_per_timestep_and_use_the_rl2_inputs():
    torch.manual_seed(0)
    enc = atari.TimestepEncoder(atari.AtariEnv("Pong").observation_space, 18, atari.Args(d_token=64)).eval()
    obs, a, r, d = encoder_inputs(2, 4)
    out = enc(obs, a, r, d)
    # folding (B, L) into the CNN batch: each token depends on its own timestep only
    single = enc({"image": obs["image"][1:, 2:3]}, a[1:, 2:3], r[1:, 2:3], d[1:, 2:3])
    assert torch.allclose(out[1:, 2:3], single, atol=1e-5)
    r2 = r.clone()
    r2[0, 1] += 1000.0
    assert not torch.allclose(enc(obs, a, r2, d)[0, 1], out[0, 1])
    # a = -1 means an all-zero one-hot, which differs from action 0
    a0 = a.clone()
    a0[:, 0] = 0
    assert not torch.allclose(enc(obs, a0, r, d)[:, 0], out[:, 0])


def test_encoder_procgen_sizes_and_gradients():
    space = gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    enc = atari.TimestepEncoder(space, 15, atari.Args(d_token=32, impala_channels=[20, 36, 64]), image_features=48)
    out = enc(*encoder_inputs(1, 2, hw=64, num_actions=15))
    assert out.shape == (1, 2, 32)
    out.square().sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
