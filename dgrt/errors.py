"""User-facing errors: one sentence that names what is wrong and what was expected."""


class DgrtError(Exception):
    """An error caused by the user's input (files, arguments); the CLI prints it and exits non-zero."""


class CheckpointError(DgrtError):
    """A checkpoint folder that dgrt cannot load exactly."""


class ConfigError(CheckpointError):
    """A config value that dgrt does not support or that contradicts another."""


class DgrtWarning(UserWarning):
    """Something the user chose that weakens a guarantee (e.g. loading without verifying the weights)."""


MAX_SEED = 2**63 - 1  # seeds are int64 wherever they go (torch.Generator, numpy)


def check_ints(option: str, values: object, low: int, high: int | None = None) -> None:
    """Refuse an integer argument, or any item of a list argument, outside [low, high] (high None: no upper
    limit), in one sentence that names the option."""
    items = list(values) if isinstance(values, list | tuple) else None
    for value in [values] if items is None else items:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            limits = f"of at least {low}" if high is None else f"from {low} to {high}"
            what = f"has {value!r}; expected integers" if items is not None else f"is {value!r}; expected an integer"
            raise DgrtError(f"{option} {what} {limits}.")
