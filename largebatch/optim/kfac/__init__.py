"""Kronecker-factored approximate curvature (K-FAC) as a gradient preconditioner for any optimizer."""

from largebatch.optim.kfac.inverse import DAMPING_MODES, INVERSE_METHODS
from largebatch.optim.kfac.preconditioner import KFACOptions, KFACPreconditioner, interval

__all__ = ["DAMPING_MODES", "INVERSE_METHODS", "KFACOptions", "KFACPreconditioner", "interval"]
