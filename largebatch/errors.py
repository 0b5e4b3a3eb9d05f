"""The errors that mean "the input is wrong", as opposed to bugs.

Each is reported by the command line in one line with exit status 2, and every one of them derives
from `UserError`, so a caller catches that one class. This module imports nothing, so the command
line can name these errors without importing torch.
"""


class UserError(Exception):
    """Bad input from the user (a config, a dataset, a checkpoint) or a run the input made fail."""


class ConfigError(UserError, ValueError):
    """An invalid configuration; the message names the field, the value and what is allowed."""


class DatasetError(UserError, ValueError):
    """Bad dataset input; the message names the path or field and what is allowed."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or not one of ours; the message names the path."""


class NonFiniteLossError(UserError, RuntimeError):
    """The global loss became NaN or infinite (run.on_nonfinite = 'stop'); the message names the step."""


class RankLostError(RuntimeError):
    """A collective failed because another process of the job died or stopped answering; the message
    names this rank, the step and the newest checkpoint. A fault, not bad input: under torchrun
    --max-restarts the job restarts and `--resume auto` continues from that checkpoint."""


class RanksDivergedError(RuntimeError):
    """The ranks of a job no longer hold the same parameters; the message names the first differing
    tensor, the ranks and the step."""


class RunInterrupted(KeyboardInterrupt):
    """A second Ctrl-C stopped the run at once, without a checkpoint of its own; the message names the
    newest checkpoint there is and how to continue from it."""
