"""Riemannian optimisation on the Stiefel manifold of orthonormal-row matrices
(random points, tangent projection, QR/polar/Cayley retractions, and an optax
wrapper that keeps chosen parameter leaves exactly on the manifold)."""

from mmsafe.manifold.stiefel import (RETRACTIONS, StiefelState, orthogonality_error,
                                     project_tangent, random_stiefel, retract_cayley,
                                     retract_polar, retract_qr, stiefel_transform)

__all__ = [
    "RETRACTIONS", "StiefelState", "orthogonality_error", "project_tangent", "random_stiefel",
    "retract_cayley", "retract_polar", "retract_qr", "stiefel_transform",
]
