"""The one exception type users catch: every message says what was wrong, where, and what to do."""


class LowbitError(ValueError):
    """A problem the user can fix (bad input, unsupported shape, unknown option)."""
