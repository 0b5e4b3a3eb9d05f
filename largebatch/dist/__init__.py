"""Everything that knows about more than one process lives in this package."""

from largebatch.dist.ddp import check_same_init, wrap_model
from largebatch.dist.env import (Collectives, DistEnv, all_gather_objects, all_reduce_sum, init_distributed,
                                 shutdown)

__all__ = ["Collectives", "DistEnv", "all_gather_objects", "all_reduce_sum", "check_same_init",
           "init_distributed", "shutdown", "wrap_model"]
