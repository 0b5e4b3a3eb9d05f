"""The errors that mean "the input is wrong" (reported in one line, exit status 2), as opposed to bugs."""

from largebatch.checkpoint import CheckpointError
from largebatch.config import ConfigError
from largebatch.data import DatasetError
from largebatch.train import NonFiniteLossError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, NonFiniteLossError)
