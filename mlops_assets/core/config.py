"""The base of the engine's configured objects (registry client, platforms, metrics sources, policies).

They are frozen pydantic models, validated when built: Dagster binds the same objects as resources
(`defs/resources.py`) without the engine importing Dagster.
"""

from __future__ import annotations

import pydantic


class EngineConfig(pydantic.BaseModel):
    """Typed, validated, immutable configuration with the behaviour that uses it."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")
