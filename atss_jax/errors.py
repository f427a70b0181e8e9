"""The project's refusals: errors in what the user gave (a config, a flag, a file, a launch), not in the code.

A refusal's message names what is wrong and what to do, so a command line prints it alone, in one line
(``atss_jax.cli``). Each refusal also derives from the built-in error of its kind (ValueError,
FileNotFoundError, ...), so code that catches those keeps working.
"""


class Refusal(Exception):
    """Input the command cannot work with; the message says what to change."""


class ConfigError(Refusal, ValueError):
    """A config whose fields contradict each other or the data (the message names the fields)."""


class MissingFileError(Refusal, FileNotFoundError):
    """A file the config or the command line names does not exist."""


class WeightsFileError(Refusal, ValueError):
    """A weights or checkpoint file that is refused, unreadable, or does not fit the model."""


class MissingPackageError(Refusal, ImportError):
    """An optional package the command needs for this input is not installed (the message names it)."""
