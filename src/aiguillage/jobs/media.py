"""Where a job's media lives: one folder per job under the configured storage directory."""

from __future__ import annotations

import shutil
from pathlib import Path


class MediaStorage:
    """A local directory (the embedded setup); object storage would implement the same calls."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, job_id: str) -> Path:
        """The job's media file (which may not exist yet)."""
        if not job_id.replace("_", "").isalnum():  # ids are ours, but never build a path blindly
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id / "media"

    def prepare(self, job_id: str) -> Path:
        """The media path, with its folder created."""
        path = self.path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self, job_id: str) -> bool:
        return self.path(job_id).is_file()

    def delete(self, job_id: str) -> None:
        """Remove the job's folder and everything in it; nothing to do if there is none."""
        shutil.rmtree(self.path(job_id).parent, ignore_errors=True)
