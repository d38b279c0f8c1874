"""The package's own exception types: each message says what to do about it."""


class ModTimelineError(Exception):
    """Base class for every error modtimeline raises on purpose."""


class TraceFileError(ModTimelineError):
    """A trace path cannot be written or read."""


class TraceFormatError(ModTimelineError):
    """A file is not a modtimeline trace, or is damaged."""


class DeviceError(ModTimelineError):
    """The requested device cannot be traced (for example ``device="cuda"`` without CUDA)."""


class RankSyncError(ModTimelineError):
    """The ranks of a job did not meet (to compare clocks) within the timeout."""


class ConfigError(ModTimelineError):
    """A setting is wrong (for example a ``modtimeline diff`` config with ``threshold = nan``)."""
