"""Tile grid, blend weights and the stitching engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from softcli.engine import DiskSink, MemorySink, OutputSpec, run_dense
from softcli.io.readers import ArrayReader
from softcli.tiling import TileGrid, axis_layout, choose_tile_size, estimate_memory
from softcli.units import parse_size

SIZES = [(32, 32), (33, 47), (100, 64), (256, 256), (257, 300), (520, 130), (1000, 777)]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("tile,overlap", [(64, 0), (64, 32), (128, 32), (96, 64), (256, 64)])
def test_every_pixel_covered_and_aligned(h, w, tile, overlap):
    grid = TileGrid(h, w, tile, overlap)
    cover = np.zeros(grid.padded, np.int32)
    for t in grid:
        assert t.y % 32 == 0 and t.x % 32 == 0 and t.h % 32 == 0 and t.w % 32 == 0
        assert t.h <= tile and t.w <= tile
        assert t.y >= 0 and t.x >= 0 and t.y + t.h <= grid.padded[0] and t.x + t.w <= grid.padded[1]
        cover[t.y:t.y + t.h, t.x:t.x + t.w] += 1
    assert cover.min() >= 1
    assert grid.padded == (-(-h // 32) * 32, -(-w // 32) * 32)
    # Neighbours overlap by at least the asked overlap.
    for pos, t in ((grid.ys, grid.tile_h), (grid.xs, grid.tile_w)):
        for a, b in zip(pos, pos[1:]):
            assert a + t - b >= overlap
            assert b > a


def test_small_image_is_one_tile():
    grid = TileGrid(100, 70, 1024, 64)
    assert grid.whole and grid.tile_size == (128, 96) and len(grid) == 1


def test_tiles_shrink_to_fit_evenly():
    pos, t = axis_layout(2048, 1024, 64)
    assert len(pos) == 3 and t < 1024 and pos[0] == 0 and pos[-1] + t == 2048
    pos, t = axis_layout(1024, 1024, 64)
    assert pos == [0] and t == 1024


@pytest.mark.parametrize("mode", ["linear", "gaussian"])
@pytest.mark.parametrize("h,w,tile,overlap", [(257, 300, 128, 32), (1000, 777, 256, 64), (64, 640, 64, 32),
                                              (520, 130, 96, 64)])
def test_weights_sum_to_one(mode, h, w, tile, overlap):
    grid = TileGrid(h, w, tile, overlap)
    for stride in (1, 4, 8, 16, 32):
        total = np.zeros((grid.padded[0] // stride, grid.padded[1] // stride))
        for t in grid:
            wts = grid.weights(t, stride, mode)
            assert wts.shape == (t.h // stride, t.w // stride)
            assert (wts >= 0).all()
            total[t.y // stride:(t.y + t.h) // stride, t.x // stride:(t.x + t.w) // stride] += wts
        np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_linear_weights_ignore_tile_borders():
    """Cells in the outer quarter of an overlap get weight 0 from the tile they border."""
    grid = TileGrid(64, 512, 256, 64)
    first = next(iter(grid))
    wx = grid.axis_weights(first, 1)[1]
    right_overlap = grid.xs[0] + grid.tile_w - grid.xs[1]
    assert (wx[-right_overlap // 4:] == 0).all() and wx[0] == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        TileGrid(100, 100, 100, 0)  # not a multiple of 32
    with pytest.raises(ValueError):
        TileGrid(100, 100, 64, 64)  # overlap as large as the tile
    with pytest.raises(ValueError):
        TileGrid(0, 100, 64, 0)


class LocalNet(nn.Module):
    """Maps at strides 4 and 8 with a receptive field far smaller than the overlap."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 6, 3, 2, 1))
        self.b = nn.Conv2d(6, 5, 3, 2, 1)

    def forward(self, x):
        f4 = self.a(x)
        return [f4, self.b(torch.relu(f4))]


@pytest.mark.parametrize("h,w,tile,overlap", [(200, 333, 96, 64), (300, 160, 128, 64), (97, 64, 64, 32)])
@pytest.mark.parametrize("sink_kind", ["memory", "disk"])
def test_local_model_tiled_equals_whole(tmp_path, h, w, tile, overlap, sink_kind):
    rng = np.random.default_rng(0)
    img = rng.random((h, w, 3), dtype=np.float32)
    net = LocalNet().eval()
    reader = ArrayReader(img)
    whole = TileGrid(h, w, 4096, 0)
    ref_sink = MemorySink()
    outputs = [OutputSpec("s4", 6, 4), OutputSpec("s8", 5, 8)]
    run_dense(net, reader, whole, outputs, ref_sink)
    grid = TileGrid(h, w, tile, overlap)
    assert len(grid) > 1
    sink = MemorySink() if sink_kind == "memory" else DiskSink(tmp_path)
    done = []
    stitcher = run_dense(net, reader, grid, outputs, sink,
                         on_tile=lambda d, n: done.append((d, n)))
    assert done[-1] == (len(grid), len(grid))
    for name, s in (("s4", 4), ("s8", 8)):
        ref, got = ref_sink.array(name), sink.array(name)
        assert got.shape == ref.shape == (ref.shape[0], -(-h // s), -(-w // s))
        np.testing.assert_allclose(got, ref, atol=1e-5)
    # Whole map as the unpadded model output (up to the replicated padding at the far edge).
    with torch.inference_mode():
        direct = net(torch.from_numpy(img.transpose(2, 0, 1).copy())[None])[0][0].numpy()
    np.testing.assert_allclose(ref_sink.array("s4")[:, :-2, :-2], direct[:, :-2, :-2], atol=1e-5)
    np.testing.assert_allclose(stitcher.pooled(1), ref_sink.array("s8").mean(axis=(1, 2)), atol=1e-5)
    if sink_kind == "disk":
        folder = sink.folder
        assert b"".join(bytes(b) for b in sink.iter_bytes("s8", chunk=1000)) == sink.array("s8").tobytes()
        sink.close()
        assert not folder.exists()


def test_stitcher_rejects_out_of_order_tiles():
    grid = TileGrid(128, 128, 64, 0)
    from softcli.engine import Stitcher

    st = Stitcher(grid, [OutputSpec("a", 1, 4)], MemorySink())
    tiles = list(grid)
    st.add(tiles[2], [np.zeros((1, 16, 16), np.float32)])
    with pytest.raises(ValueError):
        st.add(tiles[0], [np.zeros((1, 16, 16), np.float32)])
    with pytest.raises(ValueError):
        st.add(tiles[3], [np.zeros((1, 8, 8), np.float32)])


def test_memory_model_and_tile_choice():
    assert estimate_memory(2 * 1024**2) > estimate_memory(1024**2) > estimate_memory(0)
    small = choose_tile_size(parse_size("1GB"))
    big = choose_tile_size(parse_size("64GB"), cap=4096)
    assert small % 32 == 0 and big % 32 == 0 and 64 <= small < big <= 4096
    assert estimate_memory(small * small) <= parse_size("1GB")
    assert choose_tile_size(parse_size("64GB")) == 1024  # the default cap
def test_stitcher_checks_outputs_against_specs():
    from softcli.engine import Stitcher

    grid = TileGrid(64, 64, 64, 0)
    with pytest.raises(ValueError, match="names must differ"):
        Stitcher(grid, [OutputSpec("a", 1, 4), OutputSpec("a", 2, 8)], MemorySink())
    st = Stitcher(grid, [OutputSpec("a", 1, 4), OutputSpec("b", 2, 8)], MemorySink())
    with pytest.raises(ValueError, match="gave 1 maps for 2 outputs"):
        st.add(next(iter(grid)), [np.zeros((1, 16, 16), np.float32)])


def test_row_sinks_implement_only_what_the_stitcher_calls():
    """A sink that only takes rows (labels, sampled cells) has no read-back methods to leave unimplemented."""
    from softcli.engine import MapSink, RowSink
    from softcli.fit.segment import CellSampler
    from softcli.segment import LabelSink

    for cls in (LabelSink, CellSampler):
        assert issubclass(cls, RowSink) and not issubclass(cls, MapSink)
        assert not hasattr(cls, "read_rows") and not hasattr(cls, "array")
    with pytest.raises(TypeError):
        MapSink()  # type: ignore[abstract]

    class Rows(RowSink):
        def __init__(self) -> None:
            super().__init__()
            self.got: list[tuple[str, int, tuple[int, ...]]] = []

        def write_rows(self, name: str, y0: int, block: np.ndarray) -> None:
            self.got.append((name, y0, block.shape))

    img = np.random.default_rng(0).random((96, 64, 3), dtype=np.float32)
    sink = Rows()
    run_dense(lambda x: [x[:, :1, ::4, ::4]], ArrayReader(img), TileGrid(96, 64, 64, 32), [OutputSpec("a", 1, 4)],
              sink)
    assert sink.shapes == {"a": (1, 24, 16)}
    ys = [y0 for _, y0, _ in sink.got]
    assert ys == sorted(ys) and sum(s[1] for _, _, s in sink.got) == 24
