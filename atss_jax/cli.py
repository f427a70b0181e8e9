"""Command lines that refuse bad input in one line.

``run(main, name)`` stands in for ``absl.app.run`` in every command line of the project. What the user can
fix is printed as one line, ``NAME: what is wrong``, with no flag listing and no traceback:

- a command line absl cannot parse (an unknown or missing flag, a value of the wrong type, a config file that
  does not load) or a ``--config.*`` override naming no field of the config (with ml_collections' "did you
  mean"): exit status 2;
- an ``errors.Refusal`` raised by the command (a missing dataset, a corrupt checkpoint, a launch that cannot
  work, an unsafe file): exit status 1.

``--verbose`` prints the traceback after the line. Any other exception is a bug: its cause comes first, on
its own line, then the traceback for a bug report.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

from atss_jax import errors

_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of a refusal too (a refusal is one line).")

USAGE_EXIT_CODE = 2


def _line(error: BaseException) -> str:
    """The error's message and notes on one line."""
    return " ".join(" ".join(str(part).split()) for part in (error, *getattr(error, "__notes__", ())))


def _release(error: BaseException) -> str:
    """The error's formatted traceback; then the frames it holds are cleared and collected, so that what they
    kept open (a TensorFlow input iterator, a checkpoint manager) closes now rather than at interpreter exit,
    where TensorFlow would print its own warnings after the command's last line."""
    formatted = "".join(traceback.format_exception(error))
    traceback.clear_frames(error.__traceback__)
    gc.collect()
    return formatted


def _refuse(name: str, message: str, exit_code: int, error: BaseException | None = None) -> None:
    formatted = _release(error) if error is not None else ""
    print(f"{name}: {message}", file=sys.stderr, flush=True)
    if formatted and flags.FLAGS.is_parsed() and _VERBOSE.value:
        print(formatted, file=sys.stderr, end="", flush=True)
    # A failed checkpoint write leaves Orbax's futures holding the same error; asyncio would log each of them at
    # exit ("exception was never retrieved"), burying the line above.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.exit(exit_code)


def unknown_config_field(error: BaseException, argv: Sequence[str]) -> str | None:
    """What to print for ml_collections' error on an override naming no field, or None for another error.

    ml_collections raises ``AttributeError(KeyError("'name'\\nDid you mean ..."))`` while absl parses the
    override; the override is found on the command line by the missing name.
    """
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    if not isinstance(inner, KeyError) or not inner.args:
        return None
    key, _, hint = str(inner.args[0]).partition("\n")
    key = key.strip("'\"")
    overrides = [a.split("=", 1)[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=", 1)[0][len("--config."):].split(".")]
    if not overrides:
        return None
    return f"{overrides[0]}: the config has no field {key!r}." + (f" {hint.strip()}" if hint.strip() else "")


def unloadable_config(flag_values: flags.FlagValues) -> str | None:
    """What to print for a config file that did not load, or None when every config loaded.

    ml_collections keeps the error of a config file that fails to load (missing, or raising in get_config) in
    the flag's value, to be raised on first use; it is reported here instead, before any work.
    """
    for name in flag_values:
        error = getattr(flag_values[name].value, "_error", None)
        if type(flag_values[name].value).__name__ == "_ErrorConfig" and error is not None:
            last = [line.strip() for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__]
            return f"--{name}: the config file does not load: {last[0]}"
    return None


def _parse_flags(name: str) -> Callable[[list[str]], list[str]]:
    def parse(argv: list[str]) -> list[str]:
        try:
            arguments = flags.FLAGS(argv)
            message = unloadable_config(flags.FLAGS)
            if message is not None:
                _refuse(name, message, USAGE_EXIT_CODE)
            return arguments
        except flags.Error as error:
            # A config file raising in get_config: absl's message holds its traceback; the last line says why.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            if len(lines) > 1 and "--verbose" in argv:
                print(str(error), file=sys.stderr)
            _refuse(name, " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines), USAGE_EXIT_CODE)
        except (AttributeError, KeyError) as error:
            message = unknown_config_field(error, argv)
            if message is None:
                raise
            _refuse(name, message, USAGE_EXIT_CODE)
    return parse


def run(main: Callable[[list[str]], int | None], name: str, argv: list[str] | None = None) -> None:
    """``absl.app.run(main)`` for the command ``name``, refusing bad input in one line (see the module); main's
    return value is the exit status, as with absl."""

    def guarded(arguments: list[str]) -> int | None:
        try:
            return main(arguments)
        except errors.Refusal as error:
            _refuse(name, _line(error), 1, error)
        except app.UsageError as error:
            _refuse(name, _line(error), USAGE_EXIT_CODE, error)
        except Exception as error:  # a bug: the cause first, on its own, then the traceback for a bug report
            cause = "\n".join([f"{type(error).__name__}: {error}", *getattr(error, "__notes__", ())])
            formatted = _release(error)
            print(f"{cause}\n\nTraceback (for a bug report):\n{formatted}", file=sys.stderr, end="", flush=True)
            sys.exit(1)

    app.run(guarded, argv=argv, flags_parser=_parse_flags(name))
