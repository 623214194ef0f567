"""Errors meant for users: the CLI prints their message on one line and exits with code 2."""


class UserError(ValueError):
    """A problem with the user's input (path, config, data, argument) and how to fix it."""
