"""Compressed image replay (common/replay.py, issue 21): the same windows as the raw buffer, bit for bit, in RAM and on
disk, across the ring's wrap and a save / load; the memory guard; the background prefetch gives the same batches."""

import shutil
from collections import namedtuple

import numpy as np
import pytest

from common import replay
from common.replay import CHUNK, Prefetcher, ReplayBuffer, ReplayMemoryError


def fields(shape):
    return {"image": (shape, np.uint8), "reward": ((), np.float32)}


def frame(rid: int, t: int, shape: tuple, kind: str) -> np.ndarray:
    """A frame that encodes (rollout id, time): noise, or a game-like screen (flat background, a moving block)."""
    if kind == "random":
        return np.random.default_rng([rid, t]).integers(0, 256, shape, dtype=np.uint8)
    img = np.full(shape, (rid * 37) % 256, np.uint8)
    y, x = (t * 3) % (shape[0] - 4), (rid * 5 + t) % (shape[1] - 4)
    img[y : y + 4, x : x + 4] = 255 - img[0, 0]
    img[0, 0, 0], img[0, 1, 0] = rid % 256, t % 256  # a score counter
    return img


class Writer:
    """Drives buffers the way MetaRollouts does: every env steps, then envs whose rollout ended begin a new one (a
    second add for those envs alone). Rollout lengths are random, so chunks mix rollouts."""

    def __init__(self, buffers, shape, kind, seed=0, mean_length=20):
        self.buffers, self.shape, self.kind, self.mean = buffers, shape, kind, mean_length
        self.rng = np.random.default_rng(seed)
        E = buffers[0].num_envs
        self.rid, self.t, self.left = np.zeros(E, np.int64), np.zeros(E, np.int64), np.zeros(E, np.int64)
        self.begin(np.arange(E))

    def begin(self, envs):
        ids = self.buffers[0].new_rollout_ids(len(envs))
        for b in self.buffers[1:]:
            b.new_rollout_ids(len(envs))
        self.rid[envs], self.t[envs] = ids, 0
        self.left[envs] = self.rng.integers(1, 2 * self.mean, size=len(envs))
        self.add(envs)

    def add(self, envs):
        step = {
            "image": np.stack([frame(self.rid[e], self.t[e], self.shape, self.kind) for e in envs]),
            "reward": self.t[envs].astype(np.float32),
            "rollout_id": self.rid[envs],
            "time": self.t[envs],
        }
        for b in self.buffers:
            b.add(step, envs)

    def steps(self, n):
        for _ in range(n):
            self.t += 1
            self.left -= 1
            self.add(np.arange(len(self.t)))
            done = np.flatnonzero(self.left <= 0)
            if len(done):
                self.begin(done)


def assert_same(b1, b2):
    assert b1.keys() == b2.keys()
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k], err_msg=k)


def assert_same_samples(a, b, seed, lengths=(9, 2 * CHUNK + 3)):
    for length in lengths:
        s1 = a.sample(64, length, np.random.default_rng(seed))
        s2 = b.sample(64, length, np.random.default_rng(seed))
        assert_same(s1, s2)
    return s1


@pytest.mark.parametrize("kind,shape", [("random", (6, 5, 3)), ("game-like", (84, 84, 3))])
def test_compressed_windows_equal_raw_ones_across_the_wrap(kind, shape):
    """50 rows per env (not a multiple of CHUNK), filled a quarter, then wrapped about five times."""
    raw = ReplayBuffer(fields(shape), capacity=3 * 50, num_envs=3, compress=False)
    packed = ReplayBuffer(fields(shape), capacity=3 * 50, num_envs=3)
    assert packed.frames and "image" not in packed.data and "image" in raw.data
    writer = Writer([raw, packed], shape, kind)
    writer.steps(12)  # not wrapped: windows reach never-written rows (zeros) and the open chunks
    assert_same_samples(raw, packed, seed=1)
    writer.steps(250)
    assert (packed.size == 50).all()
    batch = assert_same_samples(raw, packed, seed=2)
    mask = batch["mask"]  # the frames are the ones written for (rollout id, time)
    for b, t in zip(*np.nonzero(mask[:8])):
        np.testing.assert_array_equal(batch["image"][b, t], frame(batch["rollout_id"][b, t], batch["time"][b, t], shape, kind))


def test_compressed_buffer_on_disk_equals_raw_in_ram(tmp_path):
    shape = (10, 8, 3)
    raw = ReplayBuffer(fields(shape), capacity=4 * 40, num_envs=4, compress=False)
    disk = ReplayBuffer(fields(shape), capacity=4 * 40, num_envs=4, path=str(tmp_path / "buf"))
    assert (tmp_path / "buf" / "image.sqlite").exists() and not (tmp_path / "buf" / "image.npy").exists()
    assert "memory-mapped in" in disk.footprint() and "zstd" in disk.footprint()
    Writer([raw, disk], shape, "game-like", seed=3).steps(130)
    assert_same_samples(raw, disk, seed=4)
    assert disk.bytes_used() > 0


def test_save_load_restores_the_compressed_buffer_exactly(tmp_path):
    """Samples equal after load, and stay equal as both go on writing (open chunks are read back from the store)."""
    shape = (12, 10, 3)
    a = ReplayBuffer(fields(shape), capacity=2 * 70, num_envs=2)
    raw = ReplayBuffer(fields(shape), capacity=2 * 70, num_envs=2, compress=False)
    writer = Writer([a, raw], shape, "random", seed=5)
    writer.steps(101)  # wrapped, mid-chunk
    a.save(str(tmp_path / "snap"))
    b = ReplayBuffer(fields(shape), capacity=2 * 70, num_envs=2)
    b.load(str(tmp_path / "snap"))
    assert_same_samples(a, b, seed=6)
    assert b.bytes_used() == a.bytes_used() and b.next_rollout_id == a.next_rollout_id
    writer.buffers.append(b)
    writer.steps(45)
    assert_same_samples(a, b, seed=7)
    assert_same_samples(raw, b, seed=7)


def test_disk_buffer_resumes_without_the_rows_written_after_the_checkpoint(tmp_path):
    """A killed run: rows written after the checkpoint (the open chunk never reached the file) are dropped on load;
    every window then holds the frames written for its (rollout id, time)."""
    shape = (8, 8, 3)
    buf = ReplayBuffer(fields(shape), capacity=3 * 60, num_envs=3, path=str(tmp_path / "buf"))
    writer = Writer([buf], shape, "random", seed=8, mean_length=30)
    writer.steps(100)
    buf.save(str(tmp_path / "snap"))
    saved_ids = buf.next_rollout_id
    writer.steps(37)  # then killed: no save, the open chunks are lost
    del writer, buf
    again = ReplayBuffer(fields(shape), capacity=3 * 60, num_envs=3, path=str(tmp_path / "buf"))
    again.load(str(tmp_path / "snap"))
    assert again.data["rollout_id"].max() < saved_ids
    batch = again.sample(128, 12, np.random.default_rng(9))
    for b, t in zip(*np.nonzero(batch["mask"])):
        np.testing.assert_array_equal(
            batch["image"][b, t], frame(batch["rollout_id"][b, t], batch["time"][b, t], shape, "random")
        )


ATARI = {
    "image": ((84, 84, 3), np.uint8),
    "prev_action": ((), np.int64),
    "prev_reward": ((), np.float32),
    "reset": ((), np.float32),
    "reward": ((), np.float32),
    "terminal": ((), bool),
}


def test_paper_atari_buffer_starts_with_20_gib_free(monkeypatch):
    """`amago2_atari.py` defaults (8M timesteps, 30 envs): refused raw (158 GiB), expected well under 16 GiB compressed."""
    monkeypatch.setattr(replay, "available_ram_bytes", lambda: 20 * 2**30)
    with pytest.raises(MemoryError, match="--buffer-dir"):
        ReplayBuffer(ATARI, 8_000_000, 30, compress=False)
    buf = ReplayBuffer(ATARI, 8_000_000, 30)
    assert buf.expected < 16 * 2**30 and "expected" in buf.footprint()


def test_buffer_that_cannot_fit_even_compressed_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(replay, "available_ram_bytes", lambda: 2**30)
    with pytest.raises(MemoryError, match="--buffer-dir") as e:
        ReplayBuffer(ATARI, 8_000_000, 30)
    assert "\n" not in str(e.value) and "compressed" in str(e.value)


def test_memory_guard_stops_a_filling_buffer_cleanly(monkeypatch):
    """Free RAM shrinks below what the rest of the buffer will take: ReplayMemoryError, after the step is stored."""
    shape = (16, 16, 3)
    free = [10 * 2**30]
    monkeypatch.setattr(replay, "available_ram_bytes", lambda: free[0])
    buf = ReplayBuffer(fields(shape), capacity=4 * 400, num_envs=4)
    writer = Writer([buf], shape, "random", seed=10)
    writer.steps(60)  # plenty free: checked every 1% filled, no error
    free[0] = replay.RESERVE + 1000  # noise frames barely compress: the 1,300 rows to come need far more than 1000 bytes
    with pytest.raises(ReplayMemoryError) as e:
        writer.steps(20)
    assert isinstance(e.value, MemoryError) and "\n" not in str(e.value)
    assert "GiB more to fill" in str(e.value) and "--buffer-dir" in str(e.value)
    stored = buf.num_timesteps()
    batch = buf.sample(8, 5, np.random.default_rng(0))  # the buffer stays usable (a checkpoint can be written)
    assert batch["image"].shape == (8, 5, *shape) and stored > 240


def test_memory_guard_on_disk(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**11))
    shape = (16, 16, 3)
    buf = ReplayBuffer(fields(shape), capacity=2 * 400, num_envs=2, path=str(tmp_path / "b"))
    writer = Writer([buf], shape, "random", seed=11)
    writer.steps(40)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, replay.RESERVE))
    with pytest.raises(ReplayMemoryError, match="choose another --buffer-dir"):
        writer.steps(20)


def test_bytes_used_grows_as_the_buffer_fills():
    shape = (84, 84, 3)
    buf = ReplayBuffer(fields(shape), capacity=2 * 200, num_envs=2)
    writer = Writer([buf], shape, "game-like", seed=12)
    writer.steps(50)
    first = buf.bytes_used()
    writer.steps(100)
    assert buf.bytes_used() > first
    stored = buf.frames["image"].store.nbytes()
    assert stored < buf.num_timesteps() * 84 * 84 * 3 / 20  # game-like frames compress well


def filled(seed=13, shape=(10, 10, 3)):
    buf = ReplayBuffer(fields(shape), capacity=3 * 80, num_envs=3)
    Writer([buf], shape, "random", seed=seed).steps(120)
    return buf


def test_prefetched_batches_equal_plain_samples():
    buf = filled()
    rng1, rng2 = np.random.default_rng(14), np.random.default_rng(14)
    plain = [buf.sample(16, 11, rng1) for _ in range(5)]
    prefetched = list(Prefetcher(buf).batches(5, 16, 11, rng2))
    for a, b in zip(plain, prefetched, strict=True):
        assert_same(a, b)
    assert rng1.bit_generator.state == rng2.bit_generator.state  # no draw beyond the last batch


def test_a_loop_left_early_gives_back_the_pending_draw():
    buf = filled()
    rng1, rng2 = np.random.default_rng(15), np.random.default_rng(15)
    for _ in range(2):
        buf.sample(16, 11, rng1)
    for i, _ in enumerate(Prefetcher(buf).batches(5, 16, 11, rng2)):
        if i == 1:
            break  # batch 2 was drawn already
    assert rng1.bit_generator.state == rng2.bit_generator.state


def test_checkpoint_with_a_batch_pending_resumes_to_the_same_sequence(tmp_path):
    buf = filled()
    rng = np.random.default_rng(16)
    prefetch = Prefetcher(buf)
    loop = prefetch.batches(6, 16, 11, rng)
    seen = [next(loop), next(loop)]  # batch 2 pending
    buf.save(str(tmp_path / "snap"))
    state = prefetch.rng_state(rng)
    rest = list(loop)
    resumed_buf = ReplayBuffer(fields((10, 10, 3)), capacity=3 * 80, num_envs=3)
    resumed_buf.load(str(tmp_path / "snap"))
    resumed_rng = np.random.default_rng()
    resumed_rng.bit_generator.state = state
    resumed = list(Prefetcher(resumed_buf).batches(4, 16, 11, resumed_rng))
    assert len(seen + rest) == 6
    for a, b in zip(rest, resumed, strict=True):
        assert_same(a, b)
    assert resumed_rng.bit_generator.state == rng.bit_generator.state
