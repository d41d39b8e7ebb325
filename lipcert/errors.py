"""The error types lipcert raises: each says what is wrong, where, and what to do."""

from __future__ import annotations


class LipcertError(Exception):
    """Base class: a problem lipcert detected and can explain (never a wrong number)."""

    def __init__(self, what: str, where: str | None = None, hint: str | None = None) -> None:
        self.what, self.where, self.hint = what, where, hint
        super().__init__(self.message())

    def message(self) -> str:
        text = self.what
        if self.where:
            text += f" (at {self.where})"
        if self.hint:
            text += f"\nWhat to do: {self.hint}"
        return text


class ModelError(LipcertError):
    """The model file or module is broken: unreadable, non-finite weights, inconsistent shapes."""


class UnsupportedModelError(LipcertError):
    """The model uses operations that lipcert cannot bound. Lists every offending node at once."""

    def __init__(self, problems: list[tuple[str, str, str]], supported: list[str] | None = None) -> None:
        # problems: (op_type, node_name, reason)
        self.problems = problems
        rows = "\n".join(f"  {op:<20} {name:<28} {reason}" for op, name, reason in problems)
        what = f"The model has {len(problems)} node(s) that lipcert cannot bound:\n  {'op':<20} {'node':<28} reason\n{rows}"
        hint = "replace these operations (or export the model without them) and try again"
        if supported:
            hint += ". Supported ops: " + ", ".join(supported)
        super().__init__(what, None, hint)


class InputError(LipcertError):
    """A bad argument or data file from the user."""


class SolverError(LipcertError):
    """A numerical solver failed, ran out of memory, or returned a solution that does not verify."""
