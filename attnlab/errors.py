"""User-facing errors: each carries a one-line message that the CLI prints as-is (exit code 2)."""


class AttnlabError(Exception):
    """A failure caused by the user's input (bad model id, bad prompt, wrong device, ...).

    The message is one line, says what was wrong and, where possible, what to do instead.
    """
