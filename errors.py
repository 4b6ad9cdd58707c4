"""The one exception type that means "the user gave us bad input".

Everything the user controls (YAML files, ``--set`` overrides, command-line
flags, data locations) is checked where it is used; a problem raises
:class:`UserError` with a one-line message that names the file and the key.
Entry points catch it, print the line to stderr and exit with status 2, so a
typo never produces a traceback.
"""
import argparse
import functools
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def exit_on_user_error(function):
    """Decorate a command-line ``main`` so a :class:`UserError` becomes
    ``error: <message>`` on stderr and exit status 2."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UserError as error:
            message = " ".join(str(error).split())
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class CommandLine(argparse.ArgumentParser):
    """argparse whose usage errors are :class:`UserError` too: one line, exit 2
    (every command's ``main`` is wrapped in :func:`exit_on_user_error`)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def at_least_one(text):
    """An argparse ``type``: an integer >= 1, else argparse's one-line error
    naming the flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
