"""Errors shown to users as one line: bad input, named with the file, key or flag at fault."""


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line, exit status 2."""
