"""Errors a user can act on: each carries one line saying which key, what value, what is allowed."""


class MuRunnerError(Exception):
    """Bad input or a failed run that the user can fix; printed as one line, exit code 2."""


class ConfigError(MuRunnerError, ValueError):
    """A configuration value is impossible (checked before any training starts)."""


class DatasetError(MuRunnerError, FileNotFoundError):
    """Dataset files are missing or corrupted: says where they are expected and how to get them."""


class CheckpointError(MuRunnerError):
    """A checkpoint does not fit the backbone it is loaded into."""


class DivergedError(MuRunnerError, FloatingPointError):
    """A loss became NaN or infinite during training or unlearning."""


class OutputError(MuRunnerError):
    """A run-directory file or a cache entry cannot be written (disk full, permissions): names the path."""
