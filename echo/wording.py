"""Counts in messages: a run over one file says "1 file", not "1 files"."""


def counted(count: int, noun: str) -> str:
    """"1 file", "3 files"."""
    return f"{count} {noun if count == 1 else noun + 's'}"
