"""Platform selection: ZIZHU_PLATFORM, then plugins from the `zizhu.platforms` entry points, then CPU.

A plugin package declares, in its pyproject.toml:

    [project.entry-points."zizhu.platforms"]
    mychip = "mychip_zizhu:MyChipPlatform"

and its class subclasses `zizhu.platforms.base.Platform`.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

from zizhu.errors import ConfigError
from zizhu.platforms.base import Platform
from zizhu.platforms.cpu import CpuPlatform

logger = logging.getLogger(__name__)

BUILTIN: dict[str, type[Platform]] = {"cpu": CpuPlatform}


def available_platforms() -> dict[str, type[Platform]]:
    found = dict(BUILTIN)
    for ep in entry_points(group="zizhu.platforms"):
        try:
            found[ep.name] = ep.load()
        except Exception as e:  # a broken plugin must not take the CPU path down with it
            logger.warning("platform plugin %r failed to load: %s", ep.name, e)
    return found


def get_platform(name: str | None = None) -> Platform:
    name = name or os.environ.get("ZIZHU_PLATFORM")
    platforms = available_platforms()
    if name:
        if name not in platforms:
            raise ConfigError(f"unknown platform {name!r} (available: {', '.join(sorted(platforms))})")
        return platforms[name]()
    for candidate, cls in platforms.items():
        if candidate != "cpu" and cls.is_available():
            return cls()
    return CpuPlatform()


__all__ = ["Platform", "CpuPlatform", "get_platform", "available_platforms"]
