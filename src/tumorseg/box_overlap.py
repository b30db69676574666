"""How much of one box of voxel coordinates lies inside another: exact for boxes whose axes run
alike, the volume of a convex polytope for boxes turned against each other (`geometry.overlap_fraction`
says what the boxes are)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection

FLAT_ATOL = 1e-3  # voxels: a flat box this close to the other's side is inside it


def corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The 8 corners (8, 3) of the box [lo, hi]."""
    return np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T


def box_overlap(corners: np.ndarray, bottom: np.ndarray, top: np.ndarray) -> float:
    """Share of the axis-aligned box of `corners` inside [bottom, top] (exact for a box)."""
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    fraction = 1.0
    for axis in range(3):
        width = hi[axis] - lo[axis]
        if width <= 1e-9:  # a flat along this axis: all in or all out
            inside = bottom[axis] - FLAT_ATOL <= lo[axis] <= top[axis] + FLAT_ATOL
            fraction *= float(inside)
        else:
            fraction *= max(0.0, min(hi[axis], top[axis]) - max(lo[axis], bottom[axis])) / width
    return float(fraction)


def polytope_overlap(rot: np.ndarray, shift: np.ndarray, a_lo: np.ndarray, a_hi: np.ndarray,
                      b_lo: np.ndarray, b_hi: np.ndarray) -> float:
    """Volume of {rot x + shift : a_lo <= x <= a_hi} inside [b_lo, b_hi] over the former's volume."""
    inv = np.linalg.inv(rot)
    back = inv @ shift  # x = inv y - back
    eye = np.eye(3)
    # scipy's halfspaces [A | c] mean A y + c <= 0
    halfspaces = np.vstack([
        np.hstack([inv, (-back - a_hi)[:, None]]), np.hstack([-inv, (back + a_lo)[:, None]]),
        np.hstack([eye, -b_hi[:, None]]), np.hstack([-eye, b_lo[:, None]]),
    ])
    norms = np.linalg.norm(halfspaces[:, :3], axis=1, keepdims=True)
    # The centre of the largest ball inside both: a point qhull needs strictly inside
    ball = linprog(np.r_[0.0, 0.0, 0.0, -1.0], A_ub=np.hstack([halfspaces[:, :3], norms]), b_ub=-halfspaces[:, 3],
                   bounds=[(None, None)] * 3 + [(0.0, None)])
    if not ball.success or ball.x[3] <= 1e-6:  # disjoint, or touching in a face, an edge or a corner
        return 0.0
    shared = ConvexHull(HalfspaceIntersection(halfspaces, ball.x[:3]).intersections).volume
    return float(min(1.0, shared / (abs(np.linalg.det(rot)) * np.prod(a_hi - a_lo))))
