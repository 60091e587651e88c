"""The operator inbox: commands wait for the loop in a bounded queue; a flood is refused."""

from __future__ import annotations

import asyncio

from agent.control.commands import CommandResult, Refresh
from agent.runtime.inbox import AuditRequest, CommandInbox, Rejection, Submission


async def test_a_command_is_answered_by_whoever_serves_the_inbox() -> None:
    inbox = CommandInbox()
    answer = asyncio.create_task(inbox.submit(Refresh("r1", "op")))
    item = await asyncio.wait_for(inbox.next(), 1)
    assert isinstance(item, Submission)
    assert item.command.id == "r1"
    item.answer.set_result(CommandResult.ok("done"))
    assert await asyncio.wait_for(answer, 1) == CommandResult.ok("done")


async def test_a_flood_is_refused_at_once_and_rejections_are_queued_in_order() -> None:
    inbox = CommandInbox(max_waiting=2)
    waiting = [asyncio.create_task(inbox.submit(Refresh(f"r{i}", "op"))) for i in range(2)]
    await asyncio.sleep(0)
    refused = await asyncio.wait_for(inbox.submit(Refresh("r3", "op")), 1)
    assert refused == CommandResult.refuse("too many commands waiting for the agent; try again")
    inbox.reject("mqtt", "bad_token")  # the queue is full: dropped, never blocks the bridge
    first = await inbox.next()
    assert isinstance(first, Submission)
    assert first.command.id == "r0"
    inbox.reject("mqtt", "bad_token")
    await inbox.next()  # r1
    assert await inbox.next() == Rejection("mqtt", "bad_token")
    for task in waiting:
        task.cancel()


async def test_an_audit_request_travels_to_the_loop_and_a_flood_drops_it() -> None:
    inbox = CommandInbox(max_waiting=1)
    inbox.audit("mqtt", "command:curtail", "too_deep: nested deeper than 8 levels")
    inbox.audit("mqtt", "command:curtail", "dropped: the queue is full")  # never blocks
    assert await asyncio.wait_for(inbox.next(), 1) == AuditRequest(
        "mqtt", "command:curtail", "too_deep: nested deeper than 8 levels"
    )
    inbox.reject("mqtt", "too_deep")
    assert await asyncio.wait_for(inbox.next(), 1) == Rejection("mqtt", "too_deep")
