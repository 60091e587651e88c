"""Control: domain types, the site model, settlement and the pure policy."""
