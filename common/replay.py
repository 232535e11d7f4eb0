"""Replay buffer of meta-rollout timesteps (paper App. B: sequences of l + 1 timesteps that never cross a meta-rollout).

Layout: every parallel env owns one ring column of `capacity // num_envs` rows, so a meta-rollout is
stored contiguously in its env's column and one env step is one fancy-indexed write for all envs.
Each row is one timestep; alongside the benchmark's fields we keep the rollout id and the absolute
time index, which is all that is needed to find rollout boundaries: two rows belong to the same
window iff they have the same rollout id and consecutive time indices. That rule also holds across
the ring's wrap point and after a resume, so no other bookkeeping is required.
"""

import json
import os
import shutil

import numpy as np


def available_ram_bytes() -> int:
    """Free physical memory now (Linux); used to refuse a RAM buffer that cannot fit."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ReplayBuffer:
    """Capacity counted in timesteps (the paper's Table 1 unit), dtypes kept as given (uint8 frames stay uint8).

    fields: name -> (shape, dtype) of one timestep. With `path`, arrays are memory-mapped files in
    that folder (for large image buffers) and survive the process; otherwise they live in RAM.
    """

    def __init__(self, fields: dict, capacity: int, num_envs: int, path: str | None = None):
        self.rows, self.num_envs, self.path = capacity // num_envs, num_envs, path
        if self.rows < 2:
            raise ValueError(f"replay capacity {capacity} gives fewer than 2 timesteps per env for {num_envs} envs")
        fields = dict(fields, rollout_id=((), np.int64), time=((), np.int64))
        self.nbytes = sum(self.rows * num_envs * int(np.prod(s)) * np.dtype(d).itemsize for s, d in fields.values())
        if path is None and self.nbytes > available_ram_bytes():
            raise MemoryError(
                f"the replay buffer needs {self.nbytes / 2**30:.1f} GiB of RAM but only "
                f"{available_ram_bytes() / 2**30:.1f} GiB is free: lower the buffer size or keep it on disk with --buffer-dir"
            )
        if path is not None:
            os.makedirs(path, exist_ok=True)
            on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            free = shutil.disk_usage(path).free + on_disk  # memory-mapped files fill in as the buffer does
            if self.nbytes > free:
                raise MemoryError(
                    f"the replay buffer needs {self.nbytes / 2**30:.1f} GiB on disk but {path} has only "
                    f"{free / 2**30:.1f} GiB free: lower the buffer size or choose another --buffer-dir"
                )
        self.data = {}
        for name, (shape, dtype) in fields.items():
            full_shape = (self.rows, num_envs, *shape)
            if path is None:
                self.data[name] = np.zeros(full_shape, dtype=dtype)
            else:
                file = os.path.join(path, f"{name}.npy")
                mode = "r+" if os.path.exists(file) else "w+"
                self.data[name] = np.lib.format.open_memmap(file, mode=mode, dtype=dtype, shape=full_shape)
        if path is None or mode == "w+":
            self.data["rollout_id"][:] = -1  # -1 marks a row never written
        self.ptr = np.zeros(num_envs, dtype=np.int64)  # next row to write, per env
        self.size = np.zeros(num_envs, dtype=np.int64)  # rows written so far (<= rows), per env
        self.next_rollout_id = 0

    def footprint(self) -> str:
        where = f"memory-mapped in {self.path}" if self.path else "in RAM"
        return f"replay buffer: {self.rows * self.num_envs:,} timesteps, {self.nbytes / 2**30:.2f} GiB {where}"

    def new_rollout_ids(self, n: int) -> np.ndarray:
        ids = np.arange(self.next_rollout_id, self.next_rollout_id + n)
        self.next_rollout_id += n
        return ids

    def add(self, step: dict, envs: np.ndarray | None = None):
        """Write one timestep for each env in `envs` (default all): step[name] has shape (len(envs), ...)."""
        envs = np.arange(self.num_envs) if envs is None else envs
        rows = self.ptr[envs]
        for name, value in step.items():
            self.data[name][rows, envs] = value
        self.ptr[envs] = (rows + 1) % self.rows
        self.size[envs] = np.minimum(self.size[envs] + 1, self.rows)

    def _same_rollout(self, rows: np.ndarray, envs: np.ndarray, anchor: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(B, K) bool: row (anchor + offset) holds the same rollout as the anchor, `offset` steps later."""
        rid, t = self.data["rollout_id"][rows, envs], self.data["time"][rows, envs]
        rid0, t0 = self.data["rollout_id"][anchor, envs[:, 0]], self.data["time"][anchor, envs[:, 0]]
        return (rid == rid0[:, None]) & (t == t0[:, None] + offsets) & (rid0[:, None] >= 0)

    def num_timesteps(self) -> int:
        return int(self.size.sum())

    def sample(self, batch_size: int, length: int, rng: np.random.Generator) -> dict:
        """`batch_size` windows of `length` timesteps that never cross a rollout boundary.

        A start timestep is drawn uniformly among stored timesteps that have a successor, then moved
        back (never before its rollout's first stored step) so the window is as full as the rollout
        allows. Rows past the rollout's end are padding: returned as they are, with mask False.
        """
        l = length - 1
        # draw candidate starts, redraw those with no successor (rollout ends, the write heads)
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
        # look l steps back and l steps ahead to move the start back if the rollout ends early
        offsets = np.arange(-l, l + 1)
        rows = (starts[:, None] + offsets) % self.rows
        same = self._same_rollout(rows, envs[:, None], starts, offsets)  # (B, 2l+1)
        n_after = np.cumprod(same[:, l:], axis=1).sum(1)  # steps from the start to the rollout end (incl.)
        n_before = np.cumprod(same[:, :l][:, ::-1], axis=1).sum(1)  # stored steps before the start
        shift = np.minimum(n_before, length - n_after).clip(0)
        window = l - shift[:, None] + np.arange(length)  # indices into the 2l+1 look-around
        rows = np.take_along_axis(rows, window, 1)
        batch = {name: arr[rows, envs[:, None]] for name, arr in self.data.items()}
        batch["mask"] = np.take_along_axis(same, window, 1)  # (B, length): real data of the same rollout
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
        self.ptr, self.size = np.array(state["ptr"]), np.array(state["size"])
        # a memory-mapped buffer may hold rows written after the checkpoint: never reuse their ids
        self.next_rollout_id = max(state["next_rollout_id"], int(self.data["rollout_id"].max()) + 1)

    @staticmethod
    def remove_snapshots(parent: str, keep: str):
        """Delete every snapshot folder in `parent` except `keep` (called once the checkpoint naming `keep` is committed)."""
        for name in os.listdir(parent):
            if name.startswith("buffer-") and name != keep:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def trim_padding(batch: dict) -> dict:
    """Drop the trailing timesteps that no window of the batch reaches (padding past every window's rollout end).

    Exact: the Transformer is causal, so no real timestep attends to them, and every loss and statistic is masked.
    Short rollouts (POPGym one-shot: ~270-480 steps at context 600) otherwise spend most of an update on padding.
    """
    length = int(np.flatnonzero(batch["mask"].any(0)).max()) + 1
    return {name: x[:, :length] for name, x in batch.items()}
