"""Broker settings, defined once: every MQTT client of the project is configured with these keys.

The agent's MQTT bridge (``mqtt:`` in the site config) and the MQTT curtailment source
(``grid.mqtt_curtail:``) both extend :class:`BrokerSettings`, so the same key means the same
thing in both places. Light on purpose (pydantic only, no MQTT library), so that loading a
config never imports a vendor library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field, SecretStr

from drivers.bus.base import BusSettings, LastWill
from drivers.inputs import StrictSettings

# A broker timeout or reconnect wait beyond a week is a typo (or 1e308), not a setting.
MAX_BROKER_S = 7 * 86400.0
Seconds = Annotated[float, Field(gt=0, le=MAX_BROKER_S, allow_inf_nan=False)]


class BrokerSettings(StrictSettings):
    """How to reach an MQTT broker, and how to come back when it goes away.

    Strict like every settings model read from a file: no booleans or text for numbers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    client_id: str | None = None
    # TLS to the broker: a CA to verify it, and optionally a client certificate and key.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    timeout_s: Seconds = 10.0  # to connect, and for the broker to acknowledge a QoS 1 call
    reconnect_initial_s: Seconds = 0.5  # the first wait after a failure; doubles each time
    reconnect_max_s: Seconds = 30.0

    def bus_settings(self, default_client_id: str, will: LastWill | None = None) -> BusSettings:
        """The transport's settings (the password resolved to its plain value)."""
        return BusSettings(
            host=self.host,
            port=self.port,
            client_id=self.client_id or default_client_id,
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            keepalive_s=self.keepalive_s,
            timeout_s=self.timeout_s,
            will=will,
        )
