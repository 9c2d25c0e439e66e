"""The training entry point's parts: command line, configs, data module and callbacks (used by ``main.py``)."""
