"""User-facing errors: one sentence that names what is wrong and what was expected."""


class DgrtError(Exception):
    """An error caused by the user's input (files, arguments); the CLI prints it and exits non-zero."""


class CheckpointError(DgrtError):
    """A checkpoint folder that dgrt cannot load exactly."""


class ConfigError(CheckpointError):
    """A config value that dgrt does not support or that contradicts another."""
