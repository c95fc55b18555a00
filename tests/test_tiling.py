"""Tests for vlmkit.tiling: parity with transformers' own functions, hand-checked cases,
tile order and thumbnails. Image sizes are (width, height) unless a name says otherwise."""

import random
import types
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from transformers import LlavaNextProcessor, LlavaOnevisionProcessor, PreTrainedTokenizerFast
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, unpad_image
from transformers.models.llava_onevision.configuration_llava_onevision import LlavaOnevisionConfig
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from vlmkit import tiling as T

LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINPOINTS = LlavaOnevisionConfig().image_grid_pinpoints  # "(1x1),...,(6x6)" x 384, [h, w]
EXTREME_SIZES = [
    (1, 1), (1, 2), (2, 1), (1, 100_000), (100_000, 1), (3, 20_000), (20_000, 3),
    (336, 336), (337, 336), (672, 336), (336, 672), (1008, 336), (448, 448), (47, 47),
    (55, 88), (4000, 3000), (3000, 4000), (10_000, 10_000),
]


def random_sizes(n, seed):
    """(width, height) pairs from 1x1 up to very wide / very tall, seeded."""
    rng = random.Random(seed)
    scales = [8, 64, 800, 4000, 30_000]
    out = list(EXTREME_SIZES)
    while len(out) < n:
        out.append((rng.randint(1, rng.choice(scales)), rng.randint(1, rng.choice(scales))))
    return out


def solid_blocks(colors, block_w, block_h):
    """An RGB image made of flat blocks; colors[r][c] is the block at row r, column c."""
    rows, cols = len(colors), len(colors[0])
    arr = np.zeros((rows * block_h, cols * block_w, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            arr[r * block_h : (r + 1) * block_h, c * block_w : (c + 1) * block_w] = colors[r][c]
    return Image.fromarray(arr)


def center_pixel(img):
    return img.getpixel((img.width // 2, img.height // 2))


# --------------------------------------------------------------------------------------
# parse_grid_pinpoints
# --------------------------------------------------------------------------------------


def test_parse_range_string_matches_transformers_onevision_default():
    assert T.parse_grid_pinpoints("(1x1),...,(6x6)", 384) == [tuple(p) for p in OV_PINPOINTS]


def test_parse_small_range_hand_checked():
    assert T.parse_grid_pinpoints("(1x1),...,(2x2)", 336) == [(336, 336), (336, 672), (672, 336), (672, 672)]
    assert T.parse_grid_pinpoints("(1x2),(2x3)", 10) == [(10, 20), (10, 30), (20, 20), (20, 30)]


def test_parse_list_and_literal_string_keep_order_as_height_width():
    assert T.parse_grid_pinpoints(LLAVA_NEXT_PINPOINTS, 336) == [tuple(p) for p in LLAVA_NEXT_PINPOINTS]
    assert T.parse_grid_pinpoints(str([tuple(p) for p in LLAVA_NEXT_PINPOINTS]), 336) == [
        tuple(p) for p in LLAVA_NEXT_PINPOINTS
    ]
    with pytest.raises(ValueError):
        T.parse_grid_pinpoints([], 336)
    with pytest.raises(ValueError):
        T.parse_grid_pinpoints("(2x2),(1x1)", 336)


def test_parse_anyres_max():
    assert T.parse_anyres_max("anyres_max_9") == 9
    assert T.parse_anyres_max(4) == 4
    assert T.parse_anyres_max(None) is None and T.parse_anyres_max("anyres") is None
    with pytest.raises(ValueError):
        T.parse_anyres_max("anyres_max_")


# --------------------------------------------------------------------------------------
# select_best_resolution
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cands", [LLAVA_NEXT_PINPOINTS, OV_PINPOINTS], ids=["next", "onevision"])
def test_select_best_resolution_parity_random(cands):
    for w, h in random_sizes(3000, seed=1):
        assert T.select_best_resolution((w, h), cands) == tuple(hf_select_best_resolution((h, w), cands)), (w, h)


@settings(max_examples=300, deadline=None, database=None)
@given(
    w=st.integers(1, 50_000),
    h=st.integers(1, 50_000),
    cands=st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), min_size=1, max_size=8),
)
def test_select_best_resolution_parity_hypothesis(w, h, cands):
    assert T.select_best_resolution((w, h), cands) == tuple(hf_select_best_resolution((h, w), cands))


def test_select_best_resolution_hand_checked():
    # 1000x500: 336x672 (h x w) holds 672x336 with no waste; 672x672 holds the same, wastes 225792.
    assert T.select_best_resolution((1000, 500), LLAVA_NEXT_PINPOINTS) == (336, 672)
    assert T.select_best_resolution((500, 1000), LLAVA_NEXT_PINPOINTS) == (672, 336)
    # a small image fits every candidate: least waste, then the first listed (336x672, one row).
    assert T.select_best_resolution((100, 100), LLAVA_NEXT_PINPOINTS) == (336, 672)
    assert T.select_best_resolution((1, 1), OV_PINPOINTS) == (384, 384)
    assert T.anyres_grid((1000, 500), LLAVA_NEXT_PINPOINTS, 336) == (1, 2)
    rows, cols = T.anyres_grid((3000, 4000), OV_PINPOINTS, 384)
    assert (rows * 384, cols * 384) == tuple(hf_select_best_resolution((4000, 3000), OV_PINPOINTS))


# --------------------------------------------------------------------------------------
# resize / pad / tiles
# --------------------------------------------------------------------------------------


def test_patch_output_size_hand_checked():
    # 800x300 onto 672x672: the width limits (0.84): 672 x ceil(252.0) = 252
    assert T.patch_output_size((800, 300), (672, 672)) == (672, 252)
    assert T.patch_output_size((300, 800), (672, 672)) == (252, 672)
    assert T.patch_output_size((1, 1), (336, 672)) == (336, 336)
    # ceil, clipped to the canvas
    assert T.patch_output_size((3, 7), (100, 100)) == (43, 100)


def test_anyres_tiles_order_and_base_first():
    colors = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]
    img = solid_blocks(colors, 336, 336)  # 672x672, fits [672, 672] exactly
    tiles = T.anyres_tiles(img, [[672, 672]], 336)
    assert len(tiles) == 5 and all(t.size == (336, 336) for t in tiles)
    assert [center_pixel(t) for t in tiles[1:]] == [colors[0][0], colors[0][1], colors[1][0], colors[1][1]]
    base = tiles[0]  # the whole image at one tile
    assert base.getpixel((84, 84)) == colors[0][0] and base.getpixel((252, 84)) == colors[0][1]
    assert base.getpixel((84, 252)) == colors[1][0] and base.getpixel((252, 252)) == colors[1][1]


def test_anyres_tiles_wide_grid_row_major():
    colors = [[(10 * i, 255 - 10 * i, 7 * i) for i in range(3)]]
    img = solid_blocks(colors, 1000, 1000)  # 3000x1000 -> 1 row x 3 cols at 336 (1008x336)
    assert T.anyres_grid(img.size, LLAVA_NEXT_PINPOINTS, 336) == (1, 3)
    tiles = T.anyres_tiles(img, LLAVA_NEXT_PINPOINTS, 336)
    assert [center_pixel(t) for t in tiles[1:]] == colors[0]


def test_anyres_padding_is_centred_with_fill():
    img = Image.new("RGB", (800, 300), (0, 200, 0))
    canvas = T.resize_and_pad_for_patching(img, (672, 672), fill=(255, 0, 255))
    arr = np.asarray(canvas)
    # resized to 672x252, pasted at y = (672 - 252) // 2 = 210
    assert (arr[:210] == (255, 0, 255)).all() and (arr[462:] == (255, 0, 255)).all()
    assert (arr[210:462] == (0, 200, 0)).all()
    tiles = T.anyres_tiles(img, [[672, 672]], 336, fill=(255, 0, 255))
    top_left = np.asarray(tiles[1])
    assert (top_left[:210] == (255, 0, 255)).all() and (top_left[210:] == (0, 200, 0)).all()
    # odd extra: left pad floor, right pad gets the odd pixel
    # (1x3 onto 9 high x 6 wide: resized to 3x9, extra 3 -> 1 left, 2 right)
    canvas = np.asarray(T.resize_and_pad_for_patching(Image.new("RGB", (1, 3), (9, 9, 9)), (9, 6)))
    assert canvas.shape == (9, 6, 3) and (canvas[:, 0] == 0).all() and (canvas[:, 1:4] == 9).all()
    assert (canvas[:, 4:] == 0).all()


@pytest.mark.parametrize("size", [(1, 1), (500, 180), (300, 900), (1200, 700)])
def test_anyres_tiles_pixel_parity_with_transformers(size):
    rng = np.random.default_rng(sum(size))
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        do_rescale=False, do_normalize=False, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
    )
    ref = np.asarray(proc(Image.fromarray(arr), return_tensors="np")["pixel_values"][0])
    tiles = T.anyres_tiles(Image.fromarray(arr), LLAVA_NEXT_PINPOINTS, 336)
    ours = np.stack([np.asarray(t).transpose(2, 0, 1) for t in tiles])  # [N, 3, 336, 336]
    assert ref.shape == ours.shape
    assert np.array_equal(ref.astype(np.float64), ours.astype(np.float64))


# --------------------------------------------------------------------------------------
# unpad and token counts
# --------------------------------------------------------------------------------------


def test_unpad_features_equals_transformers_unpad_image():
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(0)
    shapes = [(24, 48), (48, 24), (48, 48), (24, 72), (72, 24), (27, 54), (162, 135), (8, 8), (1, 1)]
    for w, h in random_sizes(600, seed=4):
        gh, gw = rng.choice(shapes)
        feat = torch.randn(2, gh, gw, generator=gen)
        ref = unpad_image(feat, (h, w))
        ours = T.unpad_features(feat, (w, h))
        assert torch.equal(ours, ref), (w, h, gh, gw)
        assert torch.equal(T.unpad_features(feat.permute(1, 2, 0), (w, h), channels_last=True), ref.permute(1, 2, 0))


def test_unpad_hand_checked():
    # 1x1 image in a 24x48 grid: content is 24 wide, (48 - 24) // 2 = 12 cut each side
    assert T.unpad_shape((24, 48), (1, 1)) == (0, 12, 24, 24)
    # 1000x500 in a 24x48 grid: same aspect, nothing cut
    assert T.unpad_shape((24, 48), (1000, 500)) == (0, 0, 24, 48)
    # 800x300 in 48x48: new_h = int(round(300 * 48 / 800, 7)) = 18, pad 15 top and bottom
    assert T.unpad_shape((48, 48), (800, 300)) == (15, 0, 18, 48)
    # odd remainder: 47 rows of content in 48 -> (48 - 47) // 2 = 0, nothing cut
    assert T.unpad_shape((48, 48), (48, 47)) == (0, 0, 48, 48)


def test_anyres_num_tokens_hand_checked():
    # 1000x500, 1x2 tiles of 24x24, no padding: 576 base + 24 rows * (48 + 1)
    assert T.anyres_num_tokens((1000, 500), LLAVA_NEXT_PINPOINTS, 336, 24) == 576 + 24 * 49
    # 1x1 image: grid 1x2, content 24x24: 576 + 24 * 25
    assert T.anyres_num_tokens((1, 1), LLAVA_NEXT_PINPOINTS, 336, 24) == 1176
    # anyres_max_9 with 6x6 tiles of 27: 162x162 unpadded, ratio sqrt(162^2 / (9 * 27^2)) = 2 > 1.1
    info = T.anyres_feature_grid((4000, 4000), OV_PINPOINTS, 384, 27, "anyres_max_9")
    assert (info["rows"], info["cols"], info["unpad_h"], info["h"], info["w"]) == (6, 6, 162, 81, 81)
    assert info["num_tokens"] == 729 + 81 * 82
    # ratio <= 1.1: no downscale (2x2 tiles: 54x54, ratio 2/3)
    info = T.anyres_feature_grid((700, 700), OV_PINPOINTS, 384, 27, 9)
    assert (info["h"], info["w"]) == (54, 54) and info["num_tokens"] == 729 + 54 * 55


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "<video>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_anyres_num_tokens_parity_llava_next_processor():
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        ),
        tokenizer=_tiny_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    sizes = random_sizes(2000, seed=5)
    ref = proc._get_num_multimodal_tokens(image_sizes=[[h, w] for w, h in sizes])["num_image_tokens"]
    ours = [T.anyres_num_tokens((w, h), LLAVA_NEXT_PINPOINTS, 336, 24) for w, h in sizes]
    assert ours == ref


def test_anyres_num_tokens_parity_onevision_processor():
    # LlavaOnevisionProcessor.__init__ wants a video processor (torchvision); set the
    # attributes its own _get_number_of_features reads instead.
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.image_processor = LlavaOnevisionImageProcessorPil()
    proc.num_image_tokens = 729
    for spec in ("anyres_max_9", "anyres_max_4"):
        proc.vision_aspect_ratio = spec
        for w, h in random_sizes(1500, seed=6):
            ref = proc._get_number_of_features(h, w, 384, 384)
            assert T.anyres_num_tokens((w, h), "(1x1),...,(6x6)", 384, 27, spec) == ref, (w, h, spec)


def _fake_llava_model(tile, patch, pinpoints):
    vision = types.SimpleNamespace(image_size=tile, patch_size=patch)
    return types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision, image_grid_pinpoints=pinpoints))


def test_pack_anyres_features_parity_with_transformers_models():
    # small tiles (32 px, patch 4 -> g = 8) keep this fast; pinpoints scaled the same way
    tile, patch, c = 32, 4, 3
    g = tile // patch
    next_pp = [[p[0] * tile // 336, p[1] * tile // 336] for p in LLAVA_NEXT_PINPOINTS]
    ov_pp = T.parse_grid_pinpoints("(1x1),...,(6x6)", tile)
    ov_pp_lists = [list(p) for p in ov_pp]
    gen = torch.Generator().manual_seed(0)
    newline = torch.randn(c, generator=gen)
    for w, h in random_sizes(150, seed=7):
        # LLaVA-NeXT
        rows, cols = T.anyres_grid((w, h), next_pp, tile)
        feats = torch.randn(1 + rows * cols, g * g, c, generator=gen)
        ref, lens = LlavaNextModel.pack_image_features(
            _fake_llava_model(tile, patch, next_pp), [feats], torch.tensor([[h, w]]), "default", newline
        )
        ours = T.pack_anyres_features(feats, (w, h), next_pp, tile, newline)
        assert torch.equal(ours, ref[0]), (w, h)
        assert ours.shape[0] == T.anyres_num_tokens((w, h), next_pp, tile, g)
        # LLaVA-OneVision, anyres_max_9 (the bilinear downscale kicks in for big images)
        rows, cols = T.anyres_grid((w, h), ov_pp, tile)
        feats = torch.randn(1 + rows * cols, g * g, c, generator=gen)
        ref, _ = LlavaOnevisionModel.pack_image_features(
            _fake_llava_model(tile, patch, ov_pp_lists), [feats], torch.tensor([[h, w]]), newline, "anyres_max_9"
        )
        ours = T.pack_anyres_features(feats, (w, h), ov_pp, tile, newline, "anyres_max_9")
        assert torch.equal(ours, ref[0]), (w, h)
        assert ours.shape[0] == T.anyres_num_tokens((w, h), ov_pp, tile, g, 9)


def test_pack_anyres_features_checks_tile_count():
    with pytest.raises(ValueError, match="tiles"):
        T.pack_anyres_features(torch.zeros(2, 64, 2), (1000, 500), [[32, 64], [64, 32]], 32, None)


# --------------------------------------------------------------------------------------
# InternVL dynamic tiling
# --------------------------------------------------------------------------------------


def test_internvl_candidates_sorted_by_tile_count():
    cands = T.internvl_candidate_grids(1, 12)
    assert len(cands) == len({(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}) == 35
    assert [a * b for a, b in cands] == sorted(a * b for a, b in cands)
    assert cands[0] == (1, 1)
    assert all(4 <= a * b <= 6 for a, b in T.internvl_candidate_grids(4, 6))
    with pytest.raises(ValueError):
        T.internvl_candidate_grids(3, 2)


def test_internvl_grid_hand_checked():
    # exact aspect 2: (2, 1) first; (4, 2) replaces it only if W*H > 0.5 * 448^2 * 8 = 802816
    assert T.internvl_grid((1000, 500)) == (2, 1)
    assert T.internvl_grid((2000, 1000)) == (4, 2)
    # square: (1,1); (2,2) once W*H > 401408; (3,3) once W*H > 903168
    assert T.internvl_grid((448, 448)) == (1, 1)
    assert T.internvl_grid((640, 640)) == (2, 2)
    assert T.internvl_grid((1000, 1000)) == (3, 3)
    assert T.internvl_grid((1, 1)) == (1, 1)
    assert T.internvl_grid((10_000, 1)) == (12, 1) and T.internvl_grid((1, 10_000)) == (1, 12)
    assert T.internvl_grid((1344, 896)) == (3, 2)  # aspect 1.5, cols x rows
    assert T.internvl_grid((1000, 1000), max_tiles=6) == (2, 2)
    assert T.internvl_num_tiles((1000, 1000)) == 10 and T.internvl_num_tiles((448, 448)) == 1
    assert T.internvl_num_tiles((1000, 1000), use_thumbnail=False) == 9


def test_internvl_grid_parity_with_transformers_min1():
    for w, h in random_sizes(3000, seed=8):
        for max_tiles in (6, 12):
            ours = T.internvl_grid((w, h), 448, 1, max_tiles)
            assert ours == tuple(get_optimal_tiled_canvas((h, w), (448, 448), 1, max_tiles)), (w, h)


def test_internvl_grid_vs_transformers_only_differs_on_same_count_ties():
    """transformers' GotOcr2 lists grids width-major before its sort; InternVL uses set order.

    With min_tiles > 1 two grids with the same tile count can be exactly equally close to
    the aspect ratio; then the one listed later may win, so the two can disagree.
    Everywhere else they agree."""
    rng = random.Random(9)
    sizes = random_sizes(800, seed=10)
    for mn, mx in [(1, 12), (2, 3), (4, 4), (5, 5), (6, 7), (8, 8), (3, 9)]:
        cands = T.internvl_candidate_grids(mn, mx)
        # add exact midpoints between same-count grids, small and large
        extra = []
        for a in cands:
            for b in cands:
                if a < b and a[0] * a[1] == b[0] * b[1]:
                    mid = (Fraction(*a) + Fraction(*b)) / 2
                    extra += [(mid.numerator * k, mid.denominator * k) for k in (1, 100, 1000)]
        for w, h in sizes[: rng.randint(300, 800)] + extra:
            ours = T.internvl_grid((w, h), 448, mn, mx)
            ref = tuple(get_optimal_tiled_canvas((h, w), (448, 448), mn, mx))
            if ours != ref:
                assert ours[0] * ours[1] == ref[0] * ref[1], (w, h, mn, mx)
                assert abs(w / h - ours[0] / ours[1]) == abs(w / h - ref[0] / ref[1]), (w, h, mn, mx)
    # a concrete disagreement: min = max = 4, aspect 2.5 is midway between 4x1 and 2x2
    assert T.internvl_grid((500, 200), 448, 4, 4) == (4, 1)
    assert tuple(get_optimal_tiled_canvas((200, 500), (448, 448), 4, 4)) == (2, 2)


def test_internvl_tiles_order_and_thumbnail_last():
    colors = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    img = solid_blocks(colors, 448, 448)  # 1344x896 -> 3 cols x 2 rows, no resize
    tiles = T.internvl_tiles(img)
    assert len(tiles) == 7 and all(t.size == (448, 448) for t in tiles)
    assert [center_pixel(t) for t in tiles[:6]] == colors[0] + colors[1]
    thumb = np.asarray(tiles[6])
    assert tuple(thumb[75, 75]) == colors[0][0] and tuple(thumb[75, 373]) == colors[0][2]
    assert tuple(thumb[373, 224]) == colors[1][1]
    # single tile: no thumbnail
    one = T.internvl_tiles(Image.new("RGB", (300, 280), (1, 2, 3)))
    assert len(one) == 1 and one[0].size == (448, 448)
    assert len(T.internvl_tiles(img, use_thumbnail=False)) == 6
    assert len(T.internvl_tiles(Image.new("RGB", (1, 1)), max_tiles=1)) == 1


@pytest.mark.parametrize("size", [(1, 1), (900, 300), (500, 1300), (1000, 1000)])
def test_internvl_tiles_pixel_parity_with_transformers(size):
    rng = np.random.default_rng(sum(size))
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    proc = GotOcr2ImageProcessorPil()
    ref = proc.crop_image_to_patches(
        arr.transpose(2, 0, 1), 1, 12, patch_size=SizeDict(height=448, width=448),
        resample=PILImageResampling.BICUBIC,
    )
    ours = T.internvl_tiles(Image.fromarray(arr))
    assert len(ref) == len(ours) == T.internvl_num_tiles(size)
    for r, o in zip(ref, ours):
        assert np.array_equal(np.asarray(r), np.asarray(o).transpose(2, 0, 1))


def test_internvl_tile_budget():
    assert T.internvl_tile_budget(12, 1) == 12
    assert T.internvl_tile_budget(12, 5) == 2
    assert T.internvl_tile_budget(12, 13) == 1
    with pytest.raises(ValueError):
        T.internvl_tile_budget(12, 0)


def test_sizes_are_width_height():
    with pytest.raises(ValueError):
        T.select_best_resolution((0, 5), LLAVA_NEXT_PINPOINTS)
    # a wide image gets more columns than rows under both schemes
    assert T.anyres_grid((3000, 400), OV_PINPOINTS, 384)[1] > T.anyres_grid((3000, 400), OV_PINPOINTS, 384)[0]
    cols, rows = T.internvl_grid((3000, 400))
    assert cols > rows
