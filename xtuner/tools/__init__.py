"""Command-line tools behind the ``xtuner`` command (each has ``main(argv) -> int``)."""
