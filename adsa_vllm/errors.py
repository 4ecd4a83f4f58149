"""The plugin's one error type for bad user input (pure; no vLLM import).

Every bad setting or request field raises a `SettingsError` (a ValueError, so vLLM's API server answers HTTP 400
and the engine never sees the request) whose message names the field and the fix. The ADSA and guidance errors
are subclasses, so callers can catch one type.
"""

from __future__ import annotations


class SettingsError(ValueError):
    """A bad ADSA / guidance setting or request field; the message names it and says what would be valid."""


class ADSAConfigError(SettingsError):
    """Invalid ADSA settings; the message says which key is wrong and what would be valid."""
