"""largebatch: large-mini-batch synchronous data-parallel training of image classifiers.

The command line (`largebatch train | eval | recipes`) is the main entry point; `largebatch.train.train`
runs a validated `largebatch.config.Config` from Python.
"""

__version__ = "0.1.0"
