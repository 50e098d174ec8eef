"""The error type for mistakes in what the user gave, as opposed to our bugs."""


class UserError(Exception):
  """An error in what the user gave: one line, exit 2."""
