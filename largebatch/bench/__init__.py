"""Measurements run from the command line (`largebatch bench ...`), one module per sub-command."""
