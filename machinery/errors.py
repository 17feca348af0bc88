"""The errors a user can cause, one type per kind of cause. Each is printed by the scripts as one line,
`SCRIPT: error: MESSAGE`, exit status 2 (machinery/console.py); anything else is a bug and keeps its traceback."""


class ConfigError(ValueError):
    """A setting that cannot work: a flag, a combination of flags, or a model size."""


class BadRecord(ValueError):
    """A record that cannot be used: the message names the file (and CSV line) and the problem."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that is refused because loading it would run code."""


class NonFiniteLoss(RuntimeError):
    """A run whose loss or weights went NaN or infinite: it stops, keeping its last good checkpoint."""


class PeerStopped(RuntimeError):
    """Under torchrun, another process of this run ended: this one stops too, saying how to continue."""
