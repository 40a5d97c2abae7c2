"""Domain errors the CLI turns into one line and an exit status."""


class InvalidInput(ValueError):
    """A value given by the operator is not acceptable; names the field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(LookupError):
    """The thing asked for does not exist."""
