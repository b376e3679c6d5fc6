"""Tiles and batches: segmenting frames too large for one pass, and many frames per pass.

Line-scan strips (a few hundred px by many thousands) and 4K area-camera frames do not fit a GPU
in one piece, and a TensorRT engine is built for inputs up to one size. :class:`TiledSegmenter`
cuts such an image into overlapping tiles of one shape (:class:`TileGrid`, :func:`split`),
segments them, and stitches the maps (:func:`stitch`).

Stitching keeps from each tile only the pixels it *owns*: overlaps are cut along their centre
line, so every owned pixel lies at least overlap/2 px inside its tile (except at the image's own
borders). The inner segmenter mirror-pads every tile by ``REFLECT_MARGIN_PX``, so a tile's
border pixels still see (mirrored) context; the overlap moves the seams further from those
mirrored borders, where a tile's view of the scene differs most from the whole image's.
Tiling is not invariant, and for the exported models it should not be: their ASPP branches
(atrous rates up to 18 at stride 16, and image pooling over the whole input) were trained on
256-384 px crops, and on a whole 960x720 frame they see more scene than they ever saw. Fitted
tiles of at most 512 px (``inference.tile``, the pipeline's default) score better against
ground truth than the whole frame: F1 at 2 px on the CrackTree260 validation images 0.900
against 0.872 (README, "Tiles"). Giving every tile the frame's image-pooling average instead
(an experiment: the ONNX graph cut at the pooling node) brought tiles closer to the whole frame
and further from the truth (0.889), so it was not kept.

The tiles of one frame share a shape, so a backend that batches same-shaped images
(``inference.segmenter.BatchedSegmenter``) runs them as one batch: on a GPU a batch of tiles
costs little more than one.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from crackscan.config import TILE_MULTIPLE, check_tiling
from inference.segmenter import ModelInfo, Segmenter, check_batch

# The pipeline's default tile overlap (inference.tile_overlap), which training validation uses
# too (training.loop.predict with the recipe's val_tile).
DEFAULT_OVERLAP = 64


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis of ``length`` px: every ``tile - overlap`` px, the
    last one shifted back so that it ends at the image's end (it then shares more than
    ``overlap`` px with its neighbour). A length up to ``tile`` gives one tile at 0."""
    step = tile - overlap
    starts = []
    start = 0
    while start + tile < length:
        starts.append(start)
        start += step
    starts.append(max(0, length - tile))
    return starts


def owned_span(starts: list[int], index: int, length: int, tile: int) -> tuple[int, int]:
    """The [begin, end) that tile ``index`` owns along one axis: from the centre line of its
    overlap with the previous tile to the centre line of its overlap with the next one (the
    image's ends for the first and last tiles)."""
    begin = 0 if index == 0 else (starts[index - 1] + tile + starts[index]) // 2
    end = length if index == len(starts) - 1 else (starts[index] + tile + starts[index + 1]) // 2
    return begin, end


def fitted_side(length: int, tile: int, overlap: int) -> int:
    """The tile side along one axis of ``length`` px in a fitted grid: the fewest tiles of at
    most ``tile`` px that cover it with ``overlap`` px between neighbours, made equal and
    rounded up to a multiple of 32 (never above ``tile``). A length up to ``tile`` is one tile
    of exactly that length."""
    if length <= tile:
        return length
    count = -(-(length - overlap) // (tile - overlap))
    side = -(-(length + (count - 1) * overlap) // count)
    return min(tile, -(-side // TILE_MULTIPLE) * TILE_MULTIPLE)


@dataclass(frozen=True)
class TileGrid:
    """Tiles of at most ``tile`` px a side covering an HxW image with at least ``overlap`` px
    shared between neighbours.

    Windows are (top, left) in row-major order; tiles never leave the image (the last row and
    column of tiles are shifted back inside). Fixed (``fit=False``, for engines built for one
    input size): every tile is ``tile`` x ``tile``, and a side shorter than ``tile`` has one
    tile at 0 that the caller pads (:func:`split` mirror-pads it) up to ``tile``. Fitted
    (``fit=True``, for backends that take any size): each axis gets the fewest tiles that
    cover it, all of one side (:func:`fitted_side`), so a 640x360 frame is two 360x352 tiles,
    not two 512x512 ones that are mostly padding and overlap.
    """

    height: int
    width: int
    tile: int
    overlap: int
    fit: bool = False

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size {self.height}x{self.width} must be at least 1x1")
        check_tiling(self.tile, self.overlap)

    @property
    def tile_height(self) -> int:
        return fitted_side(self.height, self.tile, self.overlap) if self.fit else self.tile

    @property
    def tile_width(self) -> int:
        return fitted_side(self.width, self.tile, self.overlap) if self.fit else self.tile

    @property
    def tops(self) -> list[int]:
        return tile_starts(self.height, self.tile_height, self.overlap)

    @property
    def lefts(self) -> list[int]:
        return tile_starts(self.width, self.tile_width, self.overlap)

    def windows(self) -> list[tuple[int, int]]:
        """(top, left) of every tile, row by row."""
        return [(top, left) for top in self.tops for left in self.lefts]

    def keep(self, top: int, left: int) -> tuple[int, int, int, int]:
        """The pixels the tile at (top, left) owns when stitching, as (y0, y1, x0, x1) in image
        coordinates (half-open). Each overlap is split along its centre line, so the owned
        regions of all windows partition the image and an owned pixel is at least
        overlap // 2 px from its tile's border, unless that border is the image's."""
        tops, lefts = self.tops, self.lefts
        if top not in tops or left not in lefts:
            raise ValueError(f"({top}, {left}) is not a tile window of {self}")
        y0, y1 = owned_span(tops, tops.index(top), self.height, self.tile_height)
        x0, x1 = owned_span(lefts, lefts.index(left), self.width, self.tile_width)
        return y0, y1, x0, x1


def split(image: np.ndarray, grid: TileGrid) -> list[np.ndarray]:
    """The tiles of ``image`` (HxW or HxWxC, matching ``grid``) in ``grid.windows()`` order, all
    ``grid.tile_height`` x ``grid.tile_width``: where the image is shorter than a fixed grid's
    tile, the tile is mirror-padded at the bottom or right (the padding's map is dropped by
    :func:`stitch`)."""
    if image.shape[:2] != (grid.height, grid.width):
        raise ValueError(f"image of {image.shape[0]}x{image.shape[1]} px does not match "
                         f"grid of {grid.height}x{grid.width}")
    tiles = []
    for top, left in grid.windows():
        piece = image[top:top + grid.tile_height, left:left + grid.tile_width]
        bottom, right = grid.tile_height - piece.shape[0], grid.tile_width - piece.shape[1]
        if bottom or right:
            piece = cv2.copyMakeBorder(piece, 0, bottom, 0, right, cv2.BORDER_REFLECT_101)
        tiles.append(np.ascontiguousarray(piece))
    return tiles


def stitch(maps: list[np.ndarray], grid: TileGrid) -> np.ndarray:
    """The HxW float32 map of the whole image from the tiles' maps (in ``grid.windows()``
    order, each at least as large as the tile's part of the image; planes first, if any): every
    pixel comes from the one tile that owns it."""
    windows = grid.windows()
    if len(maps) != len(windows):
        raise ValueError(f"{len(maps)} maps for a grid of {len(windows)} tiles")
    whole = np.empty(maps[0].shape[:-2] + (grid.height, grid.width), np.float32)
    for (top, left), tile_map in zip(windows, maps, strict=True):
        y0, y1, x0, x1 = grid.keep(top, left)
        whole[..., y0:y1, x0:x1] = tile_map[..., y0 - top:y1 - top, x0 - left:x1 - left]
    return whole


class TiledSegmenter:
    """A Segmenter that cuts images larger than ``tile`` (either side) into overlapping tiles,
    segments the tiles in batches of up to ``max_batch`` with the inner segmenter, and stitches
    the maps. Smaller images go to the inner segmenter whole.

    By default every tile handed to the inner segmenter is ``tile`` x ``tile`` (see
    :func:`split`), so a fixed-shape engine can serve it; ``fit=True`` cuts each frame into the
    fewest equal tiles of at most ``tile`` px (:class:`TileGrid`), for backends that take any
    size. The tiles of one frame share a shape either way, so with a batching backend inside
    (``BatchedSegmenter``), each call is one real batch. ``tiles_run`` counts the tiles
    segmented so far.
    """

    def __init__(self, inner: Segmenter, tile: int = 512, overlap: int = 64,
                 max_batch: int = 8, fit: bool = False) -> None:
        check_tiling(tile, overlap)
        check_batch(max_batch)
        self.inner = inner
        self.tile = tile
        self.overlap = overlap
        self.max_batch = max_batch
        self.fit = fit
        self.info: ModelInfo = inner.info
        self.backend = f"{inner.backend}+tiles{tile}"
        self.tiles_run = 0

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One map per BGR uint8 image (see ``Segmenter.segment``), in input order."""
        maps: list[np.ndarray | None] = [None] * len(images)
        whole = [i for i, image in enumerate(images)
                 if image.shape[0] <= self.tile and image.shape[1] <= self.tile]
        if whole:
            results = self.inner.segment([images[i] for i in whole])
            for i, result in zip(whole, results, strict=True):
                maps[i] = result
        # Tiles of all large images of the call share one queue, so batches stay full.
        grids: dict[int, TileGrid] = {}
        tiles: list[np.ndarray] = []
        for i, image in enumerate(images):
            if maps[i] is None:
                grids[i] = TileGrid(image.shape[0], image.shape[1], self.tile, self.overlap,
                                    self.fit)
                tiles.extend(split(image, grids[i]))
        tile_maps: list[np.ndarray] = []
        for start in range(0, len(tiles), self.max_batch):
            tile_maps.extend(self.inner.segment(tiles[start:start + self.max_batch]))
        self.tiles_run += len(tiles)
        start = 0
        for i, grid in grids.items():
            count = len(grid.windows())
            maps[i] = stitch(tile_maps[start:start + count], grid)
            start += count
        return maps  # type: ignore[return-value]  # every slot filled above
