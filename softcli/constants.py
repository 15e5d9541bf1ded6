"""Numbers several modules rely on, defined once so that one name always means one value.

Import from here instead of writing the number again (issue 16 found ImageNet
mean/std in three places and two different ``TIFF_TILE``). Tile sizes and
overlaps of the tiling engine stay in :mod:`softcli.tiling`, beside the code
that defines what they mean.
"""

from __future__ import annotations

#: Per-channel RGB mean and std of ImageNet, in [0, 1] units: the normalisation of every published SOFT checkpoint.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Downsampling of the four SOFT stage maps relative to the input (stage 1 → 4 px per cell ... stage 4 → 32).
STAGE_STRIDES: tuple[int, int, int, int] = (4, 8, 16, 32)

#: Tile side of feature-map OME-TIFFs (``soft features --out x.ome.tif``): C float32 planes, so a 256² tile is
#: 256 KiB per channel and a reader fetching a small region decodes little.
FEATURE_TIFF_TILE = 256
#: Tile side of label-mask OME-TIFFs (``soft segment --out x.tif``): one uint8 plane, so a 512² tile is 256 KiB,
#: the same bytes per tile as a feature plane at 256².
MASK_TIFF_TILE = 512

#: Memory budget when none is given and the machine's free RAM cannot be read (library calls; the command line's
#: ``--max-memory auto`` is half the RAM available now).
DEFAULT_MAX_MEMORY = 2 * 2**30
#: Largest image decoded whole (2^28 px, about 3 GiB as float RGB): a decompression-bomb guard, ``--max-pixels``.
DEFAULT_MAX_PIXELS = 1 << 28
