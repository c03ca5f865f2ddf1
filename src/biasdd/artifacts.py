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
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

import biasdd
from biasdd.errors import ArtifactError

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
    """Package version plus a hash of the package's source files that this process has imported: the
    code that produced an artifact.

    Only the imported files, not the whole package: a stage's imports are its code deps in dvc.yaml
    (tests/test_dag.py), so its artifact's bytes change with the code DVC re-runs it for and not with
    any other file. Hashing every file made a clean clone's `dvc repro` write other bytes, and so
    another dvc.lock, than the commit it came from whenever an unrelated module had changed since the
    stage last ran. Call it at the end of a stage, when everything it runs is imported.
    """
    root = Path(biasdd.__file__).parent
    files = {
        Path(module.__file__)
        for name, module in list(sys.modules.items())
        if (name == "biasdd" or name.startswith("biasdd.")) and getattr(module, "__file__", None)
    }
    digest = hashlib.sha256()
    for file in sorted(f for f in files if f.is_relative_to(root)):
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
    path: str | Path,
    groups: Mapping[str, Mapping[str, np.ndarray]],
    attrs: Mapping[str, Any],
    kind: str | None = None,
) -> None:
    """Write `{group: {name: array}}` and file attributes to `path`, atomically and reproducibly.

    Group-level attributes can be given as `groups[g]["@attrs"] = {...}`. `kind` (see PRODUCERS) is
    recorded as the `artifact` attribute, which `check_artifact` reads back.
    """
    if kind is not None:
        attrs = {**attrs, "artifact": kind}
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


# --- reading artifacts --------------------------------------------------------------------------------

# The stage that makes each kind of artifact (the `artifact` attribute every writer records), for the
# one-line error that says how to get a missing or broken input back.
PRODUCERS = {
    "base": "download",
    "biased": "bias_inject",
    "bias_model": "bias_model",
    "bias_classifier": "bias_classifier",
    "synthetic": "distill@<method>",
    "experts": "experts@<method>",
}


def _rebuild_hint(path: Path, kind: str | None) -> str:
    stage = PRODUCERS.get(kind or "", "<stage>")
    if kind in ("synthetic", "experts"):
        stage = f"{PRODUCERS[kind].split('@')[0]}@{path.stem}"
    return f"rebuild it with `dvc repro {stage}` or fetch it with `dvc pull {path}`"


def _missing(path: Path, kind: str | None) -> ArtifactError:
    return ArtifactError(f"{path}: no such file; {_rebuild_hint(path, kind)}")


@contextmanager
def _open(source: str | Path | BinaryIO, kind: str | None = None) -> Iterator[h5py.File]:
    """An HDF5 artifact (a path, or a binary file object) opened for reading; a missing or unreadable
    file is a one-line ArtifactError."""
    if hasattr(source, "read"):
        path = Path(getattr(source, "name", "<stream>") or "<stream>")
    else:
        path = Path(source)  # type: ignore[arg-type]
        if not path.exists():
            raise _missing(path, kind)
        source = path
    try:
        f = h5py.File(source, "r")
    except OSError as error:
        raise ArtifactError(
            f"{path}: not a readable HDF5 file (truncated or corrupt: {str(error).splitlines()[0]}); "
            f"{_rebuild_hint(path, kind)}"
        ) from error
    with f:
        yield f


def check_artifact(path: str | Path, kind: str) -> None:
    """Fail now, in one line, unless `path` is a readable artifact of `kind` (see PRODUCERS): run by the
    stages on every input before any long computation."""
    path = Path(path)
    if kind == "bias_classifier":
        load_checkpoint(path, kind)
        return
    with _open(path, kind) as f:
        found = f.attrs.get("artifact")
        if isinstance(found, bytes):
            found = found.decode()
        if found != kind:
            what = (
                f"a {found!r} artifact" if found else "not a biasdd artifact (or one from an older version)"
            )
            raise ArtifactError(
                f"{path}: expected a {kind!r} artifact, found {what}; {_rebuild_hint(path, kind)}"
            )


def read_h5(
    path: str | Path | BinaryIO, group: str, names: tuple[str, ...] | None = None, kind: str | None = None
) -> dict[str, np.ndarray]:
    """Read the datasets of `group` (all, or `names`) into memory."""
    with _open(path, kind) as f:
        path = Path(f.filename) if isinstance(f.filename, str) else Path("<stream>")
        if group not in f:
            raise ArtifactError(
                f"{path}: no group {group!r} (it has {sorted(f.keys())}); {_rebuild_hint(path, kind)}"
            )
        g = f[group]
        wanted = names if names is not None else tuple(k for k in g.keys())
        missing = [n for n in wanted if n not in g]
        if missing:
            raise ArtifactError(
                f"{path}: group {group!r} lacks {missing} (it has {sorted(g.keys())}); "
                f"{_rebuild_hint(path, kind)}"
            )
        try:
            return {n: g[n][()] for n in wanted}
        except OSError as error:  # a truncated file can open and still fail on the data
            raise ArtifactError(
                f"{path}: unreadable data in group {group!r} (truncated or corrupt); "
                f"{_rebuild_hint(path, kind)}"
            ) from error


def read_attrs(
    path: str | Path | BinaryIO, group: str | None = None, kind: str | None = None
) -> dict[str, Any]:
    """File (or group) attributes, JSON-decoded where they were encoded."""
    with _open(path, kind) as f:
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


def list_groups(path: str | Path | BinaryIO, kind: str | None = None) -> list[str]:
    with _open(path, kind) as f:
        return sorted(f.keys())


def write_json(path: str | Path, data: Any) -> None:
    """Pretty, key-sorted JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def to_cpu(value: Any) -> Any:
    """A copy of `value` (tensors, nested in dicts, lists and tuples) with every tensor detached on the
    CPU: a training state's form in a checkpoint (`save_checkpoint`)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """torch.save a training state atomically (a kill mid-save keeps the previous checkpoint).

    Saved through an open file, not a path: torch names the zip archive's folder after the file it is
    given, which here is a random temporary name, so the same state would give other bytes each time
    (and DVC another hash). Through a file object the folder is always `archive`.
    """
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(dict(state), f)


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any] | None:
    """The saved state, or None when there is no file (a checkpoint not made yet). With `kind` (an
    artifact such as the bias classifier), a missing or unreadable file is an ArtifactError instead."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        if kind is not None:
            raise _missing(path, kind)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as error:
        if kind is None:
            raise
        raise ArtifactError(
            f"{path}: not a readable torch file (truncated or corrupt); {_rebuild_hint(path, kind)}"
        ) from error
    if kind is not None and (not isinstance(state, dict) or state.get("artifact") != kind):
        raise ArtifactError(f"{path}: expected a {kind!r} artifact; {_rebuild_hint(path, kind)}")
    return state
