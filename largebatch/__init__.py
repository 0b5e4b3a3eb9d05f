"""largebatch: large-mini-batch synchronous data-parallel training of image classifiers.

From the command line: `largebatch train | eval | config | recipes`. From Python:
`largebatch.load_config(recipe, overrides)` then `largebatch.run(cfg)` (see `largebatch.api`).
Importing the package does not import torch; training does.
"""

from largebatch.api import load_config, run

__version__ = "0.1.0"
__all__ = ["load_config", "run"]
