"""The one exception type users see."""


class SpecPassError(Exception):
    """Bad input or an unsupported model: the message says what is wrong and what to do."""
