"""Miner adapters: the capability protocols, their reading types, and the pyasic driver."""
