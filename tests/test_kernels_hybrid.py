"""The hybrid backend (cuBLAS base GEMMs + Triton LoRA-only kernels, `kernels/hybrid.py`) against the reference.

Same bar as the full Triton path in tests/test_kernels.py: fp32/fp16 (Triton's interpreter on CPU, bf16 only on a
GPU), odd shapes, dropout with the mask regenerated from the seed, no grad on x, an unfrozen base, the adapters in
fp32 on a low-precision base; plus the choice `kernel="auto"` makes from a measured table.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from torch import nn

from peft_vision_lora.kernels import dispatch, dropout_mask, lora_linear, lora_linear_naive, lora_linear_torch

TRITON_RUNS = dispatch.TRITON_AVAILABLE and dispatch.triton_runs_on(
    torch.device("cuda" if torch.cuda.is_available() else "cpu")
)
hybrid = importlib.import_module("peft_vision_lora.kernels.hybrid") if TRITON_RUNS else None
pytestmark = pytest.mark.skipif(not TRITON_RUNS, reason="triton missing, or TRITON_INTERPRET=1 not set in time")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2}
SHAPES = [((9, 41), 34), ((2, 5, 48), 20), ((64, 96), 80), ((1, 1), 3)]  # odd sizes: every masked edge


def _operands(x_shape, out_features, rank, dtype, bias=True, lora_dtype=None, seed=0):
    """LoRA term O(1) (B not zero), so a wrong LoRA gradient cannot hide under the base output."""
    gen = torch.Generator().manual_seed(seed)
    k = x_shape[-1]

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dt)

    lora_dtype = lora_dtype or dtype
    x = rand(*x_shape).requires_grad_(True)
    weight, b = rand(out_features, k, scale=k**-0.5), rand(out_features) if bias else None
    lora_A = rand(rank, k, scale=k**-0.5, dt=lora_dtype).requires_grad_(True)
    lora_B = rand(out_features, rank, scale=rank**-0.5, dt=lora_dtype).requires_grad_(True)
    return x, weight, b, lora_A, lora_B, rand(*x_shape[:-1], out_features)


def _run(fn, operands, **kwargs):
    """(y, dx, dA, dB) of one forward/backward; grads cleared for the next run."""
    x, weight, bias, lora_A, lora_B, grad_out = operands
    y = fn(x, weight, bias, lora_A, lora_B, 0.5, **kwargs)
    y.backward(grad_out.to(y.dtype))
    grads = [t.grad.clone() for t in (x, lora_A, lora_B)]
    for t in (x, lora_A, lora_B):
        t.grad = None
    return [y.detach(), *grads]


def _upcast(operands):
    x, weight, bias, lora_A, lora_B, grad_out = (t.detach().float() if t is not None else None for t in operands)
    return x.requires_grad_(True), weight, bias, lora_A.requires_grad_(True), lora_B.requires_grad_(True), grad_out


def _assert_close(actual, expected, tol, names=("y", "dx", "dA", "dB")):
    """Tolerance relative to each tensor's scale (dA sums over every token)."""
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape, name
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.float(), e.float(), atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def _reference(operands, dropout, seed):
    rows = operands[0][..., 0].numel(), operands[0].shape[-1]
    mask = dropout_mask(seed, rows, dropout, DEVICE) if dropout else None
    return _run(lora_linear_naive, _upcast(operands), dropout_p=dropout, training=True, mask=mask)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 16])
@pytest.mark.parametrize("x_shape, out_features", SHAPES)
def test_hybrid_matches_naive(x_shape, out_features, rank, dtype, bias, dropout):
    operands = _operands(x_shape, out_features, rank, dtype, bias)
    actual = _run(hybrid.lora_linear_hybrid, operands, dropout_p=dropout, training=True, seed=1234)
    assert all(a.dtype == dtype for a in actual)
    _assert_close(actual, _reference(operands, dropout, 1234), TOLERANCE[dtype])


@pytest.mark.parametrize("rank", [5, 64])  # BLOCK_R 16 with a ragged rank, and a rank filling a 64-wide tile
def test_hybrid_matches_torch_fused_with_dropout_bit_for_bit_masks(rank):
    """Same seed, same dropped elements as the torch path: fp32 results agree to rounding."""
    operands = _operands((45, 40), 36, rank, torch.float32)
    kwargs = {"dropout_p": 0.25, "training": True, "seed": torch.tensor(99)}
    _assert_close(
        _run(hybrid.lora_linear_hybrid, operands, **kwargs), _run(lora_linear_torch, operands, **kwargs), 1e-5
    )


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_dx_add_kernel_alone(p, dtype):
    """dx += (dt A) * mask in place, for the Triton launch (dropout, or mixed dtypes) and the `addmm_` one."""
    gen = torch.Generator().manual_seed(1)
    m, k, r = 37, 70, 3
    dx, dt, a = (torch.randn(*s, generator=gen).to(DEVICE, dtype) for s in ((m, k), (m, r), (r, k)))
    expected = dx.float() + (dt.float() @ a.float()) * (dropout_mask(21, (m, k), p, DEVICE) if p else 1.0)
    before = dx.data_ptr()
    hybrid.lora_dx_add_(dx, dt, a, torch.tensor(21) if p else None, p)
    assert dx.data_ptr() == before
    torch.testing.assert_close(dx.float(), expected, atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_hybrid_fp32_adapters_on_an_fp16_base_match_the_torch_path(dropout):
    """PEFT's rule: the LoRA branch (so dA, dB) in the adapters' fp32; y and dx in the base's fp16."""
    operands = _operands((40, 48), 36, 8, torch.float16, lora_dtype=torch.float32)
    kwargs = {"dropout_p": dropout, "training": True, "seed": 7}
    actual = _run(hybrid.lora_linear_hybrid, operands, **kwargs)
    assert [t.dtype for t in actual] == [torch.float16, torch.float16, torch.float32, torch.float32]
    _assert_close(actual, _run(lora_linear_torch, operands, **kwargs), 2e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_hybrid_input_without_grad_still_trains_the_adapter(dropout):
    """The first layer of a frozen tower: x needs no grad, only dA and dB are computed (no dx launch)."""
    x, weight, bias, lora_A, lora_B, grad_out = _operands((7, 12), 8, 3, torch.float32)
    x = x.detach()
    hybrid.lora_linear_hybrid(x, weight, bias, lora_A, lora_B, 0.5, dropout, True, seed=5).backward(grad_out)
    actual = [lora_A.grad, lora_B.grad]
    lora_A.grad = lora_B.grad = None
    mask = dropout_mask(5, x.shape, dropout, DEVICE) if dropout else None
    lora_linear_naive(x, weight, bias, lora_A, lora_B, 0.5, dropout, True, mask=mask).backward(grad_out)
    _assert_close(actual, [lora_A.grad, lora_B.grad], 1e-5, names=("dA", "dB"))


def test_hybrid_unfrozen_base_gets_plain_gradients_accumulated():
    x, weight, bias, lora_A, lora_B, grad_out = _operands((2, 5, 24), 16, 4, torch.float32)
    grads = []
    for fn in (hybrid.lora_linear_hybrid, lora_linear_naive):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        for _ in range(2):  # accumulated over two backward passes
            fn(x, w, b, lora_A, lora_B, 0.5).backward(grad_out)
        grads.append([w.grad, b.grad, x.grad.clone(), lora_A.grad.clone()])
        x.grad = lora_A.grad = lora_B.grad = None
    _assert_close(grads[0], grads[1], 1e-5, names=("dW", "db", "dx", "dA"))


def test_hybrid_saves_no_mask_and_no_output_sized_temporaries():
    x, weight, bias, lora_A, lora_B, _ = _operands((32, 48), 40, 4, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        hybrid.lora_linear_hybrid(x, weight, bias, lora_A, lora_B, 0.5, dropout_p=0.3, training=True)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() in (x.data_ptr(), weight.data_ptr()) for t in big), [tuple(t.shape) for t in big]


def test_hybrid_dropout_follows_the_global_seed_and_training_flag():
    x, weight, bias, lora_A, lora_B, _ = _operands((16, 32), 24, 4, torch.float32)
    args = (x, weight, bias, lora_A, lora_B, 0.5)
    torch.testing.assert_close(hybrid.lora_linear_hybrid(*args, dropout_p=0.5), lora_linear_naive(*args))  # eval
    torch.manual_seed(3)
    first = hybrid.lora_linear_hybrid(*args, dropout_p=0.5, training=True)
    torch.manual_seed(3)
    torch.testing.assert_close(hybrid.lora_linear_hybrid(*args, dropout_p=0.5, training=True), first)
    assert not torch.allclose(hybrid.lora_linear_hybrid(*args, dropout_p=0.5, training=True), first)


def test_hybrid_runs_every_launch_under_the_device_guard(monkeypatch):
    entered = []
    guard = hybrid.triton_lora._device_guard
    monkeypatch.setattr(hybrid.triton_lora, "_device_guard", lambda device: entered.append(device) or guard(device))
    operands = _operands((10, 16), 12, 4, torch.float32)
    _run(hybrid.lora_linear_hybrid, operands, dropout_p=0.2, training=True)
    assert entered == [operands[0].device] * 2  # one forward, one backward


def test_hybrid_edge_cases_empty_input_in_place_output_and_tensor_subclasses():
    x, weight, bias, lora_A, lora_B, _ = _operands((4, 8), 8, 2, torch.float32)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        hybrid.lora_linear_hybrid(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=1.0, training=True)
    empty = torch.zeros(0, 3, 8, device=DEVICE, requires_grad=True)
    hybrid.lora_linear_hybrid(empty, weight, bias, lora_A, lora_B, 1.0, 0.1, True).sum().backward()
    assert lora_A.grad is not None and not lora_A.grad.any()
    y = hybrid.lora_linear_hybrid(x.view(2, 2, 8), weight, bias, lora_A, lora_B, 1.0)
    y.add_(1.0)  # Llama 4's MoE adds into a projection's output in place
    with pytest.raises(TypeError, match="_Sharded.*kernel='torch'"):
        hybrid.lora_linear_hybrid(x, weight.as_subclass(_Sharded), bias, lora_A, lora_B, 1.0)


class _Sharded(torch.Tensor):
    """Stands in for a DTensor."""


def test_autocast_runs_hybrid_in_the_autocast_dtype():
    operands = _operands((24, 32), 20, 4, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16):
        actual = _run(hybrid.lora_linear_hybrid, operands)
        expected = _run(lora_linear_naive, operands)
    assert actual[0].dtype == torch.float16
    _assert_close(actual, expected, 2e-3)


# ---------------------------------------------------------------------------------------------------------------
# kernel="auto": "hybrid" is a backend the table can pick, not a user value
# ---------------------------------------------------------------------------------------------------------------


def test_auto_picks_hybrid_only_from_a_measured_table(tmp_path, monkeypatch):
    from peft_vision_lora.kernels import auto_table

    monkeypatch.delenv(auto_table.TABLE_ENV, raising=False)
    auto_table.load_table.cache_clear()
    assert dispatch.resolve_kernel("auto", "cuda", torch.bfloat16, 4096) == "torch"  # no table: torch-fused
    rows = [
        {"dtype": "bfloat16", "max_tokens": 64, "backend": "hybrid"},
        {"dtype": "bfloat16", "max_tokens": None, "backend": "triton"},
    ]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"device": "test", "rows": rows}))
    monkeypatch.setenv(auto_table.TABLE_ENV, str(path))
    assert dispatch.resolve_kernel("auto", "cuda", torch.bfloat16, 64) == "hybrid"
    assert dispatch.resolve_kernel("auto", "cuda", torch.bfloat16, 65) == "triton"
    assert dispatch.resolve_kernel("auto", "cpu", torch.bfloat16, 64) == "torch"  # never the interpreter
    assert "hybrid" not in dispatch.KERNELS
    with pytest.raises(ValueError, match="supported values are 'auto', 'triton', 'torch'"):
        dispatch.resolve_kernel("hybrid", "cuda")
    auto_table.load_table.cache_clear()


def test_lora_linear_and_the_layer_run_hybrid_when_auto_resolves_to_it(monkeypatch):
    """The dispatch branch and the layer's `kernel_path` for a "hybrid" choice (forced: on CPU auto never picks it)."""
    from peft import LoraConfig

    from peft_vision_lora.tuner import layer as layer_module

    calls = []
    real = hybrid.lora_linear_hybrid
    monkeypatch.setattr(hybrid, "lora_linear_hybrid", lambda *a, **k: calls.append(1) or real(*a, **k))
    for module in (dispatch, layer_module):
        monkeypatch.setattr(module, "resolve_kernel", lambda kernel, device, dtype=None, tokens=None: "hybrid")
    operands = _operands((4, 6, 32), 20, 4, torch.float32)
    _assert_close(_run(lora_linear, operands), _reference(operands, 0.0, 0), 1e-5)
    assert calls == [1]
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    layer = layer_module.VisionLoraLinear(nn.Linear(32, 24).requires_grad_(False), "default", config=config, r=4)
    assert layer.kernel_path == "hybrid"
    layer(torch.randn(3, 32, device=DEVICE))
    assert calls == [1, 1]
