"""The model registry: versioned artifacts in a folder, and which version is current.

Layout: ``<root>/<kind>/<version>/`` holds one artifact (see
:mod:`models.booster`), ``<root>/<kind>/CURRENT`` names the version serving
should use. A version is written under a temporary name and renamed into place,
and CURRENT is replaced atomically, so a reader never sees half an artifact.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from models.booster import META_FILE, ArtifactError, BoosterModel

_VERSION = re.compile(r"^v(\d{4,})$")
CURRENT = "CURRENT"


class ModelRegistry:
    """Versioned models of each kind under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self, kind: str) -> list[str]:
        """Complete versions of ``kind``, oldest first."""
        folder = self.root / kind
        if not folder.is_dir():
            return []
        found = [
            p.name for p in folder.iterdir() if _VERSION.match(p.name) and (p / META_FILE).exists()
        ]
        return sorted(found, key=lambda v: int(v[1:]))

    def save(self, model: BoosterModel, promote: bool = True) -> str:
        """Store ``model`` as the next version of its kind (and make it current)."""
        folder = self.root / model.kind
        folder.mkdir(parents=True, exist_ok=True)
        existing = self.versions(model.kind)
        number = int(existing[-1][1:]) + 1 if existing else 1
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        while True:
            version = f"v{number:04d}"
            model.meta["version"] = version
            model.save(staging)
            try:
                staging.rename(folder / version)
                break
            except OSError:  # another trainer took this number: take the next
                number += 1
        if promote:
            self.promote(model.kind, version)
        return version

    def promote(self, kind: str, version: str) -> None:
        """Make ``version`` the one serving uses."""
        if version not in self.versions(kind):
            raise ArtifactError(f"no {kind} model {version!r} in {self.root}")
        pointer = self.root / kind / CURRENT
        tmp = pointer.with_suffix(".tmp")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)

    def current(self, kind: str) -> str | None:
        """The promoted version of ``kind`` (the newest when none was promoted), or None."""
        try:
            version = (self.root / kind / CURRENT).read_text().strip()
        except OSError:
            version = ""
        if version in self.versions(kind):
            return version
        versions = self.versions(kind)
        return versions[-1] if versions else None

    def load(self, kind: str, version: str, features_version: str) -> BoosterModel:
        """Read one version (``"current"`` for the promoted one)."""
        if version == "current":
            found = self.current(kind)
            if found is None:
                raise ArtifactError(f"no {kind} model in {self.root}; run `audience train`")
            version = found
        if not _VERSION.match(version):
            raise ArtifactError(f"bad model version {version!r}; versions look like v0001")
        folder = self.root / kind / version
        if not folder.is_dir():
            raise ArtifactError(f"no {kind} model {version!r} in {self.root}")
        return BoosterModel.load(folder, kind, features_version)

    def prune(self, kind: str, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions (never the current one)."""
        current = self.current(kind)
        versions = self.versions(kind)
        doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != current]
        for version in doomed:
            shutil.rmtree(self.root / kind / version, ignore_errors=True)
        return doomed
