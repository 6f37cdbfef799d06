"""Errors that mean "the user's input or settings are wrong" (the CLI prints them and exits 2; anything
else is a bug and exits 1 with its traceback). Lowest layer: every module may raise them."""


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


class InputError(ValueError):
    """An input (file, URI, table, request) cannot be used; the message says what and where."""
