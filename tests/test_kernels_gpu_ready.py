"""What a first GPU run would hit, tested as far as CPU and Triton's interpreter allow (issue 17).

Device guard, int64 offsets past 2**31, the rank in the autotune key, every GPU tile config, autocast, the LoRA
branch in the adapters' dtype (as PEFT), a device-tensor dropout seed (no `.item()`), 0 graph breaks under
torch.compile with dropout on, and tensor-subclass weights kept away from Triton.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from peft_vision_lora.kernels import dispatch, dropout_mask, lora_linear_naive, lora_linear_torch
from peft_vision_lora.tuner.layer import VisionLoraLinear

triton_lora = importlib.import_module("peft_vision_lora.kernels.triton_lora") if dispatch.TRITON_AVAILABLE else None
TRITON_RUNS = triton_lora is not None and (torch.cuda.is_available() or triton_lora.INTERPRETED)
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton missing, or TRITON_INTERPRET=1 not set in time")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(m, k, n, r, dtype=torch.float32, lora_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dt)

    lora_dtype = lora_dtype or dtype
    x = rand(m, k).requires_grad_(True)
    weight, bias = rand(n, k, scale=k**-0.5), rand(n)
    lora_A = rand(r, k, scale=k**-0.5, dt=lora_dtype).requires_grad_(True)
    lora_B = rand(n, r, scale=r**-0.5, dt=lora_dtype).requires_grad_(True)
    return x, weight, bias, lora_A, lora_B, rand(m, n)


def _step(fn, operands, **kwargs):
    """(y, dx, dA, dB) of one forward/backward, grads cleared for the next run."""
    x, weight, bias, lora_A, lora_B, grad_out = operands
    y = fn(x, weight, bias, lora_A, lora_B, 0.5, **kwargs)
    y.backward(grad_out.to(y.dtype))
    grads = [t.grad.clone() for t in (x, lora_A, lora_B)]
    for t in (x, lora_A, lora_B):
        t.grad = None
    return [y.detach(), *grads]


def _assert_close(actual, expected, **tol):
    for name, a, e in zip(("y", "dx", "dA", "dB"), actual, expected):
        assert a.dtype == e.dtype, (name, a.dtype, e.dtype)
        torch.testing.assert_close(a, e, msg=lambda m, n=name: f"{n}: {m}", **tol)


# ---------------------------------------------------------------------------------------------------------------
# dropout: a device-tensor seed, the same bits on both backends, no .item(), 0 graph breaks
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("shape", [(7, 37), (33, 64), (1, 3)])
@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 7])
def test_triton_and_torch_drop_the_same_elements(shape, seed):
    expected = dropout_mask(seed, shape, 0.3, DEVICE)
    assert torch.equal(triton_lora.triton_dropout_mask(seed, shape, 0.3, DEVICE), expected)
    assert torch.equal(triton_lora.triton_dropout_mask(torch.tensor(seed), shape, 0.3, DEVICE), expected)


@needs_triton
def test_triton_matches_torch_path_with_dropout():
    operands = _operands(45, 40, 36, 8)
    seed = torch.tensor(99)
    kwargs = {"dropout_p": 0.25, "training": True, "seed": seed}
    _assert_close(
        _step(triton_lora.lora_linear_triton, operands, **kwargs), _step(lora_linear_torch, operands, **kwargs)
    )


@pytest.mark.parametrize("kernel", ["torch"] + (["triton"] if TRITON_RUNS else []))
def test_dropout_never_syncs_with_the_host(kernel, monkeypatch):
    """No `.item()` anywhere in forward or backward: the seed is drawn and read on the device."""
    operands = _operands(12, 16, 8, 4)

    def item(self):
        raise AssertionError("Tensor.item() called: a host sync that a CUDA graph would freeze")

    monkeypatch.setattr(torch.Tensor, "item", item)
    y = dispatch.lora_linear(*operands[:5], 0.5, 0.3, training=True, kernel=kernel)
    y.backward(operands[5])
    assert operands[3].grad is not None


def _layer(dropout: float, kernel: str | None):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False)
    if kernel is not None:
        config.kernel = kernel
    cls = LoraLinear if kernel is None else VisionLoraLinear
    torch.manual_seed(0)
    return cls(nn.Linear(32, 24).requires_grad_(False), "default", config=config, r=4, lora_alpha=8).train()


@pytest.mark.parametrize("kernel", [None, "torch"], ids=["peft", "torch-fused"])
def test_layer_traces_with_no_graph_breaks_with_dropout_on(kernel):
    """PEFT's LoRA layer traces as one graph with dropout on; ours must too (it broke into 8 with a host seed)."""
    layer = _layer(0.1, kernel)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 5, 32, requires_grad=True))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_layer_with_dropout_equals_eager():
    """fullgraph compile (forward and the hand-written backward): same seed draw, same mask, same gradients."""
    layer = _layer(0.3, "torch")
    x = torch.randn(3, 7, 32)
    results = []
    for fn in (layer, torch.compile(layer, backend="aot_eager", fullgraph=True)):
        torch.manual_seed(5)
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.square().sum().backward()
        results.append([y.detach(), leaf.grad, layer.lora_A["default"].weight.grad.clone()])
        layer.zero_grad(set_to_none=True)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
    assert not torch.equal(results[0][0], layer(x))  # dropout really is on: a fresh seed gives another output


# ---------------------------------------------------------------------------------------------------------------
# device guard, devices, int64 offsets, strided weights, tensor subclasses
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
def test_every_triton_launch_runs_under_the_device_guard(monkeypatch):
    """Triton launches on the current CUDA device: forward and backward both enter a guard for x's device."""
    entered = []
    guard = triton_lora._device_guard

    def recording_guard(device):
        entered.append(device)
        return guard(device)

    monkeypatch.setattr(triton_lora, "_device_guard", recording_guard)
    operands = _operands(10, 16, 12, 4)
    _step(triton_lora.lora_linear_triton, operands, dropout_p=0.2, training=True)
    assert entered == [operands[0].device] * 2  # one forward, one backward
    assert isinstance(guard(torch.device("cuda", 1)), torch.cuda.device) and guard(torch.device("cuda", 1)).idx == 1
    assert isinstance(guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize("name", ["weight", "bias", "lora_A", "lora_B"])
def test_operands_on_another_device_are_rejected_by_name(name):
    x, weight, bias, lora_A, lora_B, _ = _operands(4, 8, 6, 2)
    operands = {"weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    operands[name] = operands[name].detach().to("meta")
    with pytest.raises(ValueError, match=f"{name} on meta.*one device"):
        lora_linear_torch(x, *operands.values(), 1.0)


@needs_triton
def test_dx_kernel_reads_a_weight_whose_offsets_pass_2_31():
    """rn * stride_wn >= 2**31 (a 262,144 x 8,192 head): int32 offsets wrap and read (or crash on) other memory.

    A strided view over a 4 GiB lazily-allocated storage puts row 2 past 2**31 elements while touching 3 rows only.
    """
    n, k, r, m = 3, 32, 4, 8
    stride = 2**30 + 64
    storage = torch.empty(stride * (n - 1) + k, dtype=torch.float16, device=DEVICE)
    weight = storage.as_strided((n, k), (stride, 1))
    gen = torch.Generator().manual_seed(0)
    weight.copy_(torch.randn(n, k, generator=gen))
    dy, dt, lora_A = (torch.randn(*s, generator=gen).half().to(DEVICE) for s in ((m, n), (m, r), (r, k)))
    dx = triton_lora.lora_dx_backward(dy, weight, dt, lora_A, None, 0.0)
    expected = dy.float() @ weight.float() + dt.float() @ lora_A.float()
    torch.testing.assert_close(dx.float(), expected, atol=1e-2, rtol=1e-2)


@needs_triton
def test_transposed_weight_is_read_in_place_not_copied(monkeypatch):
    x, weight, bias, lora_A, lora_B, grad_out = _operands(20, 24, 18, 4)
    transposed = weight.t().contiguous().t()  # same values, strides (1, 18)
    contiguous = torch.Tensor.contiguous

    def no_copy_of_w(self, *args, **kwargs):
        if self.data_ptr() == transposed.data_ptr():
            pytest.fail("W copied")
        return contiguous(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "contiguous", no_copy_of_w)
    actual = _step(triton_lora.lora_linear_triton, (x, transposed, bias, lora_A, lora_B, grad_out))
    monkeypatch.undo()
    _assert_close(actual, _step(lora_linear_naive, (x, weight, bias, lora_A, lora_B, grad_out)), atol=1e-5, rtol=1e-5)


class _Sharded(torch.Tensor):
    """Stands in for a DTensor: any tensor subclass whose memory is not the whole matrix."""


@needs_triton
def test_tensor_subclass_weights_never_reach_triton():
    x, weight, bias, lora_A, lora_B, _ = _operands(4, 8, 6, 2)
    with pytest.raises(TypeError, match="_Sharded.*kernel='torch'"):
        triton_lora.lora_linear_triton(x, weight.as_subclass(_Sharded), bias, lora_A, lora_B, 1.0)


def test_layer_falls_back_to_peft_for_a_weight_sharded_after_injection():
    layer = _layer(0.0, "auto")
    assert layer.kernel_path == "torch-fused"
    base = layer.get_base_layer()
    base.weight = nn.Parameter(base.weight.detach().as_subclass(_Sharded), requires_grad=False)
    assert layer.kernel_path == "peft" and "_Sharded" in layer.fallback_reason()
    assert layer(torch.randn(2, 32)).shape == (2, 24)


# ---------------------------------------------------------------------------------------------------------------
# autotune: the rank in the key, every GPU config runs
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
def test_autotune_key_holds_the_rank_tile():
    assert "BLOCK_R" in triton_lora.AUTOTUNE_KEY
    assert triton_lora._fwd_tuned.keys == triton_lora._dx_tuned.keys == triton_lora.AUTOTUNE_KEY
    assert triton_lora._block_r(16) != triton_lora._block_r(128)  # so r=16 and r=128 tune separately


@needs_triton
@pytest.mark.parametrize("index", range(len(triton_lora.FWD_CONFIGS) if triton_lora else 0))
def test_every_gpu_tile_config_matches_the_reference(index):
    """The 128-wide GPU tiles, forced (the interpreter otherwise runs 32-wide ones): ragged edges in every dim."""
    operands = _operands(131, 140, 150, 16)
    with triton_lora.forced_configs(triton_lora.FWD_CONFIGS[index], triton_lora.DX_CONFIGS[index]):
        actual = _step(triton_lora.lora_linear_triton, operands, dropout_p=0.1, training=True, seed=3)
    mask = dropout_mask(3, (131, 140), 0.1, DEVICE)
    expected = _step(lora_linear_naive, operands, dropout_p=0.1, training=True, mask=mask)
    _assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# dtypes: autocast, fp32 adapters on a low-precision base
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["torch"] + (["triton"] if TRITON_RUNS else []))
def test_autocast_runs_every_backend_in_the_autocast_dtype(kernel):
    """fp32 operands under fp16 autocast: y is fp16 on both backends, grads land in fp32, both match autocast's
    own result for the textbook composition (backward inside autocast too, as training loops often do)."""
    operands = _operands(24, 32, 20, 4)
    with torch.autocast(DEVICE, dtype=torch.float16):
        actual = _step(dispatch.lora_linear, operands, kernel=kernel)
        expected = _step(lora_linear_naive, operands)
    assert actual[0].dtype == torch.float16
    _assert_close(actual, expected, atol=2e-3, rtol=2e-3)


def test_fp32_adapters_on_a_bf16_base_compute_the_branch_in_fp32_like_peft():
    """PEFT keeps fp32 adapters and runs the LoRA branch (so dA, dB) in fp32; rounding them to bf16 is ~1e-2 off."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40).to(torch.bfloat16).requires_grad_(False)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False)
    theirs = LoraLinear(copy.deepcopy(base), "default", config=config, r=8, lora_alpha=16)
    ours_config = copy.deepcopy(config)
    ours_config.kernel = "torch"
    ours = VisionLoraLinear(copy.deepcopy(base), "default", config=ours_config, r=8, lora_alpha=16)
    ours.load_state_dict(theirs.state_dict())
    for layer in (theirs, ours):  # what get_peft_model's autocast_adapter_dtype=True does
        layer.lora_A.float(), layer.lora_B.float()
    x = torch.randn(6, 11, 48).to(torch.bfloat16)
    results = []
    for layer in (theirs, ours):
        leaf = x.clone().requires_grad_(True)
        y = layer(leaf)
        (y.float() * torch.linspace(-1, 1, 40)).sum().backward()
        results.append(
            [y.detach(), leaf.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
        )
    (y_peft, dx_peft, da_peft, db_peft), (y_ours, dx_ours, da_ours, db_ours) = results
    assert y_ours.dtype == torch.bfloat16 and da_ours.dtype == db_ours.dtype == torch.float32
    torch.testing.assert_close(da_ours, da_peft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db_ours, db_peft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_ours, y_peft, atol=1e-2, rtol=8e-3)  # one bf16 rounding, maybe 1 ulp apart
    torch.testing.assert_close(dx_ours, dx_peft, atol=1e-2, rtol=8e-3)


@needs_triton
def test_triton_fp32_adapters_on_an_fp16_base_match_the_torch_path():
    operands = _operands(40, 48, 36, 8, dtype=torch.float16, lora_dtype=torch.float32)
    kwargs = {"dropout_p": 0.2, "training": True, "seed": 7}
    actual = _step(triton_lora.lora_linear_triton, operands, **kwargs)
    expected = _step(lora_linear_torch, operands, **kwargs)
    assert actual[2].dtype == torch.float32
    _assert_close(actual, expected, atol=2e-3, rtol=2e-3)


def test_adapters_in_a_third_dtype_are_rejected_with_the_fix():
    x, weight, bias, lora_A, lora_B, _ = _operands(4, 8, 6, 2)
    with pytest.raises(TypeError, match="lora_A and lora_B in x's dtype"):
        lora_linear_torch(x, weight, bias, lora_A.double(), lora_B.double(), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# kernel="auto": torch-fused until a GPU run has measured, then the table by dtype and token count
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
def test_auto_follows_the_measured_table_by_dtype_and_tokens(tmp_path, monkeypatch):
    from peft_vision_lora.kernels import auto_table

    monkeypatch.delenv(auto_table.TABLE_ENV, raising=False)
    assert dispatch.resolve_kernel("auto", "cuda", torch.bfloat16, 4096) == "torch"  # nothing measured yet
    rows = [
        {"dtype": "bfloat16", "max_tokens": 64, "backend": "torch"},  # decode-sized batches: cuBLAS
        {"dtype": "bfloat16", "max_tokens": None, "backend": "triton"},
    ]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "test", "rows": rows}))
    monkeypatch.setenv(auto_table.TABLE_ENV, str(path))
    assert dispatch.resolve_kernel("auto", "cuda", torch.bfloat16, 1) == "torch"
    assert dispatch.resolve_kernel("auto", "cuda", torch.bfloat16, 4096) == "triton"
    assert dispatch.resolve_kernel("auto", "cuda", torch.float16, 4096) == "torch"  # dtype not in the table
    assert dispatch.resolve_kernel("auto", "cpu", torch.bfloat16, 4096) == "torch"
    path.write_text(json.dumps({"rows": [{"dtype": "bfloat16", "backend": "cutlass"}]}))
    auto_table.load_table.cache_clear()
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_kernel("auto", "cuda", torch.bfloat16, 1)
    auto_table.load_table.cache_clear()
