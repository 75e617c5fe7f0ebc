"""The ``stepscope`` command line."""
