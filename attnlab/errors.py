"""User-facing errors: each carries a one-line message that the CLI prints as-is (exit code 2).

Anything else that escapes to the CLI is a bug and is reported as an internal error (exit code 1). The
subclasses below are also ``ValueError`` / ``TypeError``, so library code that catches those keeps working.
"""


class AttnlabError(Exception):
    """A failure caused by the user's input (bad model id, bad prompt, wrong device, ...).

    The message is one line, says what was wrong and, where possible, what to do instead.
    """


class InputError(AttnlabError, ValueError, TypeError):
    """Input a method cannot use: data of the wrong kind, a test set that overlaps the fit set, a model it does not
    support (e.g. image prompts for a text model)."""


class InvalidParameterError(InputError):
    """A parameter value the class does not allow (``attnlab.params``: names the parameter, the allowed values and
    the value received; also kept as ``parameter``, ``allowed`` and ``value`` for callers that word it their way,
    e.g. the CLI's ``probe: parameter must be ...``)."""

    def __init__(self, message: str, *, parameter: str | None = None, allowed: str | None = None, value=None):
        super().__init__(message)
        self.parameter, self.allowed, self.value = parameter, allowed, value


class DataSpecError(InputError):
    """A data spec or data file that cannot be read (``attnlab.datasets.specs``)."""
