"""Grid-aware ATSS: the same assignment as ``atss.atss_assign``, at a cost independent of the anchors.

The reference ranks every anchor of a level for every box (a top-k over ``[G, A_l]``). Anchors lie
on a regular grid, so the k nearest locations of a box lie in a small window of cells: per box and
level this takes squared distances to a ``(k + 2) x (k + 2)`` window of locations (all levels in
one array), a top-k over those, IoUs for the ``k * #A`` candidates, and resolves boxes that share an
anchor by scattering into the ``[A]`` output. Nothing of size ``[G, A]`` is built.

Why the window holds the true k nearest valid locations
-------------------------------------------------------
Valid anchors are those whose centre lies inside the resized image, so on each level the valid
locations form a rectangle of ``nx`` columns x ``ny`` rows in the top-left corner of the grid (the
function checks this on the mask it is given). All anchors of a location share its centre exactly
(``anchors.py`` keeps x1 + x2 exact), tie in distance and have consecutive indices, so ranking
anchors by (distance, index) is ranking locations by (distance, location index), each location then
expanded to its ``#A`` anchors.

Claim: if location (column i, row j) is among the k nearest valid locations, then i is among the k
nearest valid columns, ranked by (|dx|, column), and j among the k nearest valid rows.
Proof: suppose k valid columns i' precede i in that ranking. The rectangle makes every (i', j)
valid; each is no farther than (i, j) (same dy, |dx'| <= |dx|) and, when equally far, has the
lower column and so the lower index. So k locations precede (i, j): it is not among the k nearest.
Rows likewise (a lower row also means a lower index).

The k nearest valid columns to the centre's cell coordinate ``t = cx / stride - 0.5`` are a run
``[a, a + k)`` with ``a = clip(ceil(t - k / 2), 0, nx - k)`` (distance along a line is unimodal;
``ceil`` sends exact ties to the lower column). The window takes that run and one more column on
each side, clipped into ``[0, nx)``; rows likewise. A level narrower than the window is covered
whole (the window is padded with invalid cells, so every level has the same window shape); a centre
near or beyond the border of the valid region (image corners, padding, outside the canvas) moves the
window inward; a level with fewer than k valid locations gives all of them. Window cells are in
row-major order, which is location-index order, so ``top_k`` breaks distance ties as the reference.

Floating point: distances are computed exactly as the reference computes them, and rounding is
monotone, so every location outside the window is no nearer than the next column beyond the window
at the nearest valid row, or the next row beyond it at the nearest valid column. The window is
provably exact when the k-th candidate is strictly nearer than those few cells. The extra line on
each side puts real ties and near-ties inside the window, so this holds except where float32
distances collapse (a box centre tens of thousands of pixels from the anchors). The function checks
it for every valid box and level, and checks that the valid mask is a top-left rectangle; if a check
fails anywhere in the batch it returns the reference assigner's result instead (``lax.cond``: the
reference is computed only then, one image at a time). The answer is the reference's in every case.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from atss_jax import boxes as box_lib
from atss_jax.anchors import AnchorGrid
from atss_jax.assigners.atss import assign_candidates, atss_assign
from atss_jax.assigners.result import AssignResult

# Lines beyond the k nearest on each side of the window, so that near-ties across its edge stay in.
_WINDOW_MARGIN = 1


def _window_lines(
    center: jax.Array, stride: np.ndarray, num_valid: jax.Array, topk: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The window's columns (or rows): the k nearest valid ones and a margin, ascending.

    Args:
      center: ``[L, G]`` box centre coordinate, pixels.
      stride: ``[L, 1]`` each level's stride; line l's centre is ``(l + 0.5) * stride``.
      num_valid: ``[L, 1]`` lines ``[0, num_valid)`` are valid.
      topk: k.

    Returns:
      ``line [L, G, k + 2]`` int32, ``squared_offset`` (from the centre, as the reference computes
      it) and ``valid`` of the same shape, and ``beyond_squared [L, G, 2]``: the squared offset of
      the next valid line before and after the window, inf where there is none.
    """
    size = topk + 2 * _WINDOW_MARGIN
    start = jnp.ceil(center / stride - 0.5 - topk / 2) - _WINDOW_MARGIN
    start = jnp.clip(start, 0, jnp.maximum(num_valid - size, 0)).astype(jnp.int32)
    line = start[..., None] + jnp.arange(-1, size + 1)  # the window and one line beyond each end

    offset = center[..., None] - (line + 0.5).astype(jnp.float32) * stride[..., None]
    valid = (line >= 0) & (line < num_valid[..., None])
    squared = jnp.where(valid, offset * offset, jnp.inf)
    return line[..., 1:-1], squared[..., 1:-1], valid[..., 1:-1], squared[..., [0, -1]]


def _k_smallest(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k smallest entries along the LEADING axis, smallest first, ties to the lower position (as
    ``lax.top_k`` of the negated values along a last axis; positions of infinite values are unspecified).

    ``values [N, ...] -> ([..., k], [..., k] int32)``. k rounds of (min, first position of the min, remove
    it), each a vectorised pass over the trailing axes; on XLA:CPU that is 1.5x faster than ``lax.top_k``,
    whose cost is mostly per row.
    """
    size = values.shape[0]
    position = jnp.arange(size, dtype=jnp.int32).reshape(size, *([1] * (values.ndim - 1)))
    smallest, where = [], []
    for _ in range(k):
        value = jnp.min(values, axis=0)
        first = jnp.min(jnp.where(values == value, position, size), axis=0)
        smallest.append(value)
        where.append(first)
        values = jnp.where(position == first, jnp.inf, values)
    return jnp.stack(smallest, -1), jnp.stack(where, -1)


def _valid_extent(grid: AnchorGrid, anchor_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Valid columns ``[L]``, valid rows ``[L]``, and whether every level's mask is that rectangle."""
    num_cols, num_rows, rectangular = [], [], []
    offset = 0
    for (height, width), size in zip(grid.level_shapes, grid.level_sizes):
        mask = anchor_valid[offset : offset + size].reshape(height, width, grid.anchors_per_location)
        offset += size
        cols = jnp.sum(mask[0, :, 0], dtype=jnp.int32)
        rows = jnp.sum(mask[:, 0, 0], dtype=jnp.int32)
        rectangle = (jnp.arange(height)[:, None] < rows) & (jnp.arange(width)[None, :] < cols)
        num_cols.append(cols)
        num_rows.append(rows)
        rectangular.append(jnp.all(mask == rectangle[:, :, None]))
    return jnp.stack(num_cols), jnp.stack(num_rows), jnp.all(jnp.stack(rectangular))


def _window_candidates(
    grid: AnchorGrid, anchor_valid: jax.Array, gt_centers: jax.Array, topk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every level's k nearest valid locations of each box, for one image (all levels at once).

    Args:
      grid: the anchors.
      anchor_valid: ``[A]`` bool.
      gt_centers: ``[G, 2]`` float32 box centres (finite).
      topk: k.

    Returns:
      ``candidates [G, K]`` int32 anchor indices with ``K = sum_l min(k, cells_l) * #A`` in the
      reference's order, ``candidate_mask [G, K]`` (False for slots of levels with fewer than k
      valid locations), and ``exact [G]`` bool: the valid mask is a top-left rectangle and, on
      every level, the k-th candidate is strictly nearer than every location outside the window.
    """
    num_boxes = gt_centers.shape[0]
    num_cols, num_rows, rectangular = _valid_extent(grid, anchor_valid)
    stride = np.asarray(grid.strides, np.float32)[:, None]
    width = np.asarray([w for _, w in grid.level_shapes], np.int32)[:, None, None]
    centers = jnp.broadcast_to(gt_centers.T[:, None, :], (2, len(grid.strides), num_boxes))
    cols, col_sq, col_valid, col_beyond = _window_lines(centers[0], stride, num_cols[:, None], topk)
    rows, row_sq, row_valid, row_beyond = _window_lines(centers[1], stride, num_rows[:, None], topk)

    # Window cells row-major along a leading axis [rows * cols, L, G]; the same addition as the reference's
    # dx * dx + dy * dy.
    window = cols.shape[-1]
    row_sq_t, row_valid_t = (jnp.moveaxis(x, -1, 0)[:, None] for x in (row_sq, row_valid))
    col_sq_t, col_valid_t = (jnp.moveaxis(x, -1, 0)[None] for x in (col_sq, col_valid))
    sq_distance = jnp.where(row_valid_t & col_valid_t, row_sq_t + col_sq_t, jnp.inf)
    nearest_sq, position = _k_smallest(sq_distance.reshape(window * window, *sq_distance.shape[2:]), topk)
    row = jnp.take_along_axis(rows, position // window, axis=-1)
    col = jnp.take_along_axis(cols, position % window, axis=-1)
    slot_valid = jnp.isfinite(nearest_sq)
    location = jnp.where(slot_valid, row * width + col, 0)  # [L, G, k], nearest first

    # Every location outside the window is no nearer than the next column beyond it at the nearest
    # valid row, or the next row beyond it at the nearest valid column (rounding is monotone).
    bound = jnp.minimum(
        jnp.min(col_beyond + jnp.min(row_sq, axis=-1, keepdims=True), axis=-1),
        jnp.min(row_beyond + jnp.min(col_sq, axis=-1, keepdims=True), axis=-1),
    )
    kth_sq = nearest_sq[..., -1]
    exact = rectangular & jnp.all((kth_sq < bound) | jnp.isinf(bound), axis=0)

    offsets = np.cumsum((0, *grid.level_sizes[:-1])).astype(np.int32)[:, None, None, None]
    per_location = grid.anchors_per_location
    candidates = offsets + location[..., None] * per_location + jnp.arange(per_location)  # [L, G, k, #A]
    mask = jnp.broadcast_to(slot_valid[..., None], candidates.shape)

    def to_rows(x):  # [L, G, k, #A] -> [G, K]: the reference's min(k, cells) slots per level, in order
        levels = [x[i, :, : min(topk, h * w)].reshape(num_boxes, -1) for i, (h, w) in enumerate(grid.level_shapes)]
        return jnp.concatenate(levels, axis=1)

    return to_rows(candidates).astype(jnp.int32), to_rows(mask), exact


def _assign_image(
    grid: AnchorGrid, anchor_valid: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, topk: int, center_eps: float
) -> tuple[AssignResult, jax.Array]:
    """Grid-window ATSS for one image; also returns whether the window was provably exact."""
    # Padding boxes may hold anything; give them a finite centre so the runs stay in range.
    gt_centers = jnp.where(gt_valid[:, None], box_lib.box_centers(gt_boxes), 0.0)
    candidates, mask, exact = _window_candidates(grid, anchor_valid, gt_centers, topk)
    result = assign_candidates(jnp.asarray(grid.boxes), anchor_valid, gt_boxes, gt_valid, candidates, center_eps, mask)
    return result, jnp.all(exact | ~gt_valid)


def atss_assign_grid(
    grid: AnchorGrid,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    topk: int = 9,
    center_eps: float = 0.01,
) -> AssignResult:
    """ATSS for a batch, equal to ``vmap(atss_assign)`` (ties included), in O(G * L * k^2) per image.

    Args:
      grid: the static anchor grid (geometry, strides, anchors per location, boxes). For the
        anchor-free variant, a grid of one square anchor of side 8 * stride per location.
      anchor_valid: ``[B, A]`` bool, normally ``anchors.anchor_valid_mask`` of the image sizes.
      gt_boxes: ``[B, G, 4]`` float32 xyxy pixels, padded.
      gt_valid: ``[B, G]`` bool.
      topk: ATSS's k, in locations per level.
      center_eps: how far inside the box (pixels) a positive's centre must be.

    Returns:
      ``AssignResult`` with a leading batch axis: ``gt_index [B, A]``, ``num_positives [B, G]``,
      ``iou_threshold [B, G]``.
    """
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    reference = functools.partial(
        atss_assign,
        grid.boxes,
        level_sizes=grid.level_sizes,
        topk=topk,
        anchors_per_location=grid.anchors_per_location,
        center_eps=center_eps,
    )
    if gt_boxes.shape[1] == 0:
        return jax.vmap(reference)(anchor_valid, gt_boxes, gt_valid)
    result, exact = jax.vmap(lambda v, b, g: _assign_image(grid, v, b, g, topk, center_eps))(
        anchor_valid, gt_boxes, gt_valid
    )
    # The fallback runs one image at a time: its buffers, reserved even when it does not run, stay small.
    return jax.lax.cond(
        jnp.all(exact),
        lambda _: result,
        lambda args: jax.lax.map(lambda image: reference(*image), args),
        (anchor_valid, gt_boxes, gt_valid),
    )
