"""The ``site-agent`` command line: one module per command.

Vendor libraries load only inside the commands that need them, so ``--help`` is instant.
"""
