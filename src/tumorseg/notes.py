"""Notes about many cases as few lines: a thousand cases with the same note make one line."""

from __future__ import annotations


def grouped(notes: list[str]) -> list[str]:
    """"<case>: <text>" notes with the same text as one line naming a few of their cases."""
    cases: dict[str, list[str]] = {}
    for note in notes:
        case_id, sep, text = note.partition(": ")
        cases.setdefault(text if sep else note, []).append(case_id if sep else "")
    return [(f"{ids[0]}: {text}" if ids[0] else text) if len(ids) == 1 else
            f"{text} ({len(ids)} cases: {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
            for text, ids in cases.items()]
