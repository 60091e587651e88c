"""Config of the node role: ``node:`` of a node agent, ``remote_nodes:`` of a controller.

Light on purpose (pydantic only): loading a config never imports an MQTT library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from drivers.bus.settings import BrokerSettings

Seconds = Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]
NodeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeRoleConfig(_Strict):
    """This process is a node agent: it owns the devices of its config and obeys a controller."""

    id: NodeId
    broker: BrokerSettings = BrokerSettings()
    # What the node does when the controller falls silent (protocol: envelope_when_silent).
    fail_after_s: Seconds = 120.0
    fail_direction: Literal["shed", "hold"] = "shed"
    # (epoch, seq) of the last applied command and its envelope: a restart refuses replays
    # and comes back to the journaled envelope.
    journal_path: Path = Path("site-agent-node.json")
    views_interval_s: Seconds = 2.0  # views are also published after every control cycle


class RemoteNodeConfig(_Strict):
    """One node agent the controller dispatches as a fleet."""

    id: NodeId
    max_w: float = Field(gt=0, le=2e9, allow_inf_nan=False)  # counted until it first reports
    timeout_s: Seconds = 30.0  # silent this long: faulted, counted at its worst case


class RemoteNodesConfig(_Strict):
    """The controller side: node agents reached through one broker (``driver: mqtt-node``)."""

    broker: BrokerSettings = BrokerSettings()
    nodes: list[RemoteNodeConfig] = Field(min_length=1, max_length=10_000)
    ack_timeout_s: Seconds = 10.0  # apply() waits this long for a node's ack
    validity_s: Seconds = 60.0  # a command's validity window
    beat_interval_s: Seconds = 5.0  # the controller's heartbeat (retained)
