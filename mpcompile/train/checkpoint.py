"""Checkpoints of a :class:`TrainStep`: one file, written atomically, verified on load.

``TrainStep.save(path)`` writes, ``TrainStep.load(path)`` restores everything a bit-exact resume
needs: every state tensor (masters, working copies, optimizer state, buffers, loss scale, growth
tracker, step count), the ``set_lr`` override and the learning rates the step uses now (so a
torch optimizer's scheduled learning rate comes back too).

The file is one ASCII header line, then the payload::

    MPCOMPILE-CHECKPOINT 1 sha256=<64 hex digits> bytes=<payload length>\\n
    <payload: torch.save of a dict of tensors, dicts, lists, str, int, float, bool and None>

Writing: the bytes go to a ``mkstemp`` file in the destination's folder, flushed and fsync-ed,
``os.replace``-d over the destination, then the folder is fsync-ed. A save killed at any point
leaves the previous file at ``path`` intact (at worst a ``.<name>.*.tmp`` file beside it, which
never loads: it is either incomplete, and fails its length or checksum, or a complete
checkpoint).

Loading checks, before the step changes: the header, the payload's length and sha256, that the
payload loads with ``torch.load(weights_only=True)`` (no code runs), its structure, the
fingerprint of the step it was written by (state names, dtypes and shapes, the low precision,
the optimizer's param groups) against this step's, and every entry as ``load_state_dict`` checks
it (finite masters, working copies and optimizer state, a finite positive loss scale). Anything
wrong raises :class:`CheckpointError` naming the file and the fault, and the step is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..dtypes import dtype_name
from ..errors import CheckpointError, TrainStepError
from ..fileio import replacing
from . import distributed
from .layout import StateKind, StateLayout

if TYPE_CHECKING:
    from .step import TrainStep

MAGIC = b"MPCOMPILE-CHECKPOINT"
VERSION = 1
FORMAT = "mpcompile.TrainStep"
_HEADER = re.compile(rb"MPCOMPILE-CHECKPOINT (\d{1,6}) sha256=([0-9a-f]{64}) bytes=(\d{1,20})")
_MAX_HEADER = 256  # bytes the header line may take, newline included
_KEYS = {"format", "version", "layout", "specs", "dtype", "groups", "fingerprint", "state",
         "lr_override", "learning_rates", "optimizer_lrs"}


# -- what identifies a step --------------------------------------------------------------------


def identity(step: TrainStep) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into ``step``: every state entry as
    [name, dtype, shape], the low precision, the parameters of each optimizer group, and with
    sharded FP32 state the shard plan (which elements each slice holds: two plans can give
    slices of one shape that hold different elements)."""
    groups: list[list[str]] = [[] for _ in step.plan.groups]
    for fqn, gi in step.plan.group_of.items():
        groups[gi].append(fqn)
    sp = step.shards
    return {
        "specs": [[n, dtype_name(t.dtype), list(t.shape)]
                  for n, t in zip(step.layout.names, step.state)],
        "dtype": dtype_name(step.dtype),
        "groups": groups,
        "shards": None if sp is None else shard_description(sp),
    }


def shard_description(sp: distributed.ShardPlan) -> list:
    """A shard plan as plain data: world size, rank, and per bucket its group, padded size and
    segments (name, offset, shape)."""
    return [sp.world_size, sp.rank, [[b.group, b.padded, [[s.fqn, s.offset, list(s.shape)]
                                                           for s in b.segments]]
                                     for b in sp.buckets]]


def fingerprint(ident: dict[str, Any]) -> str:
    """sha256 of an :func:`identity` (canonical JSON; a replicated step's as before sharding
    existed, so its earlier checkpoints still load)."""
    parts = [ident["specs"], ident["dtype"], ident["groups"]]
    if ident.get("shards") is not None:
        parts.append(ident["shards"])
    text = json.dumps(parts, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- the checks load_state_dict shares ---------------------------------------------------------


def entry_problem(layout: StateLayout, name: str, t: torch.Tensor) -> str | None:
    """Why state entry ``name`` with value ``t`` (shape and dtype already right) cannot be
    loaded, or None: masters, working copies and optimizer state must be finite, the loss scale
    finite and positive, the counters non-negative."""
    kind = layout.kind(name)
    if kind in (StateKind.MASTER, StateKind.WORKING, StateKind.OPT):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return (f"{name} holds {bad} non-finite value{'s' * (bad > 1)} (NaN or "
                        f"infinity) of {t.numel()}")
    elif kind is StateKind.SCALE:
        v = float(t)
        if not (math.isfinite(v) and v > 0):
            return f"the loss scale ({name}) is {v}: it must be finite and positive"
    elif kind in (StateKind.GROWTH, StateKind.STEP):
        v = int(t)
        if v < 0:
            return f"{name} is {v}: it must be non-negative"
    return None


# -- saving ------------------------------------------------------------------------------------


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a copy where it is a view of a larger storage (torch.save writes whole
    storages)."""
    t = t.detach()
    if t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def payload(step: TrainStep) -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain values only)."""
    ident = identity(step)
    src = step._lr_source
    return {
        "format": FORMAT,
        "version": VERSION,
        "layout": list(step.layout.names),
        **ident,
        "fingerprint": fingerprint(ident),
        "state": {n: _compact(t) for n, t in zip(step.layout.names, step.state)},
        "lr_override": None if step._lr_override is None else list(step._lr_override),
        "learning_rates": step.learning_rates(),
        "optimizer_lrs": None if src is None else [float(g["lr"]) for g in src.param_groups],
    }


def save(step: TrainStep, path: str | os.PathLike) -> Path:
    """Write ``step``'s checkpoint to ``path`` atomically; returns the path. Refuses (and writes
    nothing) when the state could not be loaded back, so a bad state never replaces a good
    checkpoint."""
    path = Path(path)
    for name, t in zip(step.layout.names, step.state):
        why = entry_problem(step.layout, name, t)
        if why:
            raise CheckpointError(f"checkpoint {str(path)!r} not written: {why}; a checkpoint "
                                  "of this state could not be loaded. The file at that path, "
                                  "if any, is unchanged")
    buf = io.BytesIO()
    torch.save(payload(step), buf)
    body = buf.getbuffer()
    header = (f"{MAGIC.decode()} {VERSION} sha256={hashlib.sha256(body).hexdigest()} "
              f"bytes={len(body)}\n").encode()
    _write_atomic(path, (header, body))
    return path


def _write_atomic(path: Path, chunks: tuple) -> None:
    """``chunks`` to ``path``: a temporary file in the same folder, flushed to disk, renamed
    over ``path``, the folder synced. On any failure the temporary file is removed and whatever
    was at ``path`` is untouched."""
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} not written: it is a directory; give "
                              f"a file path such as {str(path / 'ckpt.mpc')!r}")
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} not written: cannot create a file in "
                              f"{str(folder)!r} ({e.strerror or e})") from e
    try:
        with replacing(path, tmp), os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} not written ({e.strerror or e}); "
                              "the file at that path, if any, is unchanged") from e


def header_digest(path: Path) -> str:
    """The payload sha256 a checkpoint's header line states (what a manifest records)."""
    with open(path, "rb") as f:
        m = _HEADER.fullmatch(f.readline(_MAX_HEADER).rstrip(b"\n"))
    if m is None:
        raise CheckpointError(f"checkpoint {str(path)!r} has no valid header line")
    return m[2].decode()


# -- loading -----------------------------------------------------------------------------------


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The verified payload of the checkpoint at ``path`` (header, length, sha256,
    ``weights_only`` load, structure); CheckpointError naming the file otherwise."""
    path = Path(path)

    def fail(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {str(path)!r} {why}")

    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise fail("does not exist") from e
    except OSError as e:
        raise fail(f"cannot be read ({e.strerror or e})") from e
    if not data:
        raise fail("is empty (0 bytes): not a checkpoint (a write that was cut off, or "
                   "another program, left it)")
    if not data.startswith(MAGIC):
        hint = (" (it is a zip archive, the format of torch.save: load it with torch.load and "
                "TrainStep.load_state_dict)" if data.startswith(b"PK") else "")
        raise fail(f"is not an mpcompile checkpoint: it does not start with "
                   f"{MAGIC.decode()}{hint}")
    end = data.find(b"\n", 0, _MAX_HEADER)
    if end < 0:
        raise fail(f"is damaged or truncated: its header line does not end within "
                   f"{_MAX_HEADER} bytes")
    m = _HEADER.fullmatch(data[:end])
    if m is None:
        raise fail(f"is damaged: its header line {data[:end]!r} is not "
                   "'MPCOMPILE-CHECKPOINT <version> sha256=<hex> bytes=<n>'")
    version, digest, size = int(m[1]), m[2].decode(), int(m[3])
    if version != VERSION:
        raise fail(f"is format version {version}; this mpcompile reads version {VERSION} "
                   "(written by another mpcompile release?)")
    body = memoryview(data)[end + 1:]
    if len(body) < size:
        raise fail(f"is truncated: {len(body)} of its {size} payload bytes are there")
    if len(body) > size:
        raise fail(f"is damaged: {len(body) - size} bytes follow its {size}-byte payload")
    got = hashlib.sha256(body).hexdigest()
    if got != digest:
        raise fail(f"is corrupted: its payload's sha256 is {got[:16]}..., its header says "
                   f"{digest[:16]}... (bytes changed on disk or in transfer); use another copy")
    try:
        obj = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the unpickler is the file's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise fail(f"does not load with torch.load(weights_only=True): {type(e).__name__}: "
                   f"{first}") from e
    try:
        why = _malformed(obj)
    except Exception as e:  # noqa: BLE001 - a payload of unexpected types
        why = f"its payload is malformed ({type(e).__name__}: {e})"
    if why:
        raise fail(f"is not a valid mpcompile checkpoint: {why}")
    return obj


def _lrs_ok(x: Any, n: int) -> bool:
    return (isinstance(x, list) and len(x) == n and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in x))


def _malformed(obj: Any) -> str | None:
    """What is wrong with a payload's structure, or None."""
    if not isinstance(obj, dict):
        return f"its payload is a {type(obj).__name__}, not a dict"
    if set(obj) - {"shards"} != _KEYS:
        return (f"its payload has keys {sorted(map(str, obj))}, expected {sorted(_KEYS)}")
    if obj["format"] != FORMAT or obj["version"] != VERSION:
        return f"its payload says format {obj['format']!r} version {obj['version']!r}"
    layout, specs, state = obj["layout"], obj["specs"], obj["state"]
    if not (isinstance(layout, list) and all(isinstance(n, str) for n in layout)
            and len(set(layout)) == len(layout)):
        return "its layout is not a list of distinct names"
    if not (isinstance(specs, list) and len(specs) == len(layout) and all(
            isinstance(s, list) and len(s) == 3 and s[0] == n for s, n in zip(specs, layout))):
        return "its specs do not follow its layout"
    if not (isinstance(state, dict) and list(state) == layout
            and all(isinstance(t, torch.Tensor) for t in state.values())):
        return "its state is not one tensor per layout entry, in layout order"
    for (name, dt, shape), t in zip(specs, state.values()):
        if dtype_name(t.dtype) != dt or list(t.shape) != shape:
            return (f"its state entry {name} is {dtype_name(t.dtype)}{list(t.shape)}, its "
                    f"specs say {dt}{shape}")
    groups = obj["groups"]
    if not (isinstance(groups, list) and all(isinstance(g, list) for g in groups)):
        return "its optimizer groups are not lists of parameter names"
    if not isinstance(obj["dtype"], str) or not isinstance(obj["fingerprint"], str):
        return "its dtype or fingerprint is not a string"
    if fingerprint(obj) != obj["fingerprint"]:
        return "its fingerprint does not match its own specs"
    n = len(groups)
    if not _lrs_ok(obj["learning_rates"], n):
        return f"its learning rates {obj['learning_rates']!r} are not {n} finite, non-negative"
    for k in ("lr_override", "optimizer_lrs"):
        if obj[k] is not None and not _lrs_ok(obj[k], n):
            return f"its {k} {obj[k]!r} is not None or {n} finite, non-negative learning rates"
    return None


def _difference(theirs: dict[str, Any], ours: dict[str, Any], most: int = 3) -> str:
    """How a checkpoint's identity differs from this step's, in words."""
    a = {s[0]: s for s in theirs["specs"]}
    b = {s[0]: s for s in ours["specs"]}
    parts = []

    def some(names: list[str]) -> str:
        return ", ".join(names[:most]) + (f" and {len(names) - most} more"
                                          if len(names) > most else "")

    only_a = [n for n in a if n not in b]
    only_b = [n for n in b if n not in a]
    if only_a:
        parts.append(f"it has {some(only_a)}, which this step does not")
    if only_b:
        parts.append(f"this step has {some(only_b)}, which it does not")
    diff = [f"{n} is {a[n][1]}{a[n][2]} there, {b[n][1]}{b[n][2]} here"
            for n in a if n in b and a[n] != b[n]]
    if diff:
        parts.append("; ".join(diff[:most]) + (f" and {len(diff) - most} more differ"
                                               if len(diff) > most else ""))
    if not parts and list(a) != list(b):
        parts.append("its state entries are in another order")
    if theirs.get("shards") != ours.get("shards") and not parts:
        parts.append("its FP32 state is sharded another way (world size, rank, or the buckets: "
                     "bucket_cap_mb and grad_reduce_dtype decide them)" if theirs.get("shards")
                     and ours.get("shards") else "one of the two shards its FP32 state "
                     "(shard_optimizer_state=True) and the other does not")
    if theirs["dtype"] != ours["dtype"]:
        parts.append(f"it was compiled for {theirs['dtype']}, this step for {ours['dtype']}")
    if theirs["groups"] != ours["groups"] and not parts:
        parts.append(f"its optimizer param groups are {theirs['groups']}, this step's are "
                     f"{ours['groups']}")
    return "; ".join(parts) or "their fingerprints differ"


def load(step: TrainStep, path: str | os.PathLike) -> None:
    """Restore ``step`` from the checkpoint at ``path``: its state, the ``set_lr`` override and
    the learning rates (written back into the torch optimizer the step reads them from, so an LR
    scheduler continues from them; else set as the override). Everything is checked first; on
    any fault a CheckpointError names the file and the step is unchanged."""
    prepare(step, path)()


def prepare(step: TrainStep, path: str | os.PathLike, obj: dict[str, Any] | None = None):
    """Check the checkpoint at ``path`` (or its already-read payload ``obj``) against ``step``
    as :func:`load` does; return the function that loads it (nothing changes before)."""
    if obj is None:
        obj = read(path)
    ours = identity(step)
    if obj["fingerprint"] != fingerprint(ours):
        raise CheckpointError(
            f"checkpoint {str(Path(path))!r} is of another model or step configuration: "
            f"{_difference(obj, ours)}. Load it into a step compiled like the one that saved "
            "it; this step is unchanged")
    lrs, override, opt_lrs = obj["learning_rates"], obj["lr_override"], obj["optimizer_lrs"]
    src = step._lr_source
    if src is not None:
        if len(src.param_groups) != len(lrs):  # cannot happen for a step compiled from it
            raise CheckpointError(f"checkpoint {str(Path(path))!r} has {len(lrs)} learning "
                                  f"rates, the step's optimizer {len(src.param_groups)} param "
                                  "groups; this step is unchanged")
        # the optimizer's own lrs; from a step without one, the lrs it used unless overridden
        write = opt_lrs if opt_lrs is not None else (lrs if override is None else None)
    else:
        write = None
        if override is None and lrs != [g.lr for g in step.plan.groups]:
            override = list(lrs)  # the lr it ran with came from elsewhere (a torch optimizer)
    state: dict[str, Any] = dict(obj["state"])
    state["lr_override"] = override
    try:
        assign = step._checked(state)  # checks every entry; assigns when called
    except TrainStepError as e:
        raise CheckpointError(f"checkpoint {str(Path(path))!r} holds a state this step "
                              f"refuses: {e}") from e

    def apply() -> None:
        assign()
        if write is not None:
            for g, lr in zip(src.param_groups, write):
                g["lr"] = float(lr)

    return apply


# -- data-parallel checkpoints -----------------------------------------------------------------

MANIFEST = "manifest.json"
DP_FORMAT = "mpcompile.DataParallelCheckpoint"


def rank_file(rank: int, save_id: str) -> str:
    """Rank ``rank``'s file of the save ``save_id`` (each save writes new names: the files of
    the previous save stay until the new manifest replaces the old one)."""
    return f"rank{rank}-{save_id}.mpc"


_RANK_FILE = re.compile(r"rank(\d+)-([0-9a-f]{16})\.mpc")


def is_distributed(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a data-parallel checkpoint folder (it holds a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def _agree(step: TrainStep, why: str | None, what: str, value: Any = None) -> list[Any]:
    """Every rank's ``value``, in rank order; or the same CheckpointError on every rank when any
    rank failed (``why``: this rank's fault, or None), naming each rank's fault."""
    dp = step.data_parallel
    gathered = [(why, value)] if dp is None else distributed.gather_objects(dp, (why, value))
    failed = [(r, w) for r, (w, _) in enumerate(gathered) if w is not None]
    if failed:
        raise CheckpointError(f"{what}: " + "; ".join(
            (f"rank {r}: {w}" if dp is not None else w) for r, w in failed))
    return [v for _, v in gathered]


def _fault(e: Exception) -> str:
    return str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"


def save_distributed(step: TrainStep, folder: str | os.PathLike) -> Path:
    """Every rank's file under a new name, then rank 0's manifest naming them with their
    checksums (see ``TrainStep.save``), then the previous save's files are removed. The
    manifest is replaced last, atomically: a save that fails or is cut off at any point leaves
    the previous manifest and the files it names, so the folder still loads the previous
    checkpoint."""
    dp, folder = step.data_parallel, Path(folder)
    save_id = distributed.gather_objects(dp, os.urandom(8).hex())[0]  # rank 0's, everywhere
    why, digest = None, None
    try:
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"{str(folder)!r} is a file; a data-parallel step saves into "
                                  "a folder (one file per rank and a manifest)")
        folder.mkdir(parents=True, exist_ok=True)
        path = save(step, folder / rank_file(dp.rank, save_id))
        digest = header_digest(path)
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
        why = _fault(e)
    try:
        digests = _agree(step, why, f"checkpoint {str(folder)!r} not saved; the previous "
                         "checkpoint there, if any, is unchanged", digest)
    except CheckpointError:
        _remove(folder / rank_file(dp.rank, save_id))
        raise
    why = None
    if dp.rank == 0:
        manifest = {"format": DP_FORMAT, "version": VERSION, "world_size": dp.world_size,
                    "sharded": step.shards is not None, "backend": dp.backend,
                    "files": [rank_file(r, save_id) for r in range(dp.world_size)],
                    "sha256": digests, "step": int(step.value("step"))}
        try:
            _write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=1).encode(),))
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
            why = _fault(e)
    # (on a failure here the new files stay: the manifest may be in place already)
    _agree(step, why, f"checkpoint {str(folder)!r}: rank 0 could not write its manifest; the "
           "folder holds the previous checkpoint unless the error says it was replaced")
    # the new manifest is in place: this rank's files of earlier saves are garbage
    for old in folder.glob(f"rank{dp.rank}-*.mpc"):
        m = _RANK_FILE.fullmatch(old.name)
        if m and m[2] != save_id:
            _remove(old)
    return folder


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a data-parallel checkpoint folder, checked for structure."""
    where = f"checkpoint {str(folder)!r}"
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{where} has no {MANIFEST}: not a data-parallel checkpoint "
                              "folder (or its save did not finish)") from e
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: its {MANIFEST} cannot be read ({e})") from e
    ok = (isinstance(m, dict) and m.get("format") == DP_FORMAT
          and m.get("version") == VERSION and isinstance(m.get("world_size"), int)
          and m["world_size"] >= 1 and isinstance(m.get("sharded"), bool)
          and isinstance(m.get("files"), list) and len(m["files"]) == m["world_size"]
          and all(isinstance(f, str) and (fm := _RANK_FILE.fullmatch(f)) and int(fm[1]) == r
                  for r, f in enumerate(m["files"]))
          and isinstance(m.get("sha256"), list) and len(m["sha256"]) == m["world_size"])
    if not ok:
        raise CheckpointError(f"{where}: its {MANIFEST} is not a valid manifest of format "
                              f"{DP_FORMAT} version {VERSION}")
    return m


def _which_file(step: TrainStep, folder: Path, m: dict[str, Any]) -> tuple[Path, int]:
    """The file this rank loads from the folder, and its index in the manifest."""
    dp = step.data_parallel
    world, rank = (dp.world_size, dp.rank) if dp is not None else (1, 0)
    here = f"{world} rank{'s' * (world > 1)}" if dp is not None else "one process"
    if m["sharded"]:
        if step.shards is None or m["world_size"] != world:
            raise CheckpointError(
                f"checkpoint {str(folder)!r} was written by {m['world_size']} ranks with "
                "sharded FP32 state (shard_optimizer_state=True): each file holds one rank's "
                f"slice, so it loads only into a sharded step on {m['world_size']} ranks, not "
                f"{'a replicated step' if step.shards is None else here}. Changing the world "
                "size of a sharded checkpoint is not supported yet")
        return folder / m["files"][rank], rank
    if step.shards is not None:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} holds replicated state; this step shards its FP32 "
            "state (shard_optimizer_state=True): load it into a replicated step")
    # replicated: every rank's file holds the same state; read your own when there is one
    i = rank if rank < m["world_size"] else 0
    return folder / m["files"][i], i


def load_distributed(step: TrainStep, path: str | os.PathLike) -> None:
    """Load a data-parallel checkpoint folder (or, into a data-parallel step, a single-process
    file: replicated state only), checked on every rank before any rank changes."""
    path = Path(path)
    apply, why = None, None
    try:
        if (path / MANIFEST).is_file() or path.is_dir():
            m = read_manifest(path)
            file, i = _which_file(step, path, m)
            obj = read(file)
            if header_digest(file) != m["sha256"][i]:
                raise CheckpointError(
                    f"checkpoint {str(file)!r} is not the file its manifest names (another "
                    "save's, or a save cut off before its manifest): its checksum differs")
            apply = prepare(step, file, obj)
        else:
            apply = prepare(step, path)
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
        why = _fault(e)
    _agree(step, why, "checkpoint not loaded, no rank changed")
    apply()
