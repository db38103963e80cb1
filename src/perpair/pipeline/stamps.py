"""Stage stamps: what lets ``perpair run`` skip a stage whose inputs and settings have not changed.

A stage's *key* is the SHA-256 of its settings and the identities of its inputs (file hashes of the
artifacts it reads, the keys of the stages it depends on). When a stage finishes, a stamp
``WORKDIR/stages/NAME.json`` records the key and the outputs (a Parquet artifact by its SHA-256, a model
folder by its files' names and sizes). A stage is skipped when its stamp holds the same key and its outputs
are still there, unchanged; a stage killed midway has no stamp and runs again (its own caches and
checkpoints make the re-run continue rather than restart).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from perpair.artifacts import file_sha256, write_text_atomic
from perpair.errors import InputError


def stage_key(material: dict[str, Any]) -> str:
    payload = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def output_identity(path: Path) -> Any:
    """A file by its SHA-256; a folder by its files' relative names and sizes (model weights are large)."""
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        return sorted([str(p.relative_to(path)), p.stat().st_size] for p in path.rglob("*") if p.is_file())
    return None


class Stamps:
    def __init__(self, workdir: Path):
        self.root = workdir / "stages"

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def check_root(self) -> None:
        """Refuse ``WORKDIR/stages`` that is there but no folder (a file, a link to nothing): each stage would be
        taken for unfinished and run, and its stamp then fail to be written, the stage's work done for nothing."""
        if (self.root.exists() or self.root.is_symlink()) and not self.root.is_dir():
            raise InputError(f"{self.root} is not a folder (perpair run keeps its stage stamps there); move it away "
                             "or give the run another workdir")

    def check(self, name: str, key: str) -> tuple[dict[str, Any] | None, str]:
        """``(stamp, "")`` if ``name`` was finished with ``key`` and its outputs are unchanged, else
        ``(None, why it must run)``."""
        try:
            stamp = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None, "not finished before"
        # a stamp of another shape (edited, another program's) is none: the stage runs again, as without one (it was
        # a traceback, at once or after the stage was skipped)
        if not (isinstance(stamp, dict) and isinstance(stamp.get("outputs", {}), dict)
                and isinstance(stamp.get("info"), dict)):
            return None, f"its stamp {self.path(name)} is not one perpair run wrote"
        if stamp.get("key") != key:
            return None, "its inputs or settings changed"
        workdir = self.root.parent
        for output, identity in stamp.get("outputs", {}).items():
            path = workdir / output if stamp.get("relative") else Path(output)  # stamps before were the cwd's
            if output_identity(path) != identity:
                return None, f"{path} changed or is missing"
        return stamp, ""

    def write(self, name: str, key: str, outputs: list[Path], info: dict[str, Any] | None = None) -> None:
        # the outputs by their path in the workdir: a workdir copied or moved checks its own files, not the
        # original's (a file deleted in the copy was 'unchanged' while the original had it)
        workdir = self.root.parent
        stamp = {"key": key, "relative": True, "outputs": {str(p.relative_to(workdir)): output_identity(p)
                                                           for p in outputs}, "info": info or {}}
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(name)
        write_text_atomic(target, json.dumps(stamp, indent=1, default=str))

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)
