"""Checkpoints written atomically (temporary file + rename) and checked on load."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile

import torch

from savae_fast.app.errors import CheckpointError

FORMAT = "savae_fast.checkpoint/1"


def _new_file_mode() -> int:
    """0666 less the process umask (read without changing it where /proc says it)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def save(obj: dict, path: str) -> None:
    """torch.save into a temporary file in the same directory, fsync, then rename, so that
    a reader never sees a partial file; a SHA-256 of the payload detects later corruption."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    blob = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp's 0600 -> what open() would give (0644 under umask 022)
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _unreadable(path: str) -> str:
    """Why a checkpoint file does not load: a zip archive (torch.save's format) whose end record is
    there was written whole, so a read error is corruption; without it, the file was cut short."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, os.path.getsize(path) - 1024))
            tail = f.read()
    except OSError:
        return "cannot be read"
    if head != b"PK\x03\x04":
        return "is not a checkpoint (not a torch.save archive)"
    if b"PK\x05\x06" in tail:
        return "is corrupted (complete, but its contents fail the archive's checksums)"
    return "is truncated (the archive's end is missing)"


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, wrong file, unpickling error, a changed byte (the zip's CRC)
        raise CheckpointError(f"checkpoint {_unreadable(path)}: {path} ({type(exc).__name__})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"not a savae_fast checkpoint: {path}")
    payload = blob.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != blob.get("sha256"):
        raise CheckpointError(f"checkpoint is corrupted (checksum mismatch): {path}")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
