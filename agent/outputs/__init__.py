"""Outputs: read-only views of the site (metrics, MQTT, logs, the operator page)."""
