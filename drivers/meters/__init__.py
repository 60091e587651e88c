"""Revenue meters at the point of interconnection (Modbus TCP register maps)."""
