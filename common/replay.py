"""Replay buffer of meta-rollout timesteps (paper App. B: sequences of l + 1 timesteps that never cross a meta-rollout).

Layout: every parallel env owns one ring column of `capacity // num_envs` rows, so a meta-rollout is
stored contiguously in its env's column and one env step is one fancy-indexed write for all envs.
Each row is one timestep; alongside the benchmark's fields we keep the rollout id and the absolute
time index, which is all that is needed to find rollout boundaries: two rows belong to the same
window iff they have the same rollout id and consecutive time indices. That rule also holds across
the ring's wrap point and after a resume, so no other bookkeeping is required.

Image fields (uint8, two or more dims: (84, 84, 3) Atari and (64, 64, 3) Procgen frames) are stored compressed:
each env's column is cut into chunks of CHUNK consecutive rows, compressed together with zstd (consecutive frames of
one env share most pixels). Filled with our own wrappers' frames (random policy), Atari's paper buffer (8M steps)
takes 1.8 GiB instead of 158, Procgen easy's (18M) 15.5 GiB instead of 207 (docs/memory.md). Sampling returns exactly
what an uncompressed buffer would. The authors' library also stores compressed trajectory files (np.savez_compressed).
"""

import json
import os
import shutil
import sqlite3
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard

CHUNK = 16  # rows of one env's column compressed together: 2-3x the ratio of single frames (docs/memory.md)
LEVEL = 3  # zstd's default level: a better ratio than 1 and as fast to decode; 6 encodes 3-4x slower for <= 15% more
# Frame bytes / stored bytes of a buffer filled with random-policy rollouts of the default game sets, rounded down
# (docs/memory.md: Atari 105x; Procgen easy 13.8x, memory-hard 11.2x: one entry per shape, the lower). It sizes the
# start-up check and line; a trained policy's frames may compress less, so the real size is watched as the buffer fills.
ASSUMED_RATIO = {(84, 84, 3): 100.0, (64, 64, 3): 10.0}
RESERVE = 2**30  # bytes of free RAM (or disk) a filling buffer leaves to the rest of the run


def available_ram_bytes() -> int:
    """Memory the kernel can hand out now (Linux MemAvailable: free pages plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ReplayMemoryError(MemoryError):
    """The buffer, part-filled, is projected to outgrow the free RAM (or disk): stop cleanly before the OS kills the run."""


def is_image(shape: tuple, dtype) -> bool:
    return np.dtype(dtype) == np.uint8 and len(shape) >= 2


class ReplayBuffer:
    """Capacity counted in timesteps (the paper's Table 1 unit), dtypes kept as given (uint8 frames stay uint8).

    fields: name -> (shape, dtype) of one timestep. Image fields are stored compressed (see above) unless
    compress=False (for tests and benchmarks). With `path`, the buffer lives in that folder (arrays memory-mapped,
    compressed frames in an SQLite file) and survives the process; otherwise it lives in RAM. sampling: how a window's
    start is drawn, "timestep" (uniformly over stored timesteps) or "rollout" (a stored rollout uniformly, then a
    timestep inside it, as the authors' library draws a trajectory file, then a window): see draw.
    """

    def __init__(
        self, fields: dict, capacity: int, num_envs: int, path: str | None = None, compress: bool = True, sampling="rollout"
    ):
        self.rows, self.num_envs, self.path = capacity // num_envs, num_envs, path
        if self.rows < 2:
            raise ValueError(f"replay capacity {capacity} gives fewer than 2 timesteps per env for {num_envs} envs")
        if sampling not in ("timestep", "rollout"):
            raise ValueError(f"replay sampling {sampling!r} is not one of 'timestep', 'rollout'")
        self.sampling = sampling
        self.rollout_index, self.version = None, 0  # rollout mode's index of window starts, rebuilt when rows change
        self.names = [*fields, "rollout_id", "time"]  # the batch's keys, in this order
        fields = dict(fields, rollout_id=((), np.int64), time=((), np.int64))
        images = {k: v for k, v in fields.items() if compress and is_image(*v)}
        raw_bytes = {k: self.rows * num_envs * int(np.prod(s)) * np.dtype(d).itemsize for k, (s, d) in fields.items()}
        self.nbytes = sum(raw_bytes.values())  # uncompressed
        self.row_bytes = sum(b for k, b in raw_bytes.items() if k not in images) // (self.rows * num_envs)
        self.stage_bytes = sum(num_envs * CHUNK * int(np.prod(s)) for s, _ in images.values())
        ratio = {k: ASSUMED_RATIO.get(tuple(shape), 1.0) for k, (shape, _) in images.items()}
        self.expected = sum(b / ratio.get(k, 1.0) for k, b in raw_bytes.items()) + self.stage_bytes  # full, at ASSUMED_RATIO
        self.check_room(path)
        self.data, self.frames = {}, {}
        for name, (shape, dtype) in fields.items():
            if name in images:
                store = BlobsInRam(-(-self.rows // CHUNK), num_envs) if path is None else BlobsOnDisk(path, name)
                self.frames[name] = Frames(shape, num_envs, store)
            elif path is None:
                self.data[name] = np.zeros((self.rows, num_envs, *shape), dtype=dtype)
            else:
                file = os.path.join(path, f"{name}.npy")
                mode = "r+" if os.path.exists(file) else "w+"
                self.data[name] = np.lib.format.open_memmap(file, mode=mode, dtype=dtype, shape=(self.rows, num_envs, *shape))
        if path is None or mode == "w+":
            self.data["rollout_id"][:] = -1  # -1 marks a row never written
        self.ptr = np.zeros(num_envs, dtype=np.int64)  # next row to write, per env
        self.size = np.zeros(num_envs, dtype=np.int64)  # rows written so far (<= rows), per env
        self.next_rollout_id = 0
        self.next_check = self.check_every = max(1, self.rows * num_envs // 100)  # rows: watch the size every 1% filled

    def check_room(self, path: str | None):
        """Refuse at once a buffer whose expected size cannot fit (compressed frames: at ASSUMED_RATIO)."""
        how = "" if self.expected == self.nbytes else " (frames compressed, as measured in docs/memory.md)"
        if path is None and self.expected > available_ram_bytes():
            raise MemoryError(
                f"the replay buffer needs ~{self.expected / 2**30:.1f} GiB of RAM{how} but only "
                f"{available_ram_bytes() / 2**30:.1f} GiB is free: lower the buffer size or keep it on disk with --buffer-dir"
            )
        if path is not None:
            os.makedirs(path, exist_ok=True)
            on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            free = shutil.disk_usage(path).free + on_disk  # memory-mapped files fill in as the buffer does
            if self.expected > free:
                raise MemoryError(
                    f"the replay buffer needs ~{self.expected / 2**30:.1f} GiB on disk{how} but {path} has only "
                    f"{free / 2**30:.1f} GiB free: lower the buffer size or choose another --buffer-dir"
                )

    def footprint(self) -> str:
        """The start-up line: the expected full size (frames at ASSUMED_RATIO), and where the buffer lives."""
        where = f"on disk, memory-mapped in {self.path}" if self.path else "in RAM"
        per = f"windows drawn per {self.sampling}"
        if not self.frames:
            return f"replay buffer: {self.rows * self.num_envs:,} timesteps, {self.nbytes / 2**30:.2f} GiB {where}, {per}"
        ratios = ", ".join(f"{name} ~{ASSUMED_RATIO.get(f.shape, 1.0):.0f}x" for name, f in self.frames.items())
        return (
            f"replay buffer: {self.rows * self.num_envs:,} timesteps {where}, ~{self.expected / 2**30:.2f} GiB when full "
            f"({self.nbytes / 2**30:.2f} GiB raw; frames zstd-compressed, {ratios} expected: docs/memory.md), {per}"
        )

    def bytes_used(self) -> int:
        """What the buffer holds now: compressed chunks, each env's open chunk, and the other fields' rows written so far
        (RAM pages, or disk blocks, are committed as rows are first written)."""
        frames = sum(f.store.nbytes() for f in self.frames.values())
        return frames + self.stage_bytes + self.row_bytes * self.num_timesteps()

    def new_rollout_ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_rollout_id, self.next_rollout_id + n)
        self.next_rollout_id += n
        return ids

    def add(self, step: dict, envs: np.ndarray | None = None):
        """Write one timestep for each env in `envs` (default all): step[name] has shape (len(envs), ...).
        Raises ReplayMemoryError (after the write) if the rest of the buffer is projected not to fit."""
        envs = np.arange(self.num_envs) if envs is None else envs
        rows = self.ptr[envs]
        for name, value in step.items():
            if name in self.frames:
                self.frames[name].write(rows, envs, value)
            else:
                self.data[name][rows, envs] = value
        self.ptr[envs] = (rows + 1) % self.rows
        self.size[envs] = np.minimum(self.size[envs] + 1, self.rows)
        self.version += 1
        if self.num_timesteps() >= self.next_check:
            self.next_check += self.check_every
            self.check_growth()

    def check_growth(self):
        """While the buffer fills: the rows still to come, at the bytes per row so far, must fit in what is free."""
        stored, capacity = self.num_timesteps(), self.rows * self.num_envs
        if stored >= capacity:
            return  # full: the ring only replaces chunks from here
        used = self.bytes_used()
        still = (capacity - stored) * (used - self.stage_bytes) / stored  # at the bytes per row so far
        free = available_ram_bytes() if self.path is None else shutil.disk_usage(self.path).free
        if still > free - RESERVE:
            where = "RAM" if self.path is None else f"disk in {self.path}"
            raise ReplayMemoryError(
                f"the replay buffer holds {used / 2**30:.1f} GiB for {stored:,} of its {capacity:,} timesteps and needs "
                f"~{still / 2**30:.1f} GiB more to fill, but only {free / 2**30:.1f} GiB of {where} is free "
                f"({RESERVE / 2**30:.0f} GiB kept for the rest of the run): lower the buffer size"
                + (" or keep it on disk with --buffer-dir" if self.path is None else " or choose another --buffer-dir")
            )

    def _same_rollout(self, rows: np.ndarray, envs: np.ndarray, anchor: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(B, K) bool: row (anchor + offset) holds the same rollout as the anchor, `offset` steps later."""
        rid, t = self.data["rollout_id"][rows, envs], self.data["time"][rows, envs]
        rid0, t0 = self.data["rollout_id"][anchor, envs[:, 0]], self.data["time"][anchor, envs[:, 0]]
        return (rid == rid0[:, None]) & (t == t0[:, None] + offsets) & (rid0[:, None] >= 0)

    def num_timesteps(self) -> int:
        return int(self.size.sum())

    def sample(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        """`batch_size` windows of `length` timesteps that never cross a rollout boundary (see draw)."""
        return self.gather(*self.draw(batch_size, length, rng))

    def draw(self, batch_size: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where the windows are: rows (B, length), envs (B,) and mask (B, length); the only use of `rng`.

        A start timestep is drawn among stored timesteps that have a successor (uniformly over them, or with
        sampling="rollout" uniformly over their rollouts, then uniformly inside the one drawn), then moved
        back (never before its rollout's first stored step) so the window is as full as the rollout
        allows. Rows past the rollout's end are padding: returned as they are, with mask False.

        Example, length 4 (l = 3), one env's column holding rollout A at rows 0-5 (row 5 its final timestep) and the
        running rollout B at rows 6-8:
            start 4: A has 2 rows from 4 on, so the window moves back 2: rows 2 3 4 5, mask 1 1 1 1
            start 6: B has 3 rows and none before it:         rows 6 7 8 9, mask 1 1 1 0 (row 9: padding)
            start 5 or 8: no successor (A's end, B's write head): drawn again
        """
        l = length - 1
        starts, envs = (self.draw_starts if self.sampling == "timestep" else self.draw_starts_by_rollout)(batch_size, rng)
        # look l steps back and l steps ahead to move the start back if the rollout ends early
        offsets = np.arange(-l, l + 1)
        rows = (starts[:, None] + offsets) % self.rows
        same = self._same_rollout(rows, envs[:, None], starts, offsets)  # (B, 2l+1)
        n_after = np.cumprod(same[:, l:], axis=1).sum(1)  # steps from the start to the rollout end (incl.)
        n_before = np.cumprod(same[:, :l][:, ::-1], axis=1).sum(1)  # stored steps before the start
        shift = np.minimum(n_before, length - n_after).clip(0)
        window = l - shift[:, None] + np.arange(length)  # indices into the 2l+1 look-around
        return np.take_along_axis(rows, window, 1), envs, np.take_along_axis(same, window, 1)

    def draw_starts(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Start rows and envs (B,), uniform over stored timesteps with a successor: candidates are drawn over all stored
        timesteps and those with none (rollout ends, the write heads) drawn again."""
        envs = np.empty(batch_size, dtype=np.int64)
        starts = np.empty(batch_size, dtype=np.int64)
        todo = np.arange(batch_size)
        cum = np.cumsum(self.size)
        for _ in range(100):
            flat = rng.integers(0, cum[-1], size=len(todo))
            e = np.searchsorted(cum, flat, side="right")
            k = flat - np.concatenate([[0], cum[:-1]])[e]
            # row k-th oldest in column e: columns not yet wrapped start at row 0
            s = np.where(self.size[e] < self.rows, k, (self.ptr[e] + k) % self.rows)
            ok = self._same_rollout(((s + 1) % self.rows)[:, None], e[:, None], s, np.ones((1,), np.int64))[:, 0]
            envs[todo], starts[todo] = e, s
            todo = todo[~ok]
            if len(todo) == 0:
                break
        else:
            raise RuntimeError("replay buffer holds no timestep with a successor: collect more data before sampling")
        return starts, envs

    def draw_starts_by_rollout(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Start rows and envs (B,): a stored rollout uniformly (among those with a timestep that has a successor), then
        one of its timesteps with a successor uniformly. Rollout ids are unique across envs, so a rollout is its id."""
        if self.rollout_index is None or self.rollout_index[0] != self.version:
            rid, t = self.data["rollout_id"], self.data["time"]  # (rows, E)
            has_next = (rid >= 0) & (np.roll(rid, -1, 0) == rid) & (np.roll(t, -1, 0) == t + 1)  # the next row continues
            flat = np.flatnonzero(has_next)  # candidate starts, row-major over (rows, E)
            order = np.argsort(rid.ravel()[flat], kind="stable")  # grouped by rollout
            _, first, count = np.unique(rid.ravel()[flat[order]], return_index=True, return_counts=True)
            self.rollout_index = (self.version, flat[order], first, count)
        _, candidates, first, count = self.rollout_index
        if len(count) == 0:
            raise RuntimeError("replay buffer holds no timestep with a successor: collect more data before sampling")
        rollout = rng.integers(0, len(count), size=batch_size)
        pick = candidates[first[rollout] + (rng.random(batch_size) * count[rollout]).astype(np.int64)]
        return pick // self.num_envs, pick % self.num_envs

    def gather(self, rows: np.ndarray, envs: np.ndarray, mask: np.ndarray) -> dict:
        """The fields at the drawn windows (vectorised indexing; frames decoded chunk by chunk), mask: real data."""
        batch = {}
        for name in self.names:
            if name in self.frames:
                batch[name] = self.frames[name].read(rows, envs[:, None])  # (B, length, *shape)
            else:
                batch[name] = self.data[name][rows, envs[:, None]]  # (B, length, ...)
        batch["mask"] = mask  # (B, length): real data of the same rollout
        return batch

    # ---- save / load for resume ----
    def save(self, folder: str):
        """An atomic snapshot in `folder`: written to `folder`.tmp, then renamed, so a crash never leaves a half-written
        snapshot under its final name. RAM buffers write their arrays; memory-mapped ones flush (they live on disk)."""
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, arr in self.data.items():
            if self.path is None:
                np.save(os.path.join(tmp, f"{name}.npy"), arr)
            else:
                arr.flush()
        for name, frames in self.frames.items():
            frames.flush()  # each env's open chunk too: a loaded buffer reads every chunk from its store
            if self.path is None:
                frames.store.save(os.path.join(tmp, name))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"ptr": self.ptr.tolist(), "size": self.size.tolist(), "next_rollout_id": self.next_rollout_id}, f)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)

    def load(self, folder: str):
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
        if self.path is None:
            for name in self.data:
                self.data[name][:] = np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
            for name, frames in self.frames.items():
                frames.store.load(os.path.join(folder, name))
        self.ptr, self.size = np.array(state["ptr"]), np.array(state["size"])
        self.next_rollout_id = state["next_rollout_id"]
        self.version += 1
        if self.path is not None:
            self.drop_rows_after_checkpoint()
        for frames in self.frames.values():
            frames.staged[:] = -1  # nothing staged: the next write to a chunk reads it back from the store
        self.next_check = (self.num_timesteps() // self.check_every + 1) * self.check_every

    def drop_rows_after_checkpoint(self):
        """A memory-mapped buffer may hold rows written after the checkpoint, and the open chunk of a killed run never
        reached its store: mark them never written. They are the rollouts begun after the checkpoint and the rest of
        each env's rollout that was open at it (its rows past the env's write head)."""
        rid, t = self.data["rollout_id"], self.data["time"]
        last = (self.ptr - 1) % self.rows  # each env's last row at the checkpoint
        envs = np.arange(self.num_envs)
        open_rid = np.where(self.size > 0, rid[last, envs], -1)
        later = (rid >= self.next_rollout_id) | ((rid == open_rid) & (open_rid >= 0) & (t > t[last, envs]))
        rid[later] = -1

    @staticmethod
    def remove_snapshots(parent: str, keep: str):
        """Delete every snapshot folder in `parent` except `keep` (called once the checkpoint naming `keep` is committed)."""
        for name in os.listdir(parent):
            if name.startswith("buffer-") and name != keep:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


class Frames:
    """One image field, compressed: each env's column in chunks of CHUNK rows, one zstd frame per chunk. The chunk an
    env is writing stays raw in `stage` until the env moves on; its stored copy, if any, is then stale."""

    def __init__(self, shape: tuple, num_envs: int, store):
        self.shape, self.num_envs, self.store = tuple(shape), num_envs, store
        self.stage = np.zeros((num_envs, CHUNK, *shape), np.uint8)  # each env's open chunk
        self.staged = np.full(num_envs, -1)  # the chunk index each env's stage holds (-1: none)
        self.compressor = zstandard.ZstdCompressor(level=LEVEL)

    def keys(self, chunks: np.ndarray, envs: np.ndarray) -> np.ndarray:
        return chunks * self.num_envs + envs

    def write(self, rows: np.ndarray, envs: np.ndarray, frames: np.ndarray):
        """frames (len(envs), *shape) at each env's row."""
        chunks = rows // CHUNK
        moved = self.staged[envs] != chunks
        if moved.any():  # these envs enter a new chunk: store the one they leave, stage the one they enter
            e, c = envs[moved], chunks[moved]
            self.flush(e)
            # CRUCIAL: load what the chunk held: once the ring has wrapped, its rows past the write head are live data
            self.stage[e] = self.decode(self.keys(c, e))
            self.staged[e] = c
        self.stage[envs, rows % CHUNK] = frames

    def flush(self, envs: np.ndarray | None = None):
        """Compress these envs' open chunks into the store (they stay staged)."""
        envs = np.arange(self.num_envs) if envs is None else envs
        envs = envs[self.staged[envs] >= 0]
        self.store.put(self.keys(self.staged[envs], envs), [self.compressor.compress(self.stage[e]) for e in envs])

    def decode(self, keys: np.ndarray, out: np.ndarray | None = None, where: np.ndarray | None = None) -> np.ndarray:
        """The stored chunks (len(keys), CHUNK, *shape), zeros where none was stored yet (as an empty buffer reads);
        with `out`, written to out[where] instead."""
        if out is None:
            out, where = np.empty((len(keys), CHUNK, *self.shape), np.uint8), np.arange(len(keys))
        decompressor = zstandard.ZstdDecompressor()  # one per call: the prefetch thread has its own
        for i, blob in zip(where.tolist(), self.store.get(keys)):
            if blob is None:
                out[i] = 0
            else:
                out[i] = np.frombuffer(decompressor.decompress(blob), np.uint8).reshape(out.shape[1:])
        return out

    def read(self, rows: np.ndarray, envs: np.ndarray) -> np.ndarray:
        """Frames at rows (B, L) of envs (B, 1) -> (B, L, *shape), each chunk decoded once."""
        rows, envs = np.broadcast_arrays(rows, envs)
        keys, inverse = np.unique(self.keys(rows // CHUNK, envs), return_inverse=True)
        staged = np.isin(keys, self.keys(self.staged, np.arange(self.num_envs))[self.staged >= 0])
        chunks = np.empty((len(keys), CHUNK, *self.shape), np.uint8)  # (U, CHUNK, *shape)
        chunks[staged] = self.stage[keys[staged] % self.num_envs]
        self.decode(keys[~staged], chunks, np.flatnonzero(~staged))
        return chunks[inverse.reshape(rows.shape), rows % CHUNK]


class BlobsInRam:
    """Compressed chunks as bytes in an object array, indexed by key = chunk * num_envs + env (None: not stored)."""

    def __init__(self, num_chunks: int, num_envs: int):
        self.blobs = np.full(num_chunks * num_envs, None, dtype=object)
        self.total = 0  # bytes Python holds for all blobs (sys.getsizeof: the data and the object's header)

    def get(self, keys: np.ndarray) -> list:
        return self.blobs[keys].tolist()

    def put(self, keys: np.ndarray, blobs: list):
        for key, blob in zip(keys.tolist(), blobs):  # one by one: numpy would turn a list of bytes into np.bytes_
            old = self.blobs[key]
            self.total += sys.getsizeof(blob) - (0 if old is None else sys.getsizeof(old))
            self.blobs[key] = blob

    def nbytes(self) -> int:
        return self.total

    def save(self, prefix: str):
        """prefix.sizes.npy (bytes per key, -1: none) and prefix.zst (the blobs back to back), one blob at a time."""
        sizes = np.array([-1 if b is None else len(b) for b in self.blobs], np.int64)
        np.save(prefix + ".sizes.npy", sizes)
        with open(prefix + ".zst", "wb") as f:
            f.writelines(b for b in self.blobs if b is not None)

    def load(self, prefix: str):
        sizes = np.load(prefix + ".sizes.npy")
        self.blobs[:] = None
        with open(prefix + ".zst", "rb") as f:
            for key in np.flatnonzero(sizes >= 0).tolist():
                self.blobs[key] = f.read(sizes[key])
        self.total = sum(sys.getsizeof(b) for b in self.blobs if b is not None)


class BlobsOnDisk:
    """The same in an SQLite file (Python's sqlite3), which reuses the pages of replaced chunks. Write-ahead log with
    synchronous=NORMAL: what was written survives a killed process (not a power cut), as memory-mapped pages do."""

    def __init__(self, path: str, name: str):
        self.file = os.path.join(path, f"{name}.sqlite")
        try:
            self.db = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False)  # autocommit
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS chunks (key INTEGER PRIMARY KEY, blob BLOB NOT NULL)")
        except sqlite3.Error as e:  # an unwritable folder: the same error as the memory-mapped arrays give
            raise OSError(13, str(e), self.file) from e
        self.lock = threading.Lock()  # the prefetch thread reads while the main thread may write

    def get(self, keys: np.ndarray) -> list:
        found = {}
        with self.lock:
            for i in range(0, len(keys), 500):  # SQLite caps the parameters of one statement
                part = keys[i : i + 500].tolist()
                query = f"SELECT key, blob FROM chunks WHERE key IN ({','.join('?' * len(part))})"
                found.update(self.db.execute(query, part))
        return [found.get(k) for k in keys.tolist()]

    def put(self, keys: np.ndarray, blobs: list):
        with self.lock:
            self.db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?)", zip(keys.tolist(), blobs))

    def nbytes(self) -> int:
        """The file and its write-ahead log: what the chunks really take on disk."""
        return sum(os.path.getsize(f) for f in (self.file, self.file + "-wal") if os.path.exists(f))


def trim_padding(batch: dict) -> dict:
    """Drop the trailing timesteps that no window of the batch reaches (padding past every window's rollout end).

    Exact: the Transformer is causal, so no real timestep attends to them, and every loss and statistic is masked.
    Short rollouts (POPGym one-shot: ~270-480 steps at context 600) otherwise spend most of an update on padding.
    """
    length = int(np.flatnonzero(batch["mask"].any(0)).max()) + 1
    return {name: x[:, :length] for name, x in batch.items()}


class Prefetcher:
    """Sampling off the critical path: while the caller trains on one batch, a background thread gathers (decodes) the
    next. The draws stay in the caller's thread, in the order of plain `buffer.sample` calls: the same batches, with or
    without it. zstd and SQLite release the GIL while they work."""

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-prefetch")
        self.pending_rng_state = None  # the generator's state before the draw of a batch not yet handed out

    def batches(self, n: int, batch_size: int, length: int, rng: np.random.Generator):
        """Yields n batches, equal to n successive buffer.sample(batch_size, length, rng). Batch i + 1 is drawn before
        batch i is handed out, so inside the loop the caller must neither draw from `rng` nor add to the buffer. A loop
        left early gives that draw back: `rng` is where n plain sample calls up to there would have left it."""
        pending = None
        try:
            for i in range(n):
                current = self.submit(batch_size, length, rng) if pending is None else pending
                pending = self.submit(batch_size, length, rng) if i + 1 < n else None
                if pending is None:
                    self.pending_rng_state = None
                yield current.result()
        finally:
            if pending is not None:  # left early
                pending.cancel() or pending.exception()  # never leave the thread reading the buffer
                rng.bit_generator.state = self.pending_rng_state
            self.pending_rng_state = None

    def submit(self, batch_size: int, length: int, rng: np.random.Generator):
        self.pending_rng_state = rng.bit_generator.state
        return self.pool.submit(self.buffer.gather, *self.buffer.draw(batch_size, length, rng))

    def rng_state(self, rng: np.random.Generator) -> dict:
        """The generator state to checkpoint from inside the loop: from before the draw of the batch still pending."""
        return self.pending_rng_state or rng.bit_generator.state
