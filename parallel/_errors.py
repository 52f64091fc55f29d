"""Exceptions of ``parallel``."""


class PlanError(ValueError):
    """A step cannot be planned as asked: a bad mesh, rule, batch size or argument structure.

    Subclasses ``ValueError``; the message names the values involved and the fix.
    """
