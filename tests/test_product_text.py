"""Code, docs, tests and records describe the product, not how it came to be: no ticket numbers, no talk of the
machines, meetings or people that produced a change.  Every text file git tracks is read (this file excepted);
git's history is where that story lives."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: phrases that tell the project's history instead of describing the code (case-insensitive)
HISTORY_TALK = [
    r"\bissue\s+#?\d+",  # a ticket number
    r"\bthe issue'?s?\b",  # "the case", "the issue asks"
    r"\b(this|one|same|that) session\b",
    r"\blent\b",  # "the lent machine"
    r"\bhand-?over\b",
    r"\bthis (change|work|commit|PR)\b",
    r"\bbefore this (change|work|commit)\b",
    r"\bthe review\b|\breviewers?\b|\bcode review\b",
    r"\bH100 VMs?\b",
    r"\bwas measured before\b",
    r"\bthis week\b|\byesterday\b|\blast week\b",
    r"(?<!\bis )(?<!\bare )(?<!\bbe )(?<!\bwas )(?<!\bwere )(?<!\bbeen )(?<!\bbeing )\bused to\b",  # "it used to say"
    r"\bbefore the \w+(?: \w+)? existed\b",
]
_PATTERN = re.compile("|".join(f"(?:{p})" for p in HISTORY_TALK), re.IGNORECASE)


def _tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout (an unpacked sdist): nothing tracked to read")
    files = []
    for name in listed.decode().split("\0"):
        path = REPO / name
        if not name or path == Path(__file__).resolve() or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:  # images and other binary files
            continue
        files.append(path)
    return files


def test_history_talk_patterns_catch_what_they_name():
    caught = [
        "see issue 15",
        "as in the issue's case",
        "in one session",
        "the lent H100",
        "the hand-over",
        "before this change",
        "after review by a reviewer",
        "on the H100 VM",
        "re-measured this week",
        "the label used to say nccl",
        "the same stores as before the FP8 modes existed",
    ]
    for phrase in caught:
        assert _PATTERN.search(phrase), phrase
    for phrase in (
        "it issues the loads",
        "silent failures",
        "the session's store",
        "lengths",
        "preview",
        "the flag is used to pick a slot",
        "the sockets that predate it",
    ):
        assert not _PATTERN.search(phrase), phrase


def test_no_product_file_tells_the_project_history():
    found = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            match = _PATTERN.search(line)
            if match:
                found.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)!r} in {line.strip()[:120]!r}")
    assert not found, "describe the code, not how it came to be:\n" + "\n".join(found)
