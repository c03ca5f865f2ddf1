"""The one module that reads and writes artifacts (the only importer of h5py).

Every write goes to a temporary file beside the target and is renamed into place, so a crashed or
interrupted stage never leaves a half-written artifact. HDF5 files are written byte-reproducibly:
no creation timestamps, fixed chunking and compression, attributes in a fixed order, so the same
content gives the same bytes and DVC's content hash is stable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import biasdd

# gzip is deterministic and readable by every HDF5 tool; level 1 is fast and shrinks black digits well.
_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "shuffle": True}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the artifact normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def code_version() -> str:
    """Package version plus a hash of the package's source files: what produced an artifact."""
    root = Path(biasdd.__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return f"{biasdd.__version__}+src.{digest.hexdigest()[:12]}"


def md5_file(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _encode_attr(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, np.integer, np.floating)):
        return value
    return json.dumps(value, sort_keys=True)


def _create_group(parent: h5py.Group, name: str) -> h5py.Group:
    # A group created the default way records its creation time, which would change the file's bytes.
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    gid = h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl)
    return h5py.Group(gid)


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(shape) == 0 or shape[0] == 0:
        return None
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows = max(1, min(shape[0], (1 << 20) // max(row, 1)))  # ~1 MB chunks of whole rows
    return (rows, *shape[1:])


def write_h5(
    path: str | Path, groups: Mapping[str, Mapping[str, np.ndarray]], attrs: Mapping[str, Any]
) -> None:
    """Write `{group: {name: array}}` and file attributes to `path`, atomically and reproducibly.

    Group-level attributes can be given as `groups[g]["@attrs"] = {...}`.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=False, libver=("earliest", "v110")) as f:
            for key in sorted(attrs):
                f.attrs[key] = _encode_attr(attrs[key])
            for group_name in sorted(groups):
                group = _create_group(f, group_name)
                members = groups[group_name]
                for name in sorted(members):
                    if name == "@attrs":
                        group_attrs = members[name]
                        for key in sorted(group_attrs):
                            group.attrs[key] = _encode_attr(group_attrs[key])
                        continue
                    array = np.ascontiguousarray(members[name])
                    options = _COMPRESSION if array.size > 0 else {}
                    group.create_dataset(
                        name, data=array, chunks=_chunks(array.shape), track_times=False, **options
                    )


def read_h5(path: str | Path, group: str, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Read the datasets of `group` (all, or `names`) into memory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such artifact (run the stage that makes it first)")
    with h5py.File(path, "r") as f:
        if group not in f:
            raise KeyError(f"{path}: no group {group!r}; it has {sorted(f.keys())}")
        g = f[group]
        wanted = names if names is not None else tuple(k for k in g.keys())
        missing = [n for n in wanted if n not in g]
        if missing:
            raise KeyError(f"{path}:{group}: missing dataset(s) {missing}; it has {sorted(g.keys())}")
        return {n: g[n][()] for n in wanted}


def read_attrs(path: str | Path, group: str | None = None) -> dict[str, Any]:
    """File (or group) attributes, JSON-decoded where they were encoded."""
    with h5py.File(path, "r") as f:
        node = f if group is None else f[group]
        out: dict[str, Any] = {}
        for key, value in node.attrs.items():
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out


def list_groups(path: str | Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return sorted(f.keys())


def write_json(path: str | Path, data: Any) -> None:
    """Pretty, key-sorted JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """torch.save a training state atomically (a kill mid-save keeps the previous checkpoint)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The saved state, or None when there is no checkpoint."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
