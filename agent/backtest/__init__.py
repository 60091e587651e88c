"""Backtest: the market replay, the oracle and the baselines; every rule comes from control."""
