"""Known-answer tests for common/: symlog / two-hot maths and the replay buffer."""

import os

import numpy as np
import pytest
import torch

from common.replay import ReplayBuffer, trim_padding
from common.twohot import bin_supports, bins_to_scalar, symexp, symlog, twohot


def test_symlog_symexp_inverse():
    x = torch.tensor([-1e5, -123.4, -1.0, -1e-3, 0.0, 1e-3, 0.5, 7.0, 1e5], dtype=torch.float64)
    assert torch.allclose(symexp(symlog(x)), x, rtol=1e-10)
    assert symlog(torch.tensor(np.e - 1)).item() == pytest.approx(1.0)
    assert symlog(torch.tensor(-(np.e - 1))).item() == pytest.approx(-1.0)


def test_bins_span_symlog_limits():
    bins = bin_supports(64)
    assert len(bins) == 64
    assert bins[0].item() == pytest.approx(-np.log(1e5 + 1), rel=1e-6)
    assert bins[-1].item() == pytest.approx(np.log(1e5 + 1), rel=1e-6)
    assert torch.allclose(bins[1:] - bins[:-1], (bins[1] - bins[0]).expand(63), atol=1e-5)


def test_twohot_round_trip_and_mass():
    bins = bin_supports(128).double()
    y = torch.tensor([-5e4, -10.0, -0.3, 0.0, 0.01, 1.0, 99.0, 3e4], dtype=torch.float64)
    label = twohot(symlog(y), bins)
    assert torch.allclose(label.sum(-1), torch.ones(len(y), dtype=torch.float64))
    assert ((label > 0).sum(-1) <= 2).all()
    assert torch.allclose(bins_to_scalar(label, bins), y, rtol=1e-9, atol=1e-9)


def test_twohot_nearer_bin_gets_larger_weight():
    bins = torch.tensor([0.0, 1.0, 2.0, 3.0])
    label = twohot(torch.tensor(1.25), bins)
    assert torch.allclose(label, torch.tensor([0.0, 0.75, 0.25, 0.0]))  # 1.25 is nearer bin 1
    assert torch.allclose(twohot(torch.tensor(2.0), bins), torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_twohot_edge_bins():
    bins = bin_supports(16)
    label = twohot(torch.tensor([-1e9, 1e9, bins[0].item(), bins[-1].item()]), bins)
    assert label[0, 0] == 1 and label[1, -1] == 1 and label[2, 0] == 1 and label[3, -1] == 1
    assert torch.allclose(label.sum(-1), torch.ones(4))


def test_uncertain_return_is_valued_in_symlog_space():
    """The cross-entropy of Eq. 3 is minimised by the mixture of the labels it sees, and the scalar value is the
    expectation in symlog space (the official library's too): a 30% chance of 900 is worth symexp(0.3 symlog 900)
    = 6.7, not 270. Bootstrapping from such a value through another uncertain step shrinks it again (README, BabyAI)."""
    bins = bin_supports(64).double()
    win, lose = (
        twohot(symlog(torch.tensor(900.0, dtype=torch.float64)), bins),
        twohot(torch.zeros((), dtype=torch.float64), bins),
    )
    q = bins_to_scalar(0.3 * win + 0.7 * lose, bins)
    assert torch.isclose(q, symexp(0.3 * symlog(torch.tensor(900.0, dtype=torch.float64))))
    assert 6.5 < q < 6.9  # vs the mean return 270
    again = bins_to_scalar(0.3 * twohot(symlog(q), bins) + 0.7 * lose, bins)  # one more 30% step back
    assert 0.8 < again < 0.9


# ---- replay buffer ----
FIELDS = {"obs": ((3,), np.uint8), "reward": ((), np.float32)}


def fill(buffer, lengths_per_env, rng=None):
    """Write rollouts of the given lengths in each env column; obs encodes (rollout id, time)."""
    E = buffer.num_envs
    queues = [list(ls) for ls in lengths_per_env]
    state = [None] * E
    for _ in range(max(sum(ls) for ls in lengths_per_env)):
        for e in range(E):
            if state[e] is None or state[e][1] == state[e][2]:
                if not queues[e]:
                    continue
                state[e] = [int(buffer.new_rollout_ids(1)[0]), 0, queues[e].pop(0)]
            rid, t, _ = state[e]
            buffer.add(
                {
                    "obs": np.array([[rid % 256, t % 256, e]], np.uint8),
                    "reward": np.array([t], np.float32),
                    "rollout_id": np.array([rid]),
                    "time": np.array([t]),
                },
                np.array([e]),
            )
            state[e][1] += 1


def check_windows(batch, length):
    obs, mask, rid, t = batch["obs"], batch["mask"], batch["rollout_id"], batch["time"]
    assert obs.dtype == np.uint8 and obs.shape[1] == length
    for b in range(len(obs)):
        assert mask[b, 0]  # a window always starts on real data
        k = mask[b].sum()
        assert mask[b, :k].all() and not mask[b, k:].any()  # real data, then padding only
        assert (rid[b, :k] == rid[b, 0]).all()  # never crosses a rollout boundary
        assert (np.diff(t[b, :k]) == 1).all()  # consecutive timesteps
        assert k >= 2  # at least one valid transition


SAMPLING = ["timestep", "rollout"]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_windows_never_cross_rollout_boundaries(sampling):
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(FIELDS, capacity=3 * 200, num_envs=3, sampling=sampling)
    fill(buffer, [[5, 30, 2, 40], [100], [3, 3, 3, 60]])
    batch = buffer.sample(256, 9, rng)
    check_windows(batch, 9)
    # a window whose rollout is long enough is full: the start is moved back from the rollout's end
    assert batch["mask"][batch["rollout_id"][:, 0] == 4].all()  # env 1's single 100-step rollout


@pytest.mark.parametrize("sampling", SAMPLING)
def test_windows_after_ring_wraps(sampling):
    rng = np.random.default_rng(1)
    buffer = ReplayBuffer(FIELDS, capacity=2 * 50, num_envs=2, sampling=sampling)
    fill(buffer, [[17] * 9, [23] * 7])  # 153 and 161 steps into 50 rows each: wraps three times
    assert (buffer.size == 50).all()
    check_windows(buffer.sample(512, 12, rng), 12)


@pytest.mark.parametrize("sampling", SAMPLING)
def test_single_rollout_longer_than_ring(sampling):
    """One rollout that fills the whole column: the wrap point must still break windows (times jump)."""
    rng = np.random.default_rng(2)
    buffer = ReplayBuffer(FIELDS, capacity=40, num_envs=1, sampling=sampling)
    fill(buffer, [[130]])
    check_windows(buffer.sample(512, 10, rng), 10)


@pytest.mark.parametrize("sampling", SAMPLING)
def test_how_often_each_rollout_is_drawn(sampling):
    """Known answers: per timestep, a rollout is drawn in proportion to its timesteps with a successor (length - 1; the
    last one of each env is still running, its final row the write head); per rollout, each equally often. The column
    that wrapped holds the tail of a rollout whose start was overwritten: a stored rollout like the others."""
    buffer = ReplayBuffer(FIELDS, capacity=3 * 60, num_envs=3, sampling=sampling)
    fill(buffer, [[2, 5, 40], [10], [50, 30]])  # env 2: 80 steps into 60 rows, rollout 2 keeps its last 30 of 50
    lengths = {0: 2, 1: 10, 2: 30, 3: 5, 4: 40, 5: 30}  # rollout id -> stored length (ids in the order rollouts start)
    stored = buffer.data["rollout_id"]
    assert {r: int((stored == r).sum()) for r in lengths} == lengths
    n = 60_000
    first = buffer.sample(n, 4, np.random.default_rng(3))["rollout_id"][:, 0]
    freq = np.array([(first == r).mean() for r in lengths])
    weights = np.array([L - 1 for L in lengths.values()]) if sampling == "timestep" else np.ones(len(lengths))
    assert np.abs(freq - weights / weights.sum()).max() < 0.01  # binomial standard error <= 0.002 at n = 60,000


@pytest.mark.parametrize("sampling", SAMPLING)
def test_where_in_a_rollout_the_window_starts(sampling):
    """Known answer: a start is drawn uniformly over a rollout's T timesteps with a successor, then moved back so the
    window fits, so the last full window's start (T - l) takes l / T of the draws, the earlier starts 1 / T each (the
    official library draws a start uniformly over the T - l + 1 full-window starts: docs/differences.md)."""
    buffer = ReplayBuffer(FIELDS, capacity=40, num_envs=1, sampling=sampling)
    fill(buffer, [[11, 3]])  # rollout 0: 11 timesteps, T = 10 with a successor; rollout 1 still running
    batch = buffer.sample(40_000, 5, np.random.default_rng(4))  # l = 4
    start = batch["time"][batch["rollout_id"][:, 0] == 0, 0]
    freq = np.bincount(start, minlength=7) / len(start)
    assert np.abs(freq - np.r_[[0.1] * 6, 0.4]).max() < 0.015  # binomial standard error <= 0.003 at n ~ 20,000


def test_rollout_sampling_follows_the_buffer(tmp_path):
    """The per-rollout index is rebuilt when rows change: a rollout written after a draw is drawn as often as the others,
    and a saved buffer loaded into another draws the same windows."""
    buffer = ReplayBuffer(FIELDS, capacity=2 * 100, num_envs=2, sampling="rollout")
    fill(buffer, [[20, 20], [20]])
    buffer.sample(8, 4, np.random.default_rng(0))
    fill(buffer, [[3], [3]])  # two new rollouts (ids 3, 4) after the index was built
    first = buffer.sample(20_000, 3, np.random.default_rng(1))["rollout_id"][:, 0]
    assert np.abs(np.bincount(first, minlength=5) / len(first) - 0.2).max() < 0.015
    buffer.save(str(tmp_path / "snap"))
    other = ReplayBuffer(FIELDS, capacity=2 * 100, num_envs=2, sampling="rollout")
    fill(other, [[7], [9]])
    other.sample(8, 4, np.random.default_rng(0))  # an index of what it held before the load
    other.load(str(tmp_path / "snap"))
    s1, s2 = buffer.sample(16, 5, np.random.default_rng(9)), other.sample(16, 5, np.random.default_rng(9))
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="'timestep', 'rollout'"):
        ReplayBuffer(FIELDS, capacity=100, num_envs=1, sampling="episode")


def test_buffer_save_load_round_trip(tmp_path):
    buffer = ReplayBuffer(FIELDS, capacity=200, num_envs=2)
    fill(buffer, [[10, 20], [7, 7, 7]])
    buffer.save(str(tmp_path / "snap"))
    other = ReplayBuffer(FIELDS, capacity=200, num_envs=2)
    other.load(str(tmp_path / "snap"))
    for k in buffer.data:
        assert np.array_equal(buffer.data[k], other.data[k])
    assert (other.ptr == buffer.ptr).all() and other.next_rollout_id == buffer.next_rollout_id
    s1, s2 = buffer.sample(8, 5, np.random.default_rng(9)), other.sample(8, 5, np.random.default_rng(9))
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)


def test_snapshot_is_atomic_and_older_ones_are_pruned(tmp_path):
    """save() replaces a stale half-written `.tmp` and leaves no `.tmp` behind; remove_snapshots keeps only one."""
    buffer = ReplayBuffer(FIELDS, capacity=200, num_envs=2)
    fill(buffer, [[10, 20], [7, 7, 7]])
    os.makedirs(tmp_path / "buffer-20.tmp")  # left by a save killed mid-write
    (tmp_path / "buffer-20.tmp" / "junk").write_text("x")
    buffer.save(str(tmp_path / "buffer-10"))
    buffer.save(str(tmp_path / "buffer-20"))
    assert sorted(os.listdir(tmp_path)) == ["buffer-10", "buffer-20"]
    assert sorted(os.listdir(tmp_path / "buffer-20")) == sorted([f"{k}.npy" for k in buffer.data] + ["state.json"])
    (tmp_path / "state.pt").write_text("the commit point is not a snapshot")
    ReplayBuffer.remove_snapshots(str(tmp_path), keep="buffer-20")
    assert sorted(os.listdir(tmp_path)) == ["buffer-20", "state.pt"]


def test_memory_mapped_buffer(tmp_path):
    rng = np.random.default_rng(4)
    buffer = ReplayBuffer(FIELDS, capacity=300, num_envs=3, path=str(tmp_path / "mm"))
    assert isinstance(buffer.data["obs"], np.memmap)
    fill(buffer, [[12, 9], [25], [4, 4, 4]])
    check_windows(buffer.sample(64, 6, rng), 6)
    buffer.save(str(tmp_path / "snap"))
    reopened = ReplayBuffer(FIELDS, capacity=300, num_envs=3, path=str(tmp_path / "mm"))
    reopened.load(str(tmp_path / "snap"))
    assert np.array_equal(reopened.data["obs"], buffer.data["obs"])
    assert reopened.next_rollout_id == buffer.next_rollout_id
    assert "memory-mapped" in reopened.footprint()


def test_ram_buffer_that_cannot_fit_is_refused():
    with pytest.raises(MemoryError, match="--buffer-dir"):
        ReplayBuffer({"frame": ((84, 84, 3), np.uint8)}, capacity=10**9, num_envs=1)


def test_disk_buffer_that_cannot_fit_is_refused(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**6))
    with pytest.raises(MemoryError, match="on disk"):
        ReplayBuffer({"frame": ((84, 84, 3), np.uint8)}, capacity=10**5, num_envs=1, path=str(tmp_path / "b"))


def test_trim_padding_drops_only_the_columns_no_window_reaches():
    mask = np.zeros((3, 10), dtype=bool)
    mask[0, :4], mask[1, 2:7], mask[2, :3] = True, True, True  # the longest real window ends at column 6
    batch = {"mask": mask, "obs": np.arange(30).reshape(3, 10), "image": np.ones((3, 10, 2, 2, 3), np.uint8)}
    out = trim_padding(batch)
    assert out["mask"].shape == (3, 7) and out["image"].shape == (3, 7, 2, 2, 3)
    assert np.array_equal(out["obs"], batch["obs"][:, :7]) and np.array_equal(out["mask"], mask[:, :7])
    full = dict(batch, mask=np.ones((3, 10), dtype=bool))
    assert trim_padding(full)["obs"].shape == (3, 10)  # nothing to drop
