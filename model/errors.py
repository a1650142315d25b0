"""The one exception type for problems the user can fix.

Every layer raises `UserError` for bad input (a config field, a corpus file, a tampered
shard, a model URI); the `gptflow` command prints its message as one line
`error: ...` and exits with code 2, without a traceback. The message must name the
thing to fix: the file, the field or the document.
"""


class UserError(Exception):
    """A problem in the user's input or environment, reported as one clear line."""
