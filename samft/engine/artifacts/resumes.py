"""``resumes.jsonl``: one JSON line per ``samft train --resume`` that changed the config, appended by
:meth:`samft.engine.artifacts.rundir.RunDir.record_resume`: ``{"time": ..., "at": "step 120", "changed":
{key: {"from": old, "to": new}}}``. Damage (a line cut short too) is one line naming the file and the line."""

from __future__ import annotations

from pathlib import Path

from samft.engine.artifacts.fileio import fail, field, parse_json

KIND = "resumes"
FORMAT = "samft-resumes-jsonl-1"
MAX_LINES = 100_000


def read(path: str | Path) -> list[dict]:
    """The resumes recorded in ``path``, oldest first, each checked: ``time`` (a number), ``at`` (text),
    ``changed`` ({key: {"from", "to"}})."""
    path = Path(path)
    if not path.is_file():
        fail(path, "resume record not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(path, f"cannot read the resume record ({e})")
    if len(lines) > MAX_LINES:
        fail(path, f"holds {len(lines)} lines, expected at most {MAX_LINES}")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        entry = parse_json(line, path, f"line {n}")
        where = f"line {n}"
        field({"e": entry}, "e", dict, path, where)
        field(entry, "time", (int, float), path, where, lo=0)
        field(entry, "at", str, path, where)
        for key, change in field(entry, "changed", dict, path, where).items():
            field({key: change}, key, dict, path, f"{where}.changed")
        out.append(entry)
    return out


def write(path: str | Path, entry: dict) -> None:
    """Append one resume (never through a link: :func:`samft.files.append_text`)."""
    import json

    from samft.files import append_text

    append_text(path, json.dumps(entry) + "\n")
