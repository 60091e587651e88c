"""site-agent: the control agent for hybrid data centers.

Miners, GPU servers and the grid behind one connection. Sub-packages follow the path of one
decision (design.md): ``control`` (pure), ``journal``, ``runtime``, ``outputs``, ``backtest``
and ``cli``.
"""
