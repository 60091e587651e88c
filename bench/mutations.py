"""Mutation check of the safety code: does the suite catch a broken guard? (issue 14 item 6)

Each mutant is a small deliberate bug written as a source patch (an exact snippet and its
replacement). For each one this script copies the tree into a temporary folder, applies the
patch there (never to the working tree), runs the tests named for it with ``pytest -x``, and
prints one JSON line::

    {"name": ..., "file": ..., "killed": true, "by": "tests/...::test_...", "seconds": 12.3}

``killed`` is true when a test failed; ``by`` names the first failing test. A baseline run of
every named test on the unpatched copy comes first: if it fails, nothing else is meaningful and
the script stops. The exit status is 1 if any mutant survived.

    .venv/bin/python bench/mutations.py               # all mutants
    .venv/bin/python bench/mutations.py manual_mode   # those whose name contains a word
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
T = "tests/test_integrity.py::"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    patches: tuple[tuple[str, str], ...]  # (exact snippet, replacement), each found once
    tests: tuple[str, ...]
    kind: str = "extra"  # one of the five kinds issue 14 names, or "extra"


MUTANTS: tuple[Mutant, ...] = (
    # --- the five kinds that survived the review (issue 14 item 6) ---
    Mutant(
        "manual_mode_sends_commands",
        "agent/runtime/loop.py",
        (
            (
                '        if self.state.mode == "manual":\n            plan = replace(',
                "        if False:\n            plan = replace(",
            ),
        ),
        (
            T + "test_manual_mode_sends_no_device_commands",
            "tests/test_mqtt_agent.py::test_control_continues_while_the_broker_is_down",
        ),
        "manual mode that still sends device commands",
    ),
    Mutant(
        "set_mode_leaves_safe_mode",
        "agent/runtime/loop.py",
        (
            (
                "            if self.actuator.safe_reason is not None:\n"
                "                return CommandResult",
                "            if False:\n                return CommandResult",
            ),
        ),
        (T + "test_an_operator_cannot_leave_safe_mode",),
        "an operator set_mode that leaves safe mode",
    ),
    Mutant(
        "journal_read_failure_drops_events",
        "agent/runtime/events.py",
        (
            (
                "journal = {eid: (a.event, a.baseline_w) for eid, a in self.events.items()}",
                "journal = {}",
            ),
        ),
        (T + "test_a_journal_read_failure_keeps_the_overrides_in_force",),
        "a journal read failure that drops the events in force",
    ),
    Mutant(
        "hashprice_range_check_disabled",
        "drivers/prices/http_json.py",
        (
            (
                '        return (*HASHPRICE_RANGE_USD_PER_PH_DAY, "USD/PH/day")',
                '        return (-1e300, 1e300, "USD/PH/day")',
            ),
        ),
        (T + "test_a_hashprice_feed_out_of_range_is_never_used",),
        "a hashprice feed whose range check is disabled",
    ),
    Mutant(
        "secret_keys_stored_in_clear",
        "agent/control/redaction.py",
        (
            (
                "out[key] = REDACTED if is_secret_key(str(k)) else _redact(v, secrets)",
                "out[key] = _redact(v, secrets)",
            ),
        ),
        (
            T + "test_rejected_commands_are_audited_without_any_secret_in_the_journal",
            "tests/test_store.py",
        ),
        "secret values stored in clear in the journal",
    ),
    Mutant(
        "configured_secrets_not_collected",
        "agent/control/redaction.py",
        (("    walk(value)\n", "    pass\n"),),
        (T + "test_rejected_commands_are_audited_without_any_secret_in_the_journal",),
        "secret values stored in clear in the journal",
    ),
    Mutant(
        "known_secrets_stored_in_clear",
        "agent/control/redaction.py",
        (
            (
                "        text = text.replace(secret, REDACTED)\n",
                "        pass\n",
            ),
        ),
        (T + "test_rejected_commands_are_audited_without_any_secret_in_the_journal",),
        "secret values stored in clear in the journal",
    ),
    # --- more in the safety modules ---
    Mutant(
        "supervisor_does_not_restart",
        "agent/runtime/supervisor.py",
        (("        health.restarts += 1\n", "        raise RuntimeError(error)\n"),),
        (
            T + "test_a_dead_task_is_shown_restarted_with_backoff_and_control_goes_on",
            T + "test_a_price_answer_that_breaks_the_poller_does_not_stop_the_agent",
        ),
    ),
    Mutant(
        "one_mqtt_message_kills_the_bridge",
        "agent/outputs/mqtt.py",
        (
            (
                "except Exception as exc:  # one message must never end the command bridge",
                "except ZeroDivisionError as exc:",
            ),
            ('given = token.encode("utf-8", "surrogatepass")', "given = token.encode()"),
        ),
        (T + "test_one_message_with_an_unencodable_token_does_not_kill_the_bridge",),
    ),
    Mutant(
        "rejected_mqtt_commands_not_audited",
        "agent/outputs/mqtt.py",
        (
            (
                "        self.audit_rejection(REJECT_SOURCE,",
                "        (lambda *_: None)(REJECT_SOURCE,",
            ),
        ),
        (
            T + "test_one_message_with_an_unencodable_token_does_not_kill_the_bridge",
            T + "test_rejected_commands_are_audited_without_any_secret_in_the_journal",
        ),
    ),
    Mutant(
        "target_above_interconnect_accepted",
        "agent/control/limits.py",
        (
            (
                "if not math.isfinite(value) or not 0.0 <= value <= limits.interconnect_kw:",
                "if not math.isfinite(value) or not 0.0 <= value:",
            ),
        ),
        (
            T + "test_every_channel_applies_the_same_limits",
            T + "test_a_journaled_override_beyond_the_limits_is_quarantined_not_a_crash_loop",
        ),
    ),
    Mutant(
        "end_beyond_horizon_accepted",
        "agent/control/limits.py",
        (("    if end - now > timedelta(seconds=limits.max_horizon_s):", "    if False:"),),
        (T + "test_every_channel_applies_the_same_limits",),
    ),
    Mutant(
        "journal_not_revalidated_on_restore",
        "agent/runtime/loop.py",
        (
            (
                "                    check_event(stored.event, now, self.limits)\n",
                "                    pass\n",
            ),
        ),
        (T + "test_a_journaled_override_beyond_the_limits_is_quarantined_not_a_crash_loop",),
    ),
    Mutant(
        "command_id_shared_across_operators",
        "agent/runtime/loop.py",
        (
            (
                "                if previous.operator != command.operator:",
                "                if False:",
            ),
        ),
        (T + "test_a_replay_after_a_restart_is_answered_not_executed",),
    ),
    Mutant(
        "replay_after_restart_executed",
        "agent/runtime/loop.py",
        (
            (
                "                return CommandResult(previous.accepted, previous.reason)\n",
                "                pass\n",
            ),
        ),
        (T + "test_a_replay_after_a_restart_is_answered_not_executed",),
    ),
    Mutant(
        "journal_failure_never_enters_safe_mode",
        "agent/runtime/actuator.py",
        (
            (
                "        self.safe_reason = why\n",
                "        pass\n",
            ),
        ),
        (T + "test_an_operator_cannot_leave_safe_mode",),
    ),
    Mutant(
        "release_acknowledged_without_journal",
        "agent/runtime/events.py",
        (
            (
                "                await self.store.set_event_status(eid, EventStatus.ENDED)\n",
                "                try:\n"
                "                    await self.store.set_event_status(eid, EventStatus.ENDED)\n"
                "                except AgentError:\n"
                "                    pass\n",
            ),
        ),
        (T + "test_a_release_the_journal_cannot_take_is_refused_and_the_override_holds",),
    ),
    Mutant(
        "grid_event_limits_skipped",
        "agent/runtime/events.py",
        (
            (
                "            violation = self._violation(event, now)\n"
                "            if violation is not None:\n"
                "                self.rejected.add(eid)",
                "            violation = None\n"
                "            if violation is not None:\n"
                "                self.rejected.add(eid)",
            ),
        ),
        (T + "test_every_channel_applies_the_same_limits",),
    ),
)


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked, not ignored) into ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the working tree but still tracked
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def run_tests(tree: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[bool, str | None]:
    """Run ``tests`` in ``tree``; (passed, first failing test)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [str(PYTHON), "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return False, "timeout"
    if proc.returncode == 0:
        return True, None
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.MULTILINE)
    return False, match.group(1) if match else f"exit {proc.returncode}"


def apply(tree: Path, mutant: Mutant) -> None:
    path = tree / mutant.file
    text = path.read_text()
    for old, new in mutant.patches:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"{mutant.name}: the snippet occurs {count} times in {mutant.file}")
        text = text.replace(old, new)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run only mutants whose name contains one")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="per mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unpatched run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.words or any(w in m.name for w in args.words)]
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        base = Path(tmp) / "base"
        copy_tree(base)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            ok, failed = run_tests(base, tests, args.timeout_s * 3)
            print(json.dumps({"baseline": ok, "tests": len(tests), "failed": failed}), flush=True)
            if not ok:
                return 2
        survivors = 0
        for mutant in chosen:
            tree = Path(tmp) / mutant.name
            shutil.copytree(base, tree)
            apply(tree, mutant)
            started = time.monotonic()
            passed, by = run_tests(tree, mutant.tests, args.timeout_s)
            survivors += passed
            line = {
                "name": mutant.name,
                "file": mutant.file,
                "kind": mutant.kind,
                "killed": not passed,
                "by": by,
                "seconds": round(time.monotonic() - started, 1),
            }
            print(json.dumps(line), flush=True)
            shutil.rmtree(tree, ignore_errors=True)
    killed = len(chosen) - survivors
    print(json.dumps({"mutants": len(chosen), "killed": killed, "survived": survivors}))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
