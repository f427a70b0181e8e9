"""Grid-aware ATSS: the same assignment as ``atss.atss_assign``, at a cost independent of the anchors.

The reference ranks every anchor of a level for every box (a top-k over ``[G, A_l]``). Anchors lie
on a regular grid, so per box and level this orders the valid columns by distance from the box
centre and the valid rows likewise (closed-form, no sort), takes the k nearest locations among a
small "star" of (column rank, row rank) pairs, computes IoUs for those ``k * #A`` candidates only,
and resolves boxes that share an anchor by scattering into the ``[A]`` output. Nothing of size
``[G, A]`` is built: the star has O(k log k) locations (35 for k = 9, where the
reference ranks all 16,800 of P3 at 800x1344).

Why the star holds the k nearest valid locations
------------------------------------------------
Valid anchors are those whose centre lies inside the resized image, so on each level the valid
locations form a rectangle of ``nx`` columns x ``ny`` rows in the top-left corner of the grid (the
function checks this on the mask it is given). All anchors of a location share its centre exactly
(``anchors.py`` keeps x1 + x2 exact), tie in distance and have consecutive indices, so ranking
anchors by (distance, index) is ranking locations by (distance, location index), each location then
expanded to its ``#A`` anchors.

List the valid columns nearest first (the nearest, then outwards, one side after the other while
both have columns left) and the rows likewise. If a location's column is the a-th and its row the
b-th of these lists (counting from 1), the a * b locations pairing one of the first a columns with
one of the first b rows are valid (the rectangle) and no farther from the centre (each offset is no
larger). So a location with a * b > k has at least k others no farther: apart from exact ties it is
not among the k nearest. The star is every pair with ``a * b <= k + 3``; the 3 extra keep exact
ties with the k-th nearest inside it, so pixel-aligned boxes, whose distances tie often, stay on
this path (tested for box centres on a 1/16-cell grid, inside and at the borders of the valid
region, k = 1 to 13, 16 and 25).

That argument is the motivation; the guarantee is a check on the float32 distances themselves, the
same numbers the reference compares. Rounding is monotone, so a location at list positions (a, b)
is no nearer than ``fl(c_a + r_b)``, with ``c_a`` the smallest squared column offset at position a
or later in the list (a suffix minimum, which stays a lower bound even where rounding makes the
list's order imperfect) and ``r_b`` likewise. Columns not in the list lie beyond its two ends, so
by the same monotonicity they are no nearer than the end columns' neighbours (if those lie on the
far side of the centre; otherwise the bound is 0). Every location outside the star is at or beyond
(component-wise) one of the few minimal pairs just outside it, so their bound is a lower bound for
all of them. When the k-th nearest location of the star is strictly nearer than that bound, the
star's k nearest (ties broken by location index, as the reference does) are the level's k nearest.
The function checks this for every valid box and level, and checks that the valid mask is a
top-left rectangle; if a check fails anywhere in the batch it returns the reference assigner's
result instead (``lax.cond``: the reference is computed only then, one image at a time). This
happens only where float32 distances collapse (a box centre tens of thousands of pixels from the
anchors) or a distance ties the k-th to within float32 rounding outside the star. The answer is the
reference's in every case.
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

# Pairs beyond a * b <= k in the star, so that exact distance ties with the k-th nearest stay inside.
_STAR_MARGIN = 3


def _star(topk: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The star and the minimal (column, row) list-position pairs outside it, positions 0-based.

    The star is ``rows``: at column position a it takes row positions ``b < rows[a]``, the pairs with
    ``(a + 1) * (b + 1) <= k + _STAR_MARGIN``. Positions run to ``R = k + _STAR_MARGIN``; position R
    stands for every line beyond the list. Every pair of ``[0, R]^2`` outside the star is
    component-wise at or beyond one of the minimal pairs.
    """
    limit = topk + _STAR_MARGIN
    rows = [limit // (a + 1) for a in range(limit + 1)]  # non-increasing; rows[limit] = 0
    outside = [(a, rows[a]) for a in range(limit + 1) if a == 0 or rows[a] < rows[a - 1]]
    return rows[:limit], outside


def _nearest_lines(
    center: jax.Array, stride: np.ndarray, center_offset: np.float32, num_valid: jax.Array, count: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``count`` valid columns (or rows) nearest a coordinate, nearest first.

    Args:
      center: ``[L, G]`` box centre coordinate, pixels.
      stride: ``[L, 1]`` each level's stride; line l's centre is ``(l + center_offset) * stride``.
      center_offset: the grid's anchor centre offset, in strides (`_center_offset`).
      num_valid: ``[L, 1]`` int32; lines ``[0, num_valid)`` are valid.
      count: how many lines to list.

    Returns:
      ``line [count, L, G]`` int32; ``squared [count, L, G]`` float32, each line's squared offset from
      the centre as the reference computes it (inf past the valid lines); ``floor [count + 1, L, G]``:
      ``floor[j]`` is no more than the squared offset of any valid line at list position j or later,
      ``floor[count]`` of any line not listed.
    """

    def squared_offset(line):  # and whether a valid line lies on the centre's side of `nearest`
        offset = center - (line.astype(jnp.float32) + center_offset) * stride
        valid = (line >= 0) & (line < num_valid)
        misplaced = valid & jnp.where(line < nearest, offset < 0, offset > 0)
        return jnp.where(valid, offset * offset, jnp.inf), misplaced

    last = jnp.maximum(num_valid - 1, 0)
    # The nearest line, the lower one of an exact tie: l + center_offset closest to center / stride.
    nearest = jnp.clip(jnp.ceil(center / stride - (center_offset + 0.5)), 0, last).astype(jnp.int32)
    # Outwards from the nearest line, one side after the other; the nearer neighbour's side first (exact
    # ties: the lower line, as the reference's index order); once a side runs out, the other side alone.
    right_first = squared_offset(nearest + 1)[0] < squared_offset(nearest - 1)[0]
    step = jnp.where(right_first, 1, -1)
    room_first = jnp.where(right_first, last - nearest, nearest)
    room_other = jnp.where(right_first, nearest, last - nearest)
    both = jnp.minimum(room_first, room_other)
    position = jnp.arange(count, dtype=jnp.int32)[:, None, None]
    alternating = position <= 2 * both
    depth = jnp.where(alternating, (position + 1) // 2, position - both)
    alternate_side = jnp.where(position % 2 == 1, step, -step)
    side = jnp.where(alternating, alternate_side, jnp.where(room_first <= room_other, -step, step))
    line = nearest + side * depth
    squared = squared_offset(line)[0]

    # Unlisted lines lie beyond the listed run's ends: no nearer than the line just past each end if that
    # line lies beyond the centre too (rounding is monotone); a bound of 0 otherwise, which fails the check.
    listed = squared < jnp.inf
    ends = (
        jnp.min(jnp.where(listed, line, num_valid), axis=0) - 1,
        jnp.max(jnp.where(listed, line, -1), axis=0) + 1,
    )
    beyond = jnp.inf
    for end in ends:
        end_squared, misplaced = squared_offset(end)
        beyond = jnp.minimum(beyond, jnp.where(misplaced, 0.0, end_squared))
    floor = jax.lax.cummin(jnp.concatenate([squared, beyond[None]]), axis=0, reverse=True)
    return line, squared, floor


def _center_offset(grid: AnchorGrid) -> np.float32:
    """The offset o of the grid's anchor centres ``(x + o) * stride`` (``anchors.center_offset``), read off its
    first anchor; the same on every level and axis, which `make_anchor_grid` guarantees and this checks."""
    first = np.cumsum((0, *grid.level_sizes[:-1]))
    offsets = grid.centers[first] / np.asarray(grid.strides, np.float32)[:, None]
    if not np.all(offsets == offsets[0, 0]):
        raise ValueError(f"the grid ATSS assigner needs one anchor centre offset on every level; got {offsets}")
    return offsets[0, 0]


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


def _star_candidates(
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
      every level, the k-th candidate is strictly nearer than every location outside the star.
    """
    num_boxes, num_levels = gt_centers.shape[0], len(grid.strides)
    num_cols, num_rows, rectangular = _valid_extent(grid, anchor_valid)
    stride = np.asarray(grid.strides, np.float32)[:, None]
    width = np.asarray([w for _, w in grid.level_shapes], np.int32)[:, None]
    centers = jnp.broadcast_to(gt_centers.T[:, None, :], (2, num_levels, num_boxes))
    star_rows, outside = _star(topk)
    count = topk + _STAR_MARGIN
    center_offset = _center_offset(grid)
    col, col_sq, col_floor = _nearest_lines(centers[0], stride, center_offset, num_cols[:, None], count)
    row, row_sq, row_floor = _nearest_lines(centers[1], stride, center_offset, num_rows[:, None], count)

    # The star's locations along a leading axis [n, L, G], built from slices (a gather is slower on XLA:CPU);
    # the same addition as the reference's dx * dx + dy * dy.
    sq_distance = jnp.concatenate([col_sq[a] + row_sq[:rows] for a, rows in enumerate(star_rows)])
    location = jnp.concatenate([row[:rows] * width + col[a] for a, rows in enumerate(star_rows)])
    # k rounds of (nearest, lowest location index among equals, remove it): the reference's order. Each is
    # one vectorised pass over the star; XLA:CPU's top_k costs far more per row. Over [n, L * G] rather
    # than [n, L, G]: XLA:CPU runs these reductions about 3x faster on one long trailing axis.
    sq_distance = sq_distance.reshape(len(sq_distance), -1)
    location = location.reshape(len(location), -1)
    nearest_sq, nearest = [], []
    for _ in range(topk):
        value = jnp.min(sq_distance, axis=0)
        first = jnp.min(jnp.where(sq_distance == value, location, np.iinfo(np.int32).max), axis=0)
        nearest_sq.append(value)
        nearest.append(first)
        sq_distance = jnp.where(location == first, jnp.inf, sq_distance)
    nearest_sq = jnp.stack(nearest_sq, -1).reshape(num_levels, num_boxes, topk)
    nearest = jnp.stack(nearest, -1).reshape(num_levels, num_boxes, topk)  # [L, G, k]
    slot_valid = jnp.isfinite(nearest_sq)

    bound = jnp.min(jnp.stack([col_floor[a] + row_floor[b] for a, b in outside]), axis=0)
    exact = rectangular & jnp.all((nearest_sq[..., -1] < bound) | jnp.isinf(bound), axis=0)

    offsets = np.cumsum((0, *grid.level_sizes[:-1])).astype(np.int32)[:, None, None, None]
    per_location = grid.anchors_per_location
    location = jnp.where(slot_valid, nearest, 0)
    candidates = offsets + location[..., None] * per_location + jnp.arange(per_location)  # [L, G, k, #A]
    mask = jnp.broadcast_to(slot_valid[..., None], candidates.shape)

    def to_rows(x):  # [L, G, k, #A] -> [G, K]: the reference's min(k, cells) slots per level, in order
        levels = [x[i, :, : min(topk, h * w)].reshape(num_boxes, -1) for i, (h, w) in enumerate(grid.level_shapes)]
        return jnp.concatenate(levels, axis=1)

    return to_rows(candidates).astype(jnp.int32), to_rows(mask), exact


def _assign_image(
    grid: AnchorGrid, anchor_valid: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array, topk: int, center_eps: float
) -> tuple[AssignResult, jax.Array]:
    """Grid-aware ATSS for one image; also returns whether the star was provably exact."""
    # Padding boxes may hold anything; give them a finite centre so the lists stay in range.
    gt_centers = jnp.where(gt_valid[:, None], box_lib.box_centers(gt_boxes), 0.0)
    candidates, mask, exact = _star_candidates(grid, anchor_valid, gt_centers, topk)
    result = assign_candidates(jnp.asarray(grid.boxes), anchor_valid, gt_boxes, gt_valid, candidates, center_eps, mask)
    return result, jnp.all(exact | ~gt_valid)


def atss_assign_grid(
    grid: AnchorGrid,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    topk: int,
    center_eps: float,
) -> AssignResult:
    """ATSS for a batch, equal to ``vmap(atss_assign)`` (ties included), in O(G * L * k^2 log k) per image.

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
