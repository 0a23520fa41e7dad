"""Errors that mean "the user's input is wrong": the CLI shows them without a traceback and exits 2."""


class InvalidInput(ValueError):
    """Bad user input (config, data file, reward function path); the message names the field, file or line."""
