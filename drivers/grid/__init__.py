"""Grid signal adapters: OpenADR 2.0b VEN, MQTT curtailment topic, and the event model."""
