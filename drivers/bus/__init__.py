"""Message-bus transports (MQTT through aiomqtt); the agent's MQTT bridge sits on top."""
