"""Multi-scale deformable attention: the grid_sample reference against a per-point loop, the CPU
gather path against the reference (values and gradients), gradcheck, and the MSDeformAttn
module's official initialisation and sampling."""

import math

import torch

from m2f_lite.modeling.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_reference,
)

SHAPES = [(3, 4), (2, 3), (1, 2)]


def bilinear_zero_padded(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample a ``[D, H, W]`` map at (x, y) in [0, 1] map coordinates (align_corners=False: pixel
    centres at (j + 0.5) / W), with zeros outside the map."""
    _, h, w = value_map.shape
    px, py = x * w - 0.5, y * h - 0.5  # continuous pixel coordinates
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_map.shape[0], dtype=value_map.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * value_map[:, yy, xx]
    return out


def naive(value, shapes, locations, weights):
    """Deformable DETR Eq. 3's bracket, one query, head, level and point at a time."""
    B, _, M, D = value.shape
    _, Lq, _, _, P, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Lq, M, D, dtype=value.dtype)
    for b in range(B):
        for q in range(Lq):
            for m in range(M):
                for lvl, (h, w) in enumerate(shapes):
                    value_map = value[b, starts[lvl] : starts[lvl + 1], m].T.reshape(D, h, w)
                    for p in range(P):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        out[b, q, m] += weights[b, q, m, lvl, p] * bilinear_zero_padded(
                            value_map, x, y
                        )
    return out.flatten(2)  # [B, Lq, M*D]


def random_inputs(dtype=torch.float64, B=2, Lq=5, M=2, D=3, P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    L = len(SHAPES)
    value = torch.randn(B, S, M, D, generator=g, dtype=dtype)
    # locations in [-0.2, 1.2]: some samples fall (partly) outside the maps
    locations = torch.rand(B, Lq, M, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(B, Lq, M, L * P, generator=g, dtype=dtype).softmax(-1).view(B, Lq, M, L, P)
    return value, locations, weights


def test_reference_matches_per_point_loop():
    value, locations, weights = random_inputs()
    expected = naive(value, SHAPES, locations, weights)
    got = ms_deform_attn_reference(value, SHAPES, locations, weights)
    assert got.shape == (2, 5, 6)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # spatial_shapes as a tensor gives the same result
    torch.testing.assert_close(
        ms_deform_attn_reference(value, torch.tensor(SHAPES), locations, weights), got
    )


def test_gather_path_matches_the_reference_values_and_gradients():
    value, locations, weights = random_inputs()
    # points on pixel centres and edges, on the map border and far outside it
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    locations[0, 1, 0, :, 0] = torch.tensor([0.5, 1 / 3], dtype=torch.float64)
    locations[1, 2, 1, :, 1] = torch.tensor([-3.0, 5.0], dtype=torch.float64)
    grad_out = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = {}
    for fn in (ms_deform_attn_reference, ms_deform_attn_gather):
        inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
        out = fn(inputs[0], torch.tensor(SHAPES), *inputs[1:])
        results[fn] = (out.detach(), *torch.autograd.grad(out, inputs, grad_out))
    expected = naive(value, SHAPES, locations, weights)
    torch.testing.assert_close(results[ms_deform_attn_gather][0], expected, atol=1e-12, rtol=0)
    names = ("output", "value gradient", "locations gradient", "weights gradient")
    for name, a, b in zip(names, results[ms_deform_attn_gather], results[ms_deform_attn_reference]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)
    # float32: equal to float rounding
    value, locations, weights = random_inputs(dtype=torch.float32, seed=2)
    torch.testing.assert_close(
        ms_deform_attn_gather(value, SHAPES, locations, weights),
        ms_deform_attn_reference(value, SHAPES, locations, weights),
        atol=1e-6,
        rtol=0,
    )


def test_dispatcher_runs_the_gather_path_on_cpu(monkeypatch):
    value, locations, weights = random_inputs(dtype=torch.float32)
    gather = ms_deform_attn_gather(value, SHAPES, locations, weights)
    reference = ms_deform_attn_reference(value, SHAPES, locations, weights)
    assert not torch.equal(gather, reference)  # summation order differs: tells the paths apart
    assert torch.equal(ms_deform_attn(value, SHAPES, locations, weights), gather)
    monkeypatch.setenv("M2F_MSDA", "reference")
    assert torch.equal(ms_deform_attn(value, SHAPES, locations, weights), reference)


def test_gradcheck():
    value, locations, weights = random_inputs(B=1, Lq=2, M=1, D=2, P=1, seed=1)
    # keep sampling points away from pixel-grid lines, where bilinear interpolation has kinks
    locations = locations.clamp(0.05, 0.95)
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, locations, weights))
    for fn in (ms_deform_attn_reference, ms_deform_attn_gather):
        assert torch.autograd.gradcheck(lambda v, s, a, fn=fn: fn(v, SHAPES, s, a), inputs)


def test_official_initialisation():
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=4)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert (
        attn.attention_weights.weight.abs().sum() == 0
        and attn.attention_weights.bias.abs().sum() == 0
    )
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0
    grid = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # head 0 looks right, head 2 down, head 4 left, head 1 diagonally (scaled to the unit square)
    k = torch.arange(1, 5, dtype=torch.float32)
    torch.testing.assert_close(grid[0, 1], torch.stack([k, torch.zeros(4)], -1))
    torch.testing.assert_close(grid[2, 0], torch.stack([torch.zeros(4), k], -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid[4, 2], torch.stack([-k, torch.zeros(4)], -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid[1, 0], torch.stack([k, k], -1), atol=1e-6, rtol=0)
    assert torch.equal(grid[:, 0], grid[:, 2])  # the same pattern on every level


def test_module_samples_the_reference_point_of_the_chosen_level():
    torch.manual_seed(0)
    C, shapes = 8, [(4, 6), (2, 3)]
    attn = MSDeformAttn(d_model=C, n_levels=2, n_heads=2, n_points=3).double()
    with torch.no_grad():
        attn.sampling_offsets.bias.zero_()  # every point at the reference point
        attn.attention_weights.bias.view(2, 2, 3)[:, 1] = 30.0  # all weight on level 1
    S = sum(h * w for h, w in shapes)
    x = torch.randn(1, S, C, dtype=torch.float64)
    # each query's reference point is the centre of pixel (i, j) of level 1
    i, j = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 1])
    fi, fj = i.double(), j.double()
    ref = torch.stack([(fj + 0.5) / 3, (fi + 0.5) / 2], -1)  # [3, 2]
    ref = ref[None, :, None, :].expand(1, 3, 2, 2)
    out = attn(torch.randn(1, 3, C, dtype=torch.float64), ref, x, shapes)
    pixel = 24 + i * 3 + j  # level 1 starts after the 4x6 level
    expected = attn.output_proj(attn.value_proj(x[0, pixel]))
    torch.testing.assert_close(out[0], expected, atol=1e-9, rtol=0)


def test_padding_mask_zeroes_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)
    x = torch.randn(1, 6, 8)
    ref = torch.rand(1, 4, 1, 2)
    everything_padded = torch.ones(1, 6, dtype=torch.bool)
    out = attn(torch.randn(1, 4, 8), ref, x, [(2, 3)], padding_mask=everything_padded)
    torch.testing.assert_close(out, attn.output_proj.bias.expand(1, 4, 8))
