"""Runtime: coordinator, fleets, actuator and the main loop."""
