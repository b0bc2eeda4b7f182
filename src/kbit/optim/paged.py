"""Paged optimizer state on CPU: state tensors in memory-mapped files that the OS pages in and out.

``is_paged=True`` (and every ``Paged*`` class) puts the state tensors of large parameters — ``state1``,
``state2``, ``absmax1``, ``absmax2`` in 8-bit mode, the float32 states in 32-bit mode — in files mapped
with ``MAP_SHARED`` (``torch.from_file(path, shared=True)``). They are ordinary CPU tensors: the fused
kernels update them in place, so a paged optimizer computes exactly what the plain one computes. What
changes is who owns the memory: the pages belong to the page cache of a file, so the kernel can write
them back and drop them under memory pressure (they count as ``RssFile``, not ``RssAnon``), and state
larger than RAM can be trained — at the speed of the disk when it does not fit.

Where the files go (first match): :func:`set_paged_state_dir`, the environment variable
``KBIT_PAGED_DIR``, else a private temporary directory made on first use and removed at exit. Use a
directory on a disk file system: on tmpfs (``/dev/shm``, often ``/tmp``) the pages are shared memory
that can only go to swap, so nothing is gained (a warning says so).

Note [unlinked state files]
Each file is unlinked right after it is mapped. The mapping keeps the inode alive, the kernel still
writes dirty pages back to it, and its blocks are freed the moment the tensor's storage is released
(the optimizer is garbage-collected, or a state is replaced) or the process ends, however it ends:
there is nothing to clean up and no stale file can be picked up by a later run.

Only parameters with at least :data:`PAGED_MIN_NUMEL` elements are paged: each mapping costs at least a
page and one of the kernel's ``vm.max_map_count`` mappings (65530 by default), which is not worth it
for a bias vector. ``step`` and the small vectors (``qmap``, ``unorm_vec``, ``gnorm_vec``) stay in
ordinary memory.

On other devices paging is not implemented: the optimizer says so once (a warning) and keeps its state
in ordinary device memory; the update is the same.
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import shutil
import tempfile
import threading
import warnings

import torch

#: Parameters with fewer elements keep their state in ordinary memory (see the module docstring).
PAGED_MIN_NUMEL = 65536
#: State keys that are paged (the per-element states and their block scales).
PAGED_KEYS = ("state1", "state2", "absmax1", "absmax2")
ENV_VAR = "KBIT_PAGED_DIR"
#: msync flag from <sys/mman.h> (Linux; Python's mmap module does not export it).
_MS_SYNC = 4

_lock = threading.Lock()
_configured_dir: str | None = None
_temp_dir: str | None = None
_tmpfs_warned: set[str] = set()


def set_paged_state_dir(path: str | os.PathLike | None) -> None:
    """Put the files of paged optimizer states created from now on in ``path`` (created if missing).

    ``None`` goes back to ``KBIT_PAGED_DIR`` or the default temporary directory. States that already
    exist keep their files.
    """
    global _configured_dir
    if path is not None:
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
    with _lock:
        _configured_dir = path


def get_paged_state_dir() -> str:
    """The directory new paged state files go to (makes the default temporary one on first use)."""
    global _temp_dir
    with _lock:
        if _configured_dir is not None:
            return _configured_dir
        env = os.environ.get(ENV_VAR)
        if env:
            os.makedirs(env, exist_ok=True)
            return env
        if _temp_dir is None:
            _temp_dir = tempfile.mkdtemp(prefix="kbit-paged-")
            atexit.register(shutil.rmtree, _temp_dir, True)
        return _temp_dir


def pages(p: torch.Tensor) -> bool:
    """Whether the state of ``p`` is paged when its optimizer is paged."""
    return p.device.type == "cpu" and p.numel() >= PAGED_MIN_NUMEL


def _storage_start(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _mapped_files() -> dict[int, str]:
    """Start address -> path of this process's file mappings (from /proc/self/maps)."""
    out = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out[int(parts[0].split("-")[0], 16)] = parts[5].strip()
    except OSError:
        pass
    return out


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor in a new memory-mapped file; it reads as zeros (a new sparse file)."""
    directory = get_paged_state_dir()
    _warn_if_tmpfs(directory)
    numel = 1
    for s in shape:
        numel *= int(s)
    # A new, empty, uniquely named file (O_EXCL): never a stale one whose bytes would become the state.
    fd, path = tempfile.mkstemp(dir=directory, prefix=f"kbit-state-{os.getpid()}-", suffix=".bin")
    os.close(fd)
    # from_file sizes the file (ftruncate: sparse, no disk blocks until written; reads as zeros). A size
    # of 0 cannot be mapped, so an empty state gets one element it never uses.
    try:
        t = torch.from_file(path, shared=True, size=max(numel, 1), dtype=dtype)
    finally:
        os.unlink(path)  # Note [unlinked state files]
    return t[:numel].view(shape)


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor in a new memory-mapped file; no page is touched until written."""
    return empty(shape, dtype)


def to_file(t: torch.Tensor) -> torch.Tensor:
    """A file-backed copy of the CPU tensor ``t`` (same shape, dtype and values)."""
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def page_state(state: dict) -> None:
    """Move the large state tensors of one parameter (``PAGED_KEYS``) into files, in place of the dict's values.
    Tensors already file-backed are kept; a DTensor keeps its sharding, with its local shard in a file."""
    maps = _mapped_files()
    for key in PAGED_KEYS:
        t = state.get(key)
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        if is_file_backed(local, maps):
            continue
        if local is t:
            state[key] = to_file(t)
        else:
            state[key] = type(t).from_local(to_file(local), t.device_mesh, t.placements, run_check=False,
                                            shape=t.shape, stride=t.stride())


def is_file_backed(t: torch.Tensor, _maps: dict | None = None) -> bool:
    """Whether ``t`` lives in a paged-state file made by this module (its storage starts a mapping of one)."""
    path = (_maps if _maps is not None else _mapped_files()).get(_storage_start(t), "")
    return os.path.basename(path).startswith("kbit-state-")


def release(tensors) -> int:
    """Drop this process's resident pages of file-backed ``tensors`` (``madvise(MADV_DONTNEED)``) after
    asking the kernel to write them back (``msync``). Values are kept: the next access reads them from the
    page cache or the file. Returns the number of bytes advised. Optional: the kernel reclaims these pages
    on its own under memory pressure; this makes the effect visible (and immediate) for a measurement."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    done = 0
    for t in tensors:
        storage = t.untyped_storage()
        start = storage.data_ptr()
        end = start + storage.nbytes()
        lo = -(-start // page) * page  # whole pages inside the storage only
        hi = end // page * page
        if hi <= lo:
            continue
        for call, args in (("msync", (_MS_SYNC,)), ("madvise", (mmap.MADV_DONTNEED,))):
            if getattr(libc, call)(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), *args) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"{call} on paged optimizer state failed: {os.strerror(err)}")
        done += hi - lo
    return done


def state_tensors(optimizer) -> list[torch.Tensor]:
    """The file-backed state tensors of a paged optimizer."""
    out, maps = [], _mapped_files()
    for st in optimizer.state.values():
        for key in PAGED_KEYS:
            t = st.get(key) if isinstance(st, dict) else None
            t = t.to_local() if hasattr(t, "to_local") else t
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and is_file_backed(t, maps):
                out.append(t)
    return out


def _warn_if_tmpfs(directory: str) -> None:
    if directory in _tmpfs_warned:
        return
    _tmpfs_warned.add(directory)
    if _fs_type(directory) in ("tmpfs", "ramfs"):
        warnings.warn(
            f"kbit: paged optimizer state goes to {directory}, which is on tmpfs: its pages can only be swapped, "
            f"so paging saves no memory. Point kbit.optim.set_paged_state_dir() or {ENV_VAR} at a disk directory.",
            stacklevel=3,
        )


def _fs_type(path: str) -> str:
    """File system type of ``path`` (the longest matching mount point in /proc/mounts; '' if unknown)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1]
                    inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) >= len(best):
                        best, kind = mount, fields[2]
    except OSError:
        pass
    return kind
