"""Diff a simulator's reply against a reply recorded from a real miner: names, types, codes.

``shape_diff`` walks both documents and lists every key present in one and not the other and
every value whose JSON type differs (an int where the firmware sends a float, a number where it
sends a numeric string). Values themselves move with physics and are not compared, except what
the caller asks for (STATUS codes and messages). Recordings live in ``../shared/data`` and are
read from there, never copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_DATA

ASIC_RS = SHARED_DATA / "fixtures" / "miners" / "asic-rs"


def recording_dir(family: str, version: str) -> Path:
    """``../shared/data/fixtures/miners/asic-rs/<family>/<version>``, or skip saying why."""
    folder = ASIC_RS / family / version
    if not folder.is_dir():
        pytest.skip(f"recorded replies {folder} are missing (set SITE_AGENT_SHARED_DATA)")
    return folder


def load(folder: Path, name: str) -> dict[str, Any]:
    doc = json.loads((folder / f"{name}.json").read_text())
    assert isinstance(doc, dict)
    return doc


def json_type(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "list"
    return "object"


def shape_diff(recorded: object, simulated: object, path: str = "$") -> list[str]:
    """Every difference in key names and value types, one line each, sorted."""
    out: list[str] = []
    rt, st = json_type(recorded), json_type(simulated)
    if rt != st:
        return [f"{path}: type {st}, recorded {rt}"]
    if isinstance(recorded, dict) and isinstance(simulated, dict):
        for key in sorted(set(recorded) | set(simulated)):
            sub = f"{path}.{key}"
            if key not in simulated:
                out.append(f"{sub}: missing")
            elif key not in recorded:
                out.append(f"{sub}: extra")
            else:
                out.extend(shape_diff(recorded[key], simulated[key], sub))
    elif isinstance(recorded, list) and isinstance(simulated, list):
        # Rows of one section share a shape: compare each simulated row with the recorded row
        # at the same index, or the last recorded one (a section may have more rows here).
        if recorded and simulated:
            for i, row in enumerate(simulated):
                out.extend(shape_diff(recorded[min(i, len(recorded) - 1)], row, f"{path}[{i}]"))
        elif recorded and not simulated:
            out.append(f"{path}: empty, recorded has rows")
    return sorted(out)


def merged(*docs: dict[str, Any]) -> dict[str, Any]:
    """One row with every key of ``docs`` (first wins on a clash), to diff against a union."""
    out: dict[str, Any] = {}
    for d in docs:
        for k, v in d.items():
            out.setdefault(k, v)
    return out
