"""Adapters between site-agent and the outside world.

Only this package imports vendor libraries (pyasic, pynvml, openleadr, Slurm tools). Every
adapter returns the frozen reading types defined beside its protocol and raises the exceptions
of :mod:`drivers.errors`; nothing here imports :mod:`agent`.
"""
