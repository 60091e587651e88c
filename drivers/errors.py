"""The exception tree shared by every driver (and re-exported by the agent).

::

    AgentError                      root of everything site-agent raises on purpose
    ├── DeviceError                 carries ``device_id``
    │   ├── TransientDeviceError    worth retrying: the device may answer next time
    │   │   ├── DeviceTimeout       no answer within the call's timeout
    │   │   ├── DeviceUnavailable   connection refused/reset, GPU off the bus, scheduler down
    │   │   └── StaleReading        it answers, but its values have stopped moving (a frozen meter)
    │   └── PermanentDeviceError    retrying will not help
    │       ├── BadReply            the device answered nonsense (garbage, missing fields)
    │       │   └── WrongUnit       another Modbus unit answered (a miswired gateway, a wrong ID)
    │       ├── CommandRejected     the device said no (error status, out-of-range value)
    │       ├── CommandNotApplied   accepted, but telemetry shows it was not applied
    │       ├── AuthFailed          credentials refused
    │       └── Unsupported         the device cannot do this at all
    └── SourceError                 a signal source (price, hashprice, grid) failed
        ├── SourceTimeout           a read missed its total deadline (drivers/inputs.py)
        └── BadInput                a row/message/event that is malformed; carries ``source``
            └── InputRejected       refused by a bounded parser; carries ``reason``
                                    (drivers/inputs.py: too_large, too_deep, not_finite, ...)

Vendor exceptions are mapped to these at the driver border with ``raise ... from exc``.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every exception site-agent raises deliberately."""


class DeviceError(AgentError):
    """A device call failed. ``device_id`` names the device."""

    def __init__(self, device_id: str, message: str) -> None:
        super().__init__(f"{device_id}: {message}")
        self.device_id = device_id
        self.message = message


class TransientDeviceError(DeviceError):
    """The call may succeed if retried."""


class DeviceTimeout(TransientDeviceError):
    """The device did not answer within the call's timeout."""


class DeviceUnavailable(TransientDeviceError):
    """The device could not be reached (refused, reset, fallen off the bus)."""


class StaleReading(TransientDeviceError):
    """The device answers, but its values have not changed for longer than allowed."""


class PermanentDeviceError(DeviceError):
    """Retrying will not help without a change on the device or in config."""


class BadReply(PermanentDeviceError):
    """The device answered, but the answer is malformed or missing fields."""


class WrongUnit(BadReply):
    """A Modbus answer came from another unit ID than the one asked."""


class CommandRejected(PermanentDeviceError):
    """The device refused the command (error status, value out of range)."""


class CommandNotApplied(PermanentDeviceError):
    """The device accepted a command but its telemetry shows it was not applied."""


class AuthFailed(PermanentDeviceError):
    """The device refused our credentials."""


class Unsupported(PermanentDeviceError):
    """The device cannot perform this operation."""


class SourceError(AgentError):
    """A signal source (prices, hashprice, grid events) failed or is unreachable."""

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message


class BadInput(SourceError):
    """A row, message or event was malformed and was rejected without effect."""
