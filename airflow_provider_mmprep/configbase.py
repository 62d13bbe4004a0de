"""What the config layer shares with code that must start without pydantic: the stage names and the
error every config problem is raised with.

A task run from a resolved config (:mod:`.resolved`) imports this, not :mod:`.config`, whose models and
loader cost ~0.15 CPU-seconds of every process that imports them (pydantic, its core, schema building).
:mod:`.config` re-exports both names.
"""

from __future__ import annotations

STAGE_NAMES: tuple[str, ...] = (
    "download_parquet",
    "download_images",
    "reorganize_tar",
    "precache_encodings",
    "generate_wdinfo",
)


class ConfigError(Exception):
    """Raised with every problem found; each line names the YAML key path it concerns."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))
