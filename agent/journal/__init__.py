"""Journal: the SQLite file of commanded states, grid events, compliance and the audit trail."""
