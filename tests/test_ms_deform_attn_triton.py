"""The Triton multi-scale deformable attention against the grid_sample reference.

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``), so CI checks the very
kernels the GPU runs; on a machine with CUDA the same tests also run compiled on the GPU. The
``device`` fixture sets ``TRITON_INTERPRET=1`` for the CPU cases only, through ``monkeypatch``:
``ms_deform_attn_triton`` reads the variable at call time (not when ``@triton.jit`` would run at
import), so it works whichever test module imported Triton first, and the variable never leaks into
other tests (on a GPU machine a global ``TRITON_INTERPRET=1`` would turn every Triton kernel,
torch.compile's included, into an interpreted one).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys

import pytest
import torch

from m2f_lite.modeling.ms_deform_attn import ms_deform_attn_reference
from m2f_lite.modeling.ms_deform_attn_triton import (
    KernelConfig,
    ms_deform_attn_triton,
    triton_available,
)

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
# levels 0 and 2 have power-of-two sides, so border points land exactly on pixel coordinates
SHAPES = [(4, 8), (3, 5), (2, 2)]
SMALL_BLOCKS = KernelConfig(block_q_forward=4, block_q_backward=4)  # several query blocks


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors: Triton's interpreter
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CUDA tensors: compiled kernels
    return request.param


def _border_coordinates(size: int, far: float) -> list[float]:
    """Locations in [0, 1] units on and beyond the borders of a map of ``size`` pixels."""
    # pixel coordinate loc * size - 0.5: -0.5, size - 0.5, -1, 0, size - 1, size, far outside
    return [0.0, 1.0, -0.5 / size, 0.5 / size, (size - 0.5) / size, (size + 0.5) / size, -3.0, far]


def _inputs(
    *,
    B: int = 2,
    Lq: int = 10,
    heads: int = 2,
    D: int = 6,
    P: int = 2,
    dtype=torch.float32,
    far: float = 1e9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value ``[B, S, heads, D]``, locations ``[B, Lq, heads, L, P, 2]``, weights ``[B, Lq, heads, L, P]``.

    ``far``: a location far outside the map (1e9 pixels: more than int32 holds).
    """
    gen = torch.Generator().manual_seed(0)
    L = len(SHAPES)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, heads, D, generator=gen)
    locations = torch.rand(B, Lq, heads, L, P, 2, generator=gen) * 1.5 - 0.25  # some outside
    for lvl in (0, 2):  # border points of the power-of-two levels, head 0, point 0
        h, w = SHAPES[lvl]
        xs = torch.tensor(_border_coordinates(w, far))
        ys = torch.tensor(_border_coordinates(h, far)).roll(3)  # pair each x with a different y
        n = min(Lq, len(xs))
        locations[:, :n, 0, lvl, 0] = torch.stack([xs, ys], dim=-1)[:n]
    weights = torch.rand(B, Lq, heads, L, P, generator=gen)
    return value.to(dtype), locations.to(dtype), weights.to(dtype)


def _grads(fn, value, locations, weights, grad_out, *, device: str, **kwargs):
    """Output and gradients (value, locations, weights) of ``fn`` on ``device``."""
    inputs = [t.to(device).requires_grad_() for t in (value, locations, weights)]
    out = fn(inputs[0], SHAPES, inputs[1], inputs[2], **kwargs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device=device, dtype=out.dtype))
    return out.detach().cpu(), [g.cpu() for g in grads]


@pytest.mark.parametrize("config", [None, SMALL_BLOCKS], ids=["default_blocks", "small_blocks"])
def test_forward_and_gradients_match_reference_fp32(device, config):
    value, locations, weights = _inputs()
    grad_out = torch.randn(2, 10, 2 * 6, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = _grads(
        ms_deform_attn_reference, value, locations, weights, grad_out, device="cpu"
    )
    out, grads = _grads(
        ms_deform_attn_triton, value, locations, weights, grad_out, device=device, config=config
    )
    assert out.shape == (2, 10, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    for name, grad, ref_grad in zip(("value", "locations", "weights"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4, msg=f"grad of {name}")
    # the border points sampled something and got location gradients: the test covers them
    assert ref_grads[1][:, :4, 0, 0, 0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_reference(device, dtype):
    value, locations, weights = _inputs(B=1, Lq=8, D=8, dtype=dtype, far=1e4)  # fp16 max: 65504
    grad_out = torch.randn(1, 8, 2 * 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    # the reference in fp32 on the same (rounded) inputs: the kernel computes in fp32 too
    ref_out, ref_grads = _grads(
        ms_deform_attn_reference, value.float(), locations.float(), weights.float(), grad_out.float(), device="cpu"
    )  # fmt: skip
    out, grads = _grads(ms_deform_attn_triton, value, locations, weights, grad_out, device=device)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(out.float(), ref_out, **tol)
    for name, grad, ref_grad in zip(("value", "locations", "weights"), grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad, **tol, msg=f"grad of {name}")


def test_mixed_dtypes_keep_each_inputs_dtype(device):
    """Under autocast the values are bf16 while locations and weights stay fp32."""
    value, locations, weights = _inputs(B=1, Lq=4, D=4)
    grad_out = torch.randn(1, 4, 2 * 4, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = _grads(
        ms_deform_attn_reference, value.bfloat16().float(), locations, weights, grad_out, device="cpu"
    )  # fmt: skip
    out, grads = _grads(
        ms_deform_attn_triton, value.bfloat16(), locations, weights, grad_out, device=device
    )
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(out.float(), ref_out, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grads[1], ref_grads[1], atol=1e-2, rtol=1e-2)


def test_spatial_shapes_as_list_or_tensor(device):
    value, locations, weights = _inputs(B=1, Lq=4, D=4)
    value, locations, weights = value.to(device), locations.to(device), weights.to(device)
    as_list = ms_deform_attn_triton(value, SHAPES, locations, weights)
    as_tensor = ms_deform_attn_triton(
        value, torch.tensor(SHAPES, device=device), locations, weights
    )
    torch.testing.assert_close(as_list, as_tensor, atol=0, rtol=0)


def test_invalid_inputs_name_the_argument(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    value, locations, weights = _inputs(B=1, Lq=4, D=4)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_triton(value, SHAPES, locations, weights[..., :1])
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_triton(value, SHAPES[:2], locations, weights)
    with pytest.raises(ValueError, match="value: expected S"):
        ms_deform_attn_triton(value[:, 1:], SHAPES, locations, weights)
    with pytest.raises(ValueError, match="sampling_locations: expected float32"):
        ms_deform_attn_triton(value, SHAPES, locations.double(), weights)
    with pytest.raises(ValueError, match="block_q_forward"):
        KernelConfig(block_q_forward=24)


def test_cpu_needs_the_interpreter(monkeypatch):
    value, locations, weights = _inputs(B=1, Lq=4, D=4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ms_deform_attn_triton(value, SHAPES, locations, weights)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu") and triton_available()


def test_imports_and_reports_without_triton(monkeypatch):
    """The package must import where Triton is missing; the kernel then says why it cannot run."""
    from m2f_lite.modeling import ms_deform_attn_triton as module

    for name in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import triton` raise ImportError
    spec = importlib.util.spec_from_file_location("msda_without_triton", module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "msda_without_triton", fresh)
    spec.loader.exec_module(fresh)
    assert isinstance(fresh.TRITON_IMPORT_ERROR, ImportError)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fresh.triton_available() and not fresh.triton_available("cpu")
    value, locations, weights = _inputs(B=1, Lq=2, D=4)
    with pytest.raises(RuntimeError, match="needs Triton"):
        fresh.ms_deform_attn_triton(value, SHAPES, locations, weights)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_kernels_compile_for_a_gpu(direction, monkeypatch, tmp_path):
    """The interpreter accepts code the compiler may reject: compile to a CUDA binary (sm_80), no GPU needed."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a real compilation, not a cache hit
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from m2f_lite.modeling import ms_deform_attn_triton as module

    kernel = JITFunction(getattr(module, f"_msda_{direction}_kernel"))
    constants = {"M": 8, "D": 32, "L": 3, "P": 4, "BLOCK_Q": 32, "BLOCK_D": 32}
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("shapes_ptr", "level_start_ptr"):
            signature[name] = "*i32"
        elif name == "grad_value_ptr":
            signature[name] = "*fp32"
        else:
            signature[name] = "*bf16" if name.endswith("_ptr") else "i32"
    source = ASTSource(
        kernel,
        signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()},
        # pointers 16-byte aligned, as Triton specialises them at launch for torch's allocations
        attrs={
            (i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if "*" in t
        },
    )
    compiled = triton_compile(source, target=GPUTarget("cuda", 80, 32), options={"num_warps": 4})
    assert len(compiled.asm["cubin"]) > 0
    assert "ld.global.v4" in compiled.asm["ptx"]  # value rows are read with vector loads
