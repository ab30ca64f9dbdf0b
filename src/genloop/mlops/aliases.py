"""Who is champion, who was, and moving it back: the registry side of promotion.

Aliases: `champion` (what generate serves), `challenger` (the newest version),
`previous-champion` (the champion before the current one). The registered model's tag
`genloop.champion_history` keeps every change of champion (version, when, by whom, why), so
the history can be audited in the MLflow UI and `genloop rollback` can walk it back.
"""

from __future__ import annotations

import getpass
import json
import logging
import time
from typing import Any

from genloop.core.errors import GenloopError
from genloop.mlops import tracking

log = logging.getLogger(__name__)

HISTORY_TAG = "genloop.champion_history"
PASSED_TAG = "genloop.gate.passed"
HISTORY_LIMIT = 200  # entries kept in the tag (MLflow tag values are bounded)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def champion_history(name: str) -> list[dict[str, Any]]:
    """Every change of champion, oldest first."""
    raw = tracking.model_tags(name).get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def _record(name: str, entry: dict[str, Any]) -> None:
    history = champion_history(name) + [entry]
    tracking.tag_model(name, HISTORY_TAG, json.dumps(history[-HISTORY_LIMIT:]))


def champion_version(name: str) -> str | None:
    current = tracking.get_alias_version(name, "champion")
    return str(current.version) if current is not None else None


def promote(name: str, version: str, why: str) -> str | None:
    """Make `version` champion; the one it replaces keeps `previous-champion`. Returns it."""
    previous = champion_version(name)
    if previous is not None and previous != version:
        tracking.set_alias(name, "previous-champion", previous)
        tracking.tag_version(name, previous, {"genloop.replaced_at": _now(), "genloop.replaced_by": version})
    tracking.set_alias(name, "champion", version)
    _record(name, {"version": version, "at": _now(), "by": "gate", "why": why, "replaced": previous})
    return previous


def passed_gate(tags: dict[str, str]) -> bool:
    """Whether a version's tags say it passed the promotion gate."""
    return tags.get(PASSED_TAG) == "True" or (PASSED_TAG not in tags and tags.get("genloop.promoted") == "True")


def _previous_of(history: list[dict[str, Any]], version: str) -> str | None:
    """The champion that `version` replaced the last time it became champion."""
    for entry in reversed(history):
        if entry["version"] == version:
            return entry.get("replaced")
    return None


def rollback(name: str, to: str | None = None, reason: str = "manual rollback", force: bool = False) -> dict[str, Any]:
    """Move `champion` back to the previous champion (or to version `to`).

    Refuses a version that never passed the gate unless `force`. Records who, when and why
    as tags of both versions and in the champion history.
    """
    current = champion_version(name)
    if current is None:
        raise GenloopError(f"model {name!r} has no champion to roll back (run the loop or `genloop register` first)")
    if to is None:
        prev = tracking.get_alias_version(name, "previous-champion")
        if prev is None:
            raise GenloopError(f"model {name!r} has no previous champion; name a version with --to "
                               f"(versions: {', '.join(map(str, tracking.version_numbers(name)))})")
        to = str(prev.version)
    target = tracking.get_version(name, to)
    if target is None:
        raise GenloopError(f"model {name!r} has no version {to}; versions: "
                           f"{', '.join(map(str, tracking.version_numbers(name))) or 'none'}")
    if to == current:
        raise GenloopError(f"version {to} of {name!r} is the champion already; nothing to roll back")
    tags = dict(target.tags)
    if not passed_gate(tags) and not force:
        why = tags.get("genloop.gate.reason") or tags.get("genloop.decision") or "no gate decision recorded"
        raise GenloopError(f"version {to} of {name!r} never passed the promotion gate ({why}); "
                           "pass --force to make it champion anyway")
    who, when = _user(), _now()
    history = champion_history(name)
    tracking.set_alias(name, "champion", to)
    before = _previous_of(history, to)
    if before is not None and before != to:
        tracking.set_alias(name, "previous-champion", before)
    else:
        tracking.delete_alias(name, "previous-champion")
    tracking.tag_version(name, to, {"genloop.rollback.at": when, "genloop.rollback.by": who,
                                    "genloop.rollback.why": reason, "genloop.rollback.from": current,
                                    "genloop.rollback.forced": force})
    tracking.tag_version(name, current, {"genloop.rolled_back_at": when, "genloop.rolled_back_by": who,
                                         "genloop.rolled_back_why": reason, "genloop.rolled_back_to": to})
    _record(name, {"version": to, "at": when, "by": who, "why": f"rollback: {reason}", "replaced": before,
                   "rolled_back_from": current, "forced": force})
    log.info("rollback: %s champion %s -> %s by %s (%s)", name, current, to, who, reason)
    return {"model_name": name, "champion_before": current, "champion": to, "previous_champion": before,
            "by": who, "at": when, "why": reason, "forced": force}
