"""Sequence replay buffer: env steps in DreamerV3's step layout (see `envs/episodes.py`), sampled as
fixed-length segments of one episode each for world-model and actor-critic training.

Training samples (`pad=True`) start uniformly at any stored step, as IRIS samples them: a segment that runs past
its episode's last stored step repeats that step and marks the rest invalid (`valid` `b t`), and the losses skip
invalid steps. Segments that had to fit inside their episode would put every episode end at the segment's last
position, reach each terminal step once instead of once per start position, and never reach an episode shorter
than the segment; a world model with absolute time embeddings then learns to end episodes only at that position,
which imagination, starting at position 0, never reaches.

Storage: one preallocated ring array of `capacity` steps per key, written in arrival order, so the steps
of several online workers interleave in the ring. Each stored episode owns a slot that lists the ring
indices of its steps in order (`_index[slot][lo:hi]`); a segment is a window of that list, gathered for a
whole batch with one fancy index per key. When the ring is full the oldest step is overwritten; it is
always the oldest stored step of its episode, so eviction only advances that episode's `lo`, and no
segment can reach an overwritten step or run into another episode.

The ring arrays live in host memory (numpy) by default, or as torch tensors on a device (`device=`): on a GPU
the batch is then gathered where it is trained on instead of being gathered on the host and copied over for
every update. The bookkeeping and the sampling RNG are the same either way, so both draw the same segments.
"""
from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

from envs.errors import DataError
from envs.episodes import STEP_DTYPES, STEP_KEYS
from world_model.rundir import atomic_write

Spec = dict[str, tuple[tuple[int, ...], np.dtype]]
UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)  # what np.load raises on a bad .npz
STEP_SPEC: Spec = {k: ((), np.dtype(STEP_DTYPES[k])) for k in STEP_KEYS}


def _full_spec(spec: dict) -> Spec:
    """The observation spec normalized to (shape tuple, np.dtype), plus the step keys every buffer stores."""
    if "valid" in spec:
        raise ValueError("'valid' is a replay sample's own key (padded steps are not valid): name the observation "
                         "otherwise")
    out = {k: (tuple(int(d) for d in shape), np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
    for k, v in STEP_SPEC.items():
        if out.setdefault(k, v) != v:
            raise ValueError(f"spec[{k!r}] = {out[k]} conflicts with the step layout's {v}")
    return out


class ReplayBuffer:
    """Ring buffer of `capacity` steps that samples `b t ...` segments of one episode each (see `sample`).
    `device`: None keeps the steps in numpy arrays (samples are numpy); a torch device keeps them in tensors
    there (samples are tensors on it)."""

    def __init__(self, capacity: int, spec: dict, seed: int = 0, device: Union[str, torch.device, None] = None):
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"replay capacity must be a whole number of steps, at least 1, got {capacity}")
        self.capacity = int(capacity)
        self.spec = _full_spec(spec)
        self.rng = np.random.default_rng(seed)
        self.device = None if device is None else torch.device(device)
        if self.device is None:
            self.data = {k: np.zeros((self.capacity, *shape), dtype) for k, (shape, dtype) in self.spec.items()}
        else:
            self.data = {k: torch.zeros((self.capacity, *shape), dtype=_torch_dtype(dtype), device=self.device)
                         for k, (shape, dtype) in self.spec.items()}
        self.steps_added = 0
        self._pos = 0  # next ring index to write
        self._size = 0
        self._slot_of = np.full(self.capacity, -1, np.int64)  # episode slot of each ring step
        self._index: list[np.ndarray] = []  # per slot: ring indices of its steps, stored ones in [lo, hi)
        self._lo = np.zeros(0, np.int64)
        self._hi = np.zeros(0, np.int64)
        self._open = np.zeros(0, bool)  # slot is some worker's episode in progress
        self._nslots = 0
        self._free: list[int] = []  # slots of fully evicted, finished episodes, reused last-in first-out
        self._workers: dict[int, int] = {}  # worker -> slot of its episode in progress
        self._written = 0  # steps ever written into the ring: step w sits at ring index w % capacity
        self._chunks: list[tuple[int, int, str]] = []  # chunked saves: (first, end) written-step range, file name
        self._saved = 0  # self._written at the last chunked save
        self._lineage = uuid.uuid4().hex[:8]  # in chunk names: a merged or fresh buffer never reuses another's

    def __len__(self) -> int:
        return self._size

    @property
    def num_episodes(self) -> int:
        """Episodes (finished or in progress) with at least one stored step."""
        n = self._nslots
        return int(np.count_nonzero(self._hi[:n] > self._lo[:n]))

    # ---- adding -------------------------------------------------------------------------------------

    def add(self, step: dict, worker: int = 0) -> None:
        """Append one step of `worker`'s stream; `is_first` (or no episode open) starts a new episode."""
        self._add_rows(self._check(step, batched=False), [worker])

    def add_steps(self, steps: dict, workers) -> None:
        """Append one step for each of `workers` (arrays `n ...`, row i is worker i's next step), exactly as n
        calls of `add` in row order would, with one copy per key into the ring."""
        self._add_rows(self._check(steps, batched=True), list(workers))

    def _add_rows(self, arrays: dict[str, np.ndarray], workers: list) -> None:
        n = len(arrays["action"])
        if len(workers) != n:
            raise ValueError(f"replay add_steps: {n} steps for {len(workers)} workers")
        if n > self.capacity:
            raise ValueError(f"replay add_steps: {n} steps at once exceed the capacity of {self.capacity}")
        data, pos = self._staged(arrays), self._pos
        for i, worker in enumerate(workers):
            slot = self._workers.get(worker)
            if slot is None or arrays["is_first"][i]:
                if slot is not None:
                    self._close(worker)
                slot = self._workers[worker] = self._new_slot(open_=True)
            self._reserve(1, slot)
            if arrays["is_last"][i]:
                self._close(worker)
        self._copy_in(data, pos)

    def add_episode(self, episode: dict) -> None:
        """Store a whole episode (arrays `t ...`); an `is_first` inside it starts a separate episode."""
        arrays = self._check(episode, batched=True)
        cuts = [0, *(np.flatnonzero(arrays["is_first"][1:]) + 1).tolist(), len(arrays["action"])]
        for a, b in zip(cuts[:-1], cuts[1:]):
            keep = max(a, b - self.capacity)  # a piece longer than the ring stores only its newest steps
            self.steps_added += keep - a
            self._write({k: v[keep:b] for k, v in arrays.items()}, self._new_slot(open_=False))

    def episodes(self):
        """The stored episodes (finished or in progress, evicted steps left out) as arrays `t ...`, oldest first."""
        n = self._nslots
        slots = [s for s in range(n) if self._hi[s] > self._lo[s]]
        slots.sort(key=lambda s: (self._index[s][self._lo[s]] - self._pos) % self.capacity)
        for s in slots:
            idx = self._index[s][self._lo[s]:self._hi[s]]
            yield {k: _numpy(v[self._ring_index(idx)]) for k, v in self.data.items()}

    @classmethod
    def merged(cls, buffers: Iterable["ReplayBuffer"], capacity: int, seed: int = 0,
               device: Union[str, torch.device, None] = None, share: Optional[tuple[int, int]] = None
               ) -> "ReplayBuffer":
        """One buffer holding every episode of `buffers` (episodes in progress stored as finished pieces), e.g.
        the shards of a data-parallel run resumed at another world size; `share` (i, n): every n-th episode only,
        from the i-th on (one rank's share of them). `buffers` may be a generator that loads them, so that one
        is held at a time beside the merged buffer."""
        buf, i = None, 0
        for other in buffers:
            if buf is None:
                buf = cls(capacity, {k: v for k, v in other.spec.items() if k not in STEP_KEYS}, seed=seed,
                          device=device)
            for episode in other.episodes():
                if share is None or i % share[1] == share[0]:
                    buf.add_episode(episode)
                i += 1
            del other  # before the generator loads the next one
        return buf

    def _check(self, arrays: dict, batched: bool) -> dict[str, np.ndarray]:
        """Validated arrays with a leading time axis (added for a single step); errors name key and shape."""
        missing = [k for k in self.spec if k not in arrays]
        extra = [k for k in arrays if k not in self.spec]
        if missing or extra:
            raise ValueError(f"replay step keys: missing {missing}, unexpected {extra}; "
                             f"expected {sorted(self.spec)}")
        out, length = {}, None
        for k, (shape, dtype) in self.spec.items():
            v = np.asarray(arrays[k])
            if not batched:
                v = v[None]
            if v.shape[1:] != shape or v.ndim == 0:
                want = f"(t, {', '.join(map(str, shape))})" if batched else str(shape)
                got = v.shape if batched else v.shape[1:]
                raise ValueError(f"replay key {k!r}: expected shape {want}, got {got}")
            if v.dtype.kind in "fc" and dtype.kind in "biu":
                raise ValueError(f"replay key {k!r}: expected {dtype} values, got {v.dtype}")
            if length is not None and len(v) != length:
                raise ValueError(f"replay key {k!r}: {len(v)} steps, but other keys have {length}")
            length = len(v)
            out[k] = v
        if length == 0:
            raise ValueError("replay: cannot add an empty episode")
        if (out["is_terminal"].astype(bool) & ~out["is_last"].astype(bool)).any():
            raise ValueError("replay: a terminal step must also be the episode's last (is_last)")
        return out

    def _new_slot(self, open_: bool) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            if self._nslots == len(self._lo):
                grow = max(16, len(self._lo))
                self._lo = np.concatenate([self._lo, np.zeros(grow, np.int64)])
                self._hi = np.concatenate([self._hi, np.zeros(grow, np.int64)])
                self._open = np.concatenate([self._open, np.zeros(grow, bool)])
                self._index.extend(np.zeros(0, np.int64) for _ in range(grow))
            slot, self._nslots = self._nslots, self._nslots + 1
        self._lo[slot] = self._hi[slot] = 0
        self._open[slot] = open_
        return slot

    def _free_slot(self, slot: int) -> None:
        self._lo[slot] = self._hi[slot] = 0
        self._open[slot] = False
        self._index[slot] = np.zeros(0, np.int64)
        self._free.append(slot)

    def _close(self, worker: int) -> None:
        slot = self._workers.pop(worker)
        self._open[slot] = False
        if self._lo[slot] == self._hi[slot]:
            self._free_slot(slot)

    def _write(self, arrays: dict[str, np.ndarray], slot: int) -> None:
        """Write `n <= capacity` steps of one episode at the ring head, evicting the oldest steps first."""
        data, pos = self._staged(arrays), self._pos
        self._reserve(len(arrays["action"]), slot)
        self._copy_in(data, pos)

    def _reserve(self, n: int, slot: int) -> None:
        """The bookkeeping of writing `n <= capacity` steps of `slot`'s episode at the ring head: evict the
        steps there, give the ring indices to the slot and advance the head. The data is copied by `_copy_in`."""
        pos = self._pos
        ring = (pos + np.arange(n)) % self.capacity
        old = self._slot_of[ring]
        old = old[old >= 0]
        if len(old):
            slots, counts = (old, 1) if len(old) == 1 else np.unique(old, return_counts=True)
            self._lo[slots] += counts
            for s in slots[(self._lo[slots] == self._hi[slots]) & ~self._open[slots]].tolist():
                self._free_slot(s)
        self._slot_of[ring] = slot
        self._append_index(slot, ring)
        self._pos = (self._pos + n) % self.capacity
        self._size = min(self._size + n, self.capacity)
        self.steps_added += n
        self._written += n

    def _staged(self, arrays: dict[str, np.ndarray]) -> dict:
        """The arrays in the storage's kind (tensors on its device), made before any bookkeeping changes, so a
        failed copy (out of device memory) leaves the buffer as it was."""
        if self.device is None:
            return arrays
        return {k: torch.from_numpy(np.ascontiguousarray(v, self.spec[k][1])).to(self.device) for k, v in arrays.items()}

    def _copy_in(self, data: dict, pos: int) -> None:
        """Copy `n <= capacity` staged steps into the ring from index `pos` on (wrapping); slices copy faster
        than indices."""
        n = len(data["action"])
        head = min(n, self.capacity - pos)  # steps before the ring wraps
        for k, v in data.items():
            self.data[k][pos:pos + head] = v[:head]
            self.data[k][:n - head] = v[head:]

    def _ring_index(self, idx: np.ndarray):
        """Ring indices in the storage's kind: numpy as is, a tensor on the storage's device."""
        return idx if self.device is None else torch.from_numpy(idx).to(self.device)

    def _append_index(self, slot: int, ring: np.ndarray) -> None:
        """Append ring indices to a slot's list, reallocating (and dropping evicted entries) when full."""
        lo, hi, buf = int(self._lo[slot]), int(self._hi[slot]), self._index[slot]
        if hi + len(ring) > len(buf):
            live = buf[lo:hi]
            buf = np.empty(2 * (len(live) + len(ring)), np.int64)
            buf[:len(live)] = live
            self._index[slot], lo, hi = buf, 0, len(live)
        buf[hi:hi + len(ring)] = ring
        self._lo[slot], self._hi[slot] = lo, hi + len(ring)

    # ---- sampling -----------------------------------------------------------------------------------

    def longest_episode(self) -> int:
        """Steps held of the longest stored episode: `sample` needs a length up to this."""
        stored = self._hi[:self._nslots] - self._lo[:self._nslots]
        return int(stored.max()) if len(stored) else 0

    def sample(self, batch: int, length: int, rng: Optional[np.random.Generator] = None, pad: bool = False) -> dict:
        """`batch` segments of `length` steps: numpy arrays `b t ...`, or tensors on the buffer's device.

        Without `pad`, uniform over every start that keeps a segment within one episode (evaluation windows, which
        must be whole). With `pad` (training), uniform over every stored step as the start: a segment that reaches
        its episode's last stored step repeats it, and `valid` `b t` (bool) marks the steps before that. `rng`: draw
        from it instead of the buffer's own stream (evaluations and pictures, which must not shift training's
        samples)."""
        if batch < 1 or length < 1:
            raise ValueError(f"replay sample needs batch >= 1 and length >= 1, got {batch} and {length}")
        stored = self._hi[:self._nslots] - self._lo[:self._nslots]  # per slot
        starts = stored if pad else np.maximum(stored - length + 1, 0)
        cum = np.cumsum(starts)
        if not len(cum) or cum[-1] == 0:
            longest = int(stored.max()) if len(stored) else 0
            raise ValueError(f"replay holds no segment of {length} steps: {self._size} steps stored, "
                             f"longest stored episode has {longest}")
        r = (rng or self.rng).integers(cum[-1], size=batch)
        slots = np.searchsorted(cum, r, side="right")
        first = r - (cum[slots] - starts[slots]) + self._lo[slots]
        rows = [self._index[s][o:min(o + length, hi)] for s, o, hi in zip(slots.tolist(), first.tolist(),
                                                                           self._hi[slots].tolist())]
        idx = np.stack([np.pad(row, (0, length - len(row)), mode="edge") for row in rows])  # b t
        ring = self._ring_index(idx)
        out = {k: v[ring] for k, v in self.data.items()}
        if pad:
            valid = np.arange(length) < np.array([len(row) for row in rows])[:, None]  # b t
            out["valid"] = valid if self.device is None else torch.from_numpy(valid).to(self.device)
        return out

    # ---- persistence --------------------------------------------------------------------------------

    def save(self, path: Union[str, Path], chunks: Optional[str] = None) -> list[str]:
        """Write the stored steps, episode bookkeeping and RNG state to `path` (atomic: synced, then renamed; a
        failed write, e.g. a full disk, leaves no temporary file). Without `chunks`: one self-contained `.npz`.
        With `chunks` (a file-name prefix, e.g. "rank0"): incremental, for checkpoints. The steps written since
        this buffer's last chunked save go to new chunk files beside `path` (one per contiguous ring range), and
        `path` holds the bookkeeping and the names of the chunks still holding live steps, so a checkpoint writes
        what is new instead of the whole ring. Returns the files `path` needs, itself first (names in its
        folder), so a caller can delete the others."""
        path, n = Path(path), self._nslots
        chunk_list = self._chunks
        if chunks is not None:
            chunk_list = self._chunks + self._write_chunks(path.parent, chunks)
            chunk_list = [c for c in chunk_list if c[1] > self._written - self.capacity]  # others fully overwritten
        meta = {"version": 2, "capacity": self.capacity, "pos": self._pos, "size": self._size,
                "steps_added": self.steps_added, "written": self._written, "nslots": n, "free": self._free,
                "workers": [[int(w), s] for w, s in self._workers.items()],
                "spec": {k: [list(shape), dtype.str] for k, (shape, dtype) in self.spec.items()},
                "rng": self.rng.bit_generator.state}
        if chunks is not None:
            meta.update(chunks=[list(c) for c in chunk_list], lineage=self._lineage)
            arrays = {}
        else:
            arrays = {f"data/{k}": v[:self._size] for k, v in self.data.items()}  # tensors on a device stay there
        index = [self._index[s][self._lo[s]:self._hi[s]] for s in range(n)]
        arrays.update(meta=np.array(json.dumps(meta)), slot_of=self._slot_of[:self._size],
                      ep_len=self._hi[:n] - self._lo[:n], ep_open=self._open[:n],
                      ep_index=np.concatenate([np.zeros(0, np.int64), *index]))
        atomic_write(path, lambda f: _write_npz(f, arrays))
        if chunks is None:
            return [path.name]
        self._chunks, self._saved = chunk_list, self._written
        return [path.name, *(c[2] for c in chunk_list)]

    def _write_chunks(self, folder: Path, prefix: str) -> list[tuple[int, int, str]]:
        """The steps written since the last chunked save (at most the ring's worth), as files of contiguous ring
        rows named by their written-step range: `{prefix}-{lineage}-{first:012d}-{end:012d}.npz`."""
        new, first = [], max(self._saved, self._written - self.capacity)
        while first < self._written:
            start = first % self.capacity
            end = min(self._written, first + self.capacity - start)  # up to the end of the ring
            name = f"{prefix}-{self._lineage}-{first:012d}-{end:012d}.npz"
            rows = {f"data/{k}": v[start:start + end - first] for k, v in self.data.items()}
            atomic_write(folder / name, lambda f, rows=rows: _write_npz(f, rows))
            new.append((first, end, name))
            first = end
        return new

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device, None] = None) -> "ReplayBuffer":
        """The buffer `save` wrote, down to the sampling RNG and the workers' episodes in progress (stored on
        `device` as in `__init__`, whichever storage wrote it)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no replay buffer file at {path}")
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                spec = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in meta["spec"].items()}
                buf = cls(meta["capacity"], spec, device=device)
                size, n = meta["size"], meta["nslots"]
                if "chunks" in meta:
                    buf._read_chunks(path.parent, meta)
                else:
                    for k in spec:  # one key in host memory at a time, beside the ring
                        data = f[f"data/{k}"]
                        buf.data[k][:size] = data if device is None else torch.from_numpy(data)
                        del data
                arrays = {k: f[k] for k in ("slot_of", "ep_len", "ep_open", "ep_index")}
            buf._slot_of[:size] = arrays["slot_of"]
            buf._pos, buf._size, buf.steps_added = meta["pos"], size, meta["steps_added"]
            # a self-contained file (or version 1) restarts the chunk ranges: its first chunked save writes it all
            buf._written = meta.get("written", meta["pos"] + (meta["capacity"] if size == meta["capacity"] else 0))
            buf._lo, buf._hi = np.zeros(n, np.int64), arrays["ep_len"].astype(np.int64)
            buf._open, buf._nslots = arrays["ep_open"].astype(bool), n
            buf._index = np.split(arrays["ep_index"].astype(np.int64), np.cumsum(buf._hi)[:-1]) if n else []
            buf._free = [int(s) for s in meta["free"]]
            buf._workers = {w: int(s) for w, s in meta["workers"]}
            state = meta["rng"]
            buf.rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
            buf.rng.bit_generator.state = state
        except (*UNREADABLE, TypeError, AttributeError) as e:
            raise DataError(f"{path} is not a readable replay buffer ({type(e).__name__}: {e})") from None
        return buf

    def _read_chunks(self, folder: Path, meta: dict) -> None:
        """Fill the ring from a chunked save's files, oldest first, so newer rows overwrite older ones."""
        for first, end, name in meta["chunks"]:
            start = first % self.capacity
            try:
                with np.load(folder / name, allow_pickle=False) as f:
                    for k in self.spec:
                        rows = f[f"data/{k}"]
                        if len(rows) != end - first:
                            raise ValueError(f"it holds {len(rows)} steps of {k!r}, not {end - first}")
                        self.data[k][start:start + len(rows)] = rows if self.device is None else torch.from_numpy(rows)
            except UNREADABLE as e:
                raise ValueError(f"its chunk {folder / name} is missing or damaged: {type(e).__name__}: {e}") from None
        self._chunks = [(int(a), int(b), str(c)) for a, b, c in meta["chunks"]]
        self._saved, self._lineage = meta["written"], meta["lineage"]


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype)).dtype


def _numpy(v) -> np.ndarray:
    return v.cpu().numpy() if isinstance(v, torch.Tensor) else v


SAVE_CHUNK_BYTES = 256 * 2**20  # a device-stored key is copied to the host this much at a time when saved


def _write_npz(f, arrays: dict) -> None:
    """What `np.savez(f, **arrays)` writes (uncompressed `.npy` members), except that a tensor is copied to the
    host in chunks of about SAVE_CHUNK_BYTES, so saving a GPU-resident ring never holds a host copy of it."""
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, v in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                if not isinstance(v, torch.Tensor):
                    np.lib.format.write_array(member, np.asarray(v), allow_pickle=False)
                    continue
                dtype = np.dtype(_numpy(v[:0]).dtype)
                np.lib.format.write_array_header_2_0(
                    member, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(v.shape)})
                rows = max(1, SAVE_CHUNK_BYTES // max(1, v[:1].numel() * dtype.itemsize))
                for chunk in v.split(rows):
                    member.write(_numpy(chunk.contiguous()))  # the host copy's buffer, not a second copy

