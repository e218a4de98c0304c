"""LoRA Linear kernels against the textbook reference: forward, dx, dA, dB, dropout, dispatch.

Without CUDA the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before the kernels are
built), which is exact for fp32/fp16 but wrong for bf16: bf16 tests need a GPU.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it before triton's first import

from peft_vision_lora.kernels import dispatch, dropout_mask, lora_linear, lora_linear_naive, lora_linear_torch  # noqa: E402
from peft_vision_lora.kernels.dispatch import resolve_kernel, triton_runs_on  # noqa: E402
from peft_vision_lora.kernels.torch_fused import TorchLoraLinearFunction  # noqa: E402

triton_lora = importlib.import_module("peft_vision_lora.kernels.triton_lora") if dispatch.TRITON_AVAILABLE else None
_TRITON_RUNS = triton_lora is not None and (torch.cuda.is_available() or triton_lora.INTERPRETED)
needs_triton = pytest.mark.skipif(
    not _TRITON_RUNS, reason="triton missing, or imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton needs a GPU (interpreter is wrong)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (x shape, out_features): odd sizes exercise every masked edge; 3-D inputs are flattened and restored
SHAPES = [((9, 41), 341), ((64, 128), 96), ((2, 7, 33), 50), ((1, 1), 3)]
TRITON_SHAPES = [((9, 41), 34), ((2, 5, 48), 20), ((64, 96), 80)]  # the interpreter is slow: keep them small
TOLERANCE = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.float16: {"atol": 1e-2, "rtol": 1e-2}}


def _operands(x_shape, out_features, rank, dtype, bias, seed=0):
    """Inputs whose LoRA term is O(1) (B is not zero-initialised), so a wrong LoRA gradient cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    in_features = x_shape[-1]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)

    x = rand(*x_shape).requires_grad_(True)
    weight = rand(out_features, in_features, scale=in_features**-0.5)
    b = rand(out_features) if bias else None
    lora_A = rand(rank, in_features, scale=in_features**-0.5).requires_grad_(True)
    lora_B = rand(out_features, rank, scale=rank**-0.5).requires_grad_(True)
    grad_out = rand(*x_shape[:-1], out_features)
    return x, weight, b, lora_A, lora_B, grad_out


def _run(fn, operands, **kwargs):
    """Forward + backward; returns (y, dx, dA, dB) and clears the grads for the next run."""
    x, weight, bias, lora_A, lora_B, grad_out = operands
    y = fn(x, weight, bias, lora_A, lora_B, 0.5, **kwargs)
    y.backward(grad_out)
    grads = [t.grad.clone() for t in (x, lora_A, lora_B)]
    for t in (x, lora_A, lora_B):
        t.grad = None
    return [y.detach(), *grads]


def _upcast(operands):
    """The same operands in fp32, as fresh leaves: the reference is computed without fp16 rounding noise."""
    x, weight, bias, lora_A, lora_B, grad_out = (t.detach().float() if t is not None else None for t in operands)
    return x.requires_grad_(True), weight, bias, lora_A.requires_grad_(True), lora_B.requires_grad_(True), grad_out


def _assert_all_close(actual, expected, dtype):
    """Tolerances relative to each tensor's scale: dA sums over all tokens and reaches ~100 in these tests."""
    for name, a, e in zip(("y", "dx", "dA", "dB"), actual, expected):
        assert a.shape == e.shape, name
        tol = TOLERANCE[dtype]
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(
            a.float(), e.float(), atol=tol["atol"] * scale, rtol=tol["rtol"], msg=lambda m, n=name: f"{n}: {m}"
        )


def _check_fused(fused, make_mask, x_shape, out_features, rank, dtype, bias, dropout):
    operands = _operands(x_shape, out_features, rank, dtype, bias)
    seed = 1234
    actual = _run(fused, operands, dropout_p=dropout, training=True, seed=seed)
    flat = (operands[0][..., 0].numel(), x_shape[-1])
    mask = make_mask(seed, flat, dropout, DEVICE, torch.float32) if dropout > 0 else None
    expected = _run(lora_linear_naive, _upcast(operands), dropout_p=dropout, training=True, mask=mask)
    _assert_all_close(actual, expected, dtype)


# ---------------------------------------------------------------------------------------------------------------
# torch fused path vs. naive reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("x_shape, out_features", SHAPES)
def test_torch_fused_matches_naive(x_shape, out_features, rank, dtype, bias, dropout):
    _check_fused(lora_linear_torch, dropout_mask, x_shape, out_features, rank, dtype, bias, dropout)


def test_torch_fused_unfrozen_base_gets_plain_gradients():
    x, weight, bias, lora_A, lora_B, grad_out = _operands((2, 5, 24), 16, 4, torch.float32, True)
    grads = []
    for fn in (lora_linear_torch, lora_linear_naive):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        fn(x, w, b, lora_A, lora_B, 0.5).backward(grad_out)
        grads.append((w.grad, b.grad, x.grad.clone()))
        x.grad = None
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected)


def test_torch_fused_defaults_are_eval_without_dropout():
    x, weight, bias, lora_A, lora_B, _ = _operands((6, 20), 12, 4, torch.float32, True)
    args = (x, weight, bias, lora_A, lora_B, 0.5)
    expected = lora_linear_naive(*args)
    torch.testing.assert_close(lora_linear_torch(*args), expected)
    torch.testing.assert_close(lora_linear_torch(*args, training=True), expected)  # no dropout_p: no dropout
    torch.testing.assert_close(lora_linear_torch(*args, dropout_p=0.4), expected)  # training defaults to False


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_torch_function_applied_to_a_3d_input(dropout):
    """The Function called directly on (B, T, in): y keeps the leading dims, grads match the reference."""
    operands = _operands((2, 5, 24), 16, 4, torch.float32, True)
    mask = dropout_mask(13, (10, 24), dropout, DEVICE) if dropout else None

    def function(x, weight, bias, lora_A, lora_B, scaling):
        return TorchLoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout, 13)

    actual = _run(function, operands)
    assert actual[0].shape == (2, 5, 16)
    expected = _run(lora_linear_naive, operands, dropout_p=dropout, training=True, mask=mask)
    _assert_all_close(actual, expected, torch.float32)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_torch_fused_with_a_frozen_lora_a_still_passes_the_input_gradient(dropout):
    """Only dx and dB asked for (A frozen): the masked dx is built without dA's buffer."""
    x, weight, bias, lora_A, lora_B, grad_out = _operands((9, 20), 12, 4, torch.float32, True)
    lora_A.requires_grad_(False)
    lora_linear_torch(x, weight, bias, lora_A, lora_B, 0.5, dropout, True, seed=21).backward(grad_out)
    actual = (x.grad.clone(), lora_B.grad.clone())
    x.grad = lora_B.grad = None
    mask = dropout_mask(21, x.shape, dropout, DEVICE) if dropout else None
    lora_linear_naive(x, weight, bias, lora_A, lora_B, 0.5, dropout, True, mask=mask).backward(grad_out)
    torch.testing.assert_close(actual, (x.grad, lora_B.grad))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_torch_fused_fp32_adapters_on_an_fp16_base_match_the_reference(dropout):
    """PEFT's mixed case: the LoRA branch (t, dA, dB, dt) runs in fp32; dx gets the masked LoRA part in fp16."""
    x, weight, bias, lora_A, lora_B, grad_out = _operands((2, 7, 24), 16, 4, torch.float16, True)
    lora_A = lora_A.detach().float().requires_grad_(True)
    lora_B = lora_B.detach().float().requires_grad_(True)
    actual = _run(
        lora_linear_torch, (x, weight, bias, lora_A, lora_B, grad_out), dropout_p=dropout, training=True, seed=4
    )
    assert actual[0].dtype == actual[1].dtype == torch.float16
    assert actual[2].dtype == actual[3].dtype == torch.float32
    mask = dropout_mask(4, (14, 24), dropout, DEVICE) if dropout else None
    operands = _upcast((x, weight, bias, lora_A, lora_B, grad_out))
    expected = _run(lora_linear_naive, operands, dropout_p=dropout, training=True, mask=mask)
    _assert_all_close(actual, expected, torch.float16)


def test_torch_fused_saves_no_mask_and_no_output_sized_temporaries():
    x, weight, bias, lora_A, lora_B, _ = _operands((32, 48), 40, 4, torch.float32, True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear_torch(x, weight, bias, lora_A, lora_B, 0.5, dropout_p=0.3, training=True)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() in (x.data_ptr(), weight.data_ptr()) for t in big), [tuple(t.shape) for t in big]


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) vs. naive reference
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 16])
@pytest.mark.parametrize("x_shape, out_features", TRITON_SHAPES)
def test_triton_matches_naive(x_shape, out_features, rank, dtype, bias, dropout):
    fused, make_mask = triton_lora.lora_linear_triton, triton_lora.triton_dropout_mask
    _check_fused(fused, make_mask, x_shape, out_features, rank, dtype, bias, dropout)


@needs_triton
def test_triton_matches_torch_path_without_dropout():
    operands = _operands((3, 11, 40), 24, 8, torch.float32, True)
    _assert_all_close(_run(triton_lora.lora_linear_triton, operands), _run(lora_linear_torch, operands), torch.float32)


@needs_triton
@needs_cuda
@pytest.mark.parametrize("x_shape, out_features", [((512, 1024), 768), ((3, 100, 257), 130)])
def test_triton_bf16_error_within_twice_torch_bf16(x_shape, out_features):
    """bf16 has no exact answer: the kernel's error vs. fp32 must be at most ~2x torch-bf16's error vs. fp32."""
    reference = _run(lora_linear_naive, _operands(x_shape, out_features, 16, torch.float32, True))
    errors = {}
    for name, fn in (("torch", lora_linear_torch), ("triton", triton_lora.lora_linear_triton)):
        result = _run(fn, _operands(x_shape, out_features, 16, torch.bfloat16, True))
        errors[name] = [(r.float() - e).abs().max().item() for r, e in zip(result, reference)]
    for name, torch_err, kernel_err in zip(("y", "dx", "dA", "dB"), errors["torch"], errors["triton"]):
        assert kernel_err <= 2 * torch_err + 1e-3, f"{name}: triton {kernel_err} vs torch-bf16 {torch_err}"


# ---------------------------------------------------------------------------------------------------------------
# property tests: random shapes, ranks, dtypes, dropout, bias
# ---------------------------------------------------------------------------------------------------------------

_CASES = st.tuples(
    st.lists(st.integers(1, 6), min_size=0, max_size=2),  # leading dims of x
    st.integers(1, 70),  # in_features
    st.integers(1, 70),  # out_features
    st.integers(1, 20),  # rank
    st.sampled_from([torch.float32, torch.float16]),
    st.booleans(),  # bias
    st.sampled_from([0.0, 0.25]),  # dropout
)


@settings(max_examples=15, deadline=None)
@given(case=_CASES)
def test_property_torch_fused_matches_naive(case):
    lead, in_features, out_features, rank, dtype, bias, dropout = case
    _check_fused(lora_linear_torch, dropout_mask, (*lead, in_features), out_features, rank, dtype, bias, dropout)


@needs_triton
@settings(max_examples=8, deadline=None)
@given(case=_CASES)
def test_property_triton_matches_naive(case):
    lead, in_features, out_features, rank, dtype, bias, dropout = case
    fused, mask = triton_lora.lora_linear_triton, triton_lora.triton_dropout_mask
    _check_fused(fused, mask, (*lead, in_features), out_features, rank, dtype, bias, dropout)


# ---------------------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------------------


def _mask_makers():
    makers = [pytest.param(dropout_mask, (512, 1024), id="torch")]
    if _TRITON_RUNS:
        makers.append(pytest.param(triton_lora.triton_dropout_mask, (96, 256), id="triton"))
    return makers


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("make_mask, shape", _mask_makers())
def test_dropout_mask_is_seeded_and_keeps_one_minus_p(make_mask, shape, p):
    mask = make_mask(7, shape, p, DEVICE)
    assert torch.equal(mask, make_mask(7, shape, p, DEVICE))  # same seed, same mask (what backward relies on)
    assert not torch.equal(mask, make_mask(8, shape, p, DEVICE))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    keep = mask.mean().item()
    assert abs(keep - (1 - p)) < 4 * ((p * (1 - p)) / mask.numel()) ** 0.5 + 1e-4, keep


def _peft_lora_linear(weight, bias, lora_A, lora_B, scaling, dropout_p):
    """PEFT's own LoRA Linear holding these weights: what the reference claims to compute."""
    from peft import LoraConfig, get_peft_model

    out_features, in_features = weight.shape
    rank = lora_A.shape[0]
    base = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=bias is not None))
    config = LoraConfig(r=rank, lora_alpha=scaling * rank, lora_dropout=dropout_p, target_modules=["0"])
    model = get_peft_model(base, config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        if bias is not None:
            layer.base_layer.bias.copy_(bias)
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    assert layer.scaling["default"] == scaling
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_peft_lora_linear_in_train_and_eval(bias):
    """The spec itself: defaults mean no dropout; eval ignores dropout_p; train draws torch's dropout as PEFT does."""
    x, weight, b, lora_A, lora_B, _ = _operands((2, 6, 24), 20, 4, torch.float32, bias)
    layer = _peft_lora_linear(weight, b, lora_A.detach(), lora_B.detach(), 0.5, 0.4)
    args = (x, weight, b, lora_A, lora_B, 0.5)
    with torch.no_grad():
        expected_eval = layer.eval()(x)
        torch.testing.assert_close(lora_linear_naive(*args), expected_eval)  # defaults: eval, no dropout
        torch.testing.assert_close(lora_linear_naive(*args, training=True), expected_eval)  # no dropout_p: none
        torch.testing.assert_close(lora_linear_naive(*args, 0.4, False), expected_eval)  # eval ignores dropout_p
        torch.testing.assert_close(lora_linear_naive(*args, dropout_p=0.4), expected_eval)  # training defaults False
        torch.manual_seed(11)
        expected_train = layer.train()(x)
        torch.manual_seed(11)
        actual_train = lora_linear_naive(*args, 0.4, True)  # no mask given: torch's own dropout draw
    assert not torch.allclose(expected_train, expected_eval)
    torch.testing.assert_close(actual_train, expected_train)


@pytest.mark.parametrize("fused", [lora_linear_torch] + ([triton_lora.lora_linear_triton] if _TRITON_RUNS else []))
def test_dropout_applies_in_training_only_and_follows_the_global_seed(fused):
    x, weight, bias, lora_A, lora_B, _ = _operands((16, 32), 24, 4, torch.float32, True)
    args = (x, weight, bias, lora_A, lora_B, 0.5)
    no_dropout = lora_linear_naive(*args)
    torch.testing.assert_close(fused(*args, dropout_p=0.5, training=False), no_dropout)  # eval: none applied
    torch.manual_seed(3)
    first = fused(*args, dropout_p=0.5, training=True)
    torch.manual_seed(3)
    torch.testing.assert_close(fused(*args, dropout_p=0.5, training=True), first)  # reproducible
    assert not torch.allclose(first, no_dropout)
    assert not torch.allclose(fused(*args, dropout_p=0.5, training=True), first)  # fresh mask per call


def test_dropout_backward_regenerates_the_forward_mask():
    """Call the Function directly with one seed; grads match the naive path only if backward rebuilt that mask."""
    x, weight, bias, lora_A, lora_B, grad_out = _operands((10, 40), 12, 3, torch.float32, False)
    y = TorchLoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, 0.5, 0.4, 99)
    y.backward(grad_out)
    actual = (x.grad, lora_A.grad)
    x.grad = lora_A.grad = None
    mask = dropout_mask(99, (10, 40), 0.4, DEVICE)
    lora_linear_naive(x, weight, bias, lora_A, lora_B, 0.5, 0.4, True, mask=mask).backward(grad_out)
    torch.testing.assert_close(actual, (x.grad, lora_A.grad))


# ---------------------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_kernel_choices(monkeypatch):
    assert resolve_kernel("torch", "cpu") == "torch"
    assert resolve_kernel("auto", "cpu") == "torch"  # never the interpreter by default
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        resolve_kernel("cuda-graphs", "cpu")
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", False)
    assert resolve_kernel("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="pip install"):
        resolve_kernel("triton", "cuda")


@needs_triton
def test_resolve_kernel_triton(monkeypatch):
    assert resolve_kernel("auto", "cuda") == "torch"  # until a GPU run writes the auto table (auto_table.py)
    assert resolve_kernel("triton", "cuda") == "triton"
    if triton_lora.INTERPRETED:
        assert resolve_kernel("triton", "cpu") == "triton"
    monkeypatch.setattr(triton_lora, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_kernel("triton", "cpu")


@pytest.mark.parametrize("kernel", ["auto", "torch"] + (["triton"] if _TRITON_RUNS else []))
def test_lora_linear_dispatches_to_the_same_numbers(kernel):
    operands = _operands((4, 6, 32), 20, 4, torch.float32, True)
    _assert_all_close(_run(lora_linear, operands, kernel=kernel), _run(lora_linear_naive, operands), torch.float32)


def test_mixed_dtypes_are_rejected_with_a_clear_message():
    x, weight, bias, lora_A, lora_B, _ = _operands((4, 8), 8, 2, torch.float32, True)
    with pytest.raises(TypeError, match="lora_A"):
        lora_linear_torch(x, weight, bias, lora_A.double(), lora_B, 1.0)


@pytest.mark.parametrize("fused", [lora_linear_torch] + ([triton_lora.lora_linear_triton] if _TRITON_RUNS else []))
def test_bad_dropout_and_empty_inputs(fused):
    x, weight, bias, lora_A, lora_B, _ = _operands((4, 8), 8, 2, torch.float32, True)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        fused(x, weight, bias, lora_A, lora_B, 1.0, dropout_p=1.0, training=True)
    empty = torch.zeros(0, 3, 8, device=DEVICE, requires_grad=True)
    y = fused(empty, weight, bias, lora_A, lora_B, 1.0, dropout_p=0.1, training=True)
    y.sum().backward()
    assert y.shape == (0, 3, 8) and lora_A.grad is not None and not lora_A.grad.any()


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_output_can_be_modified_in_place(kernel):
    # Llama 4's MoE adds into a projection's output in place; a view returned by a custom Function forbids that.
    if kernel == "triton" and not triton_runs_on(torch.device(DEVICE)):
        pytest.skip("Triton needs CUDA or the interpreter")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, device=DEVICE, requires_grad=True)
    weight, lora_b = torch.randn(8, 12, device=DEVICE), torch.randn(8, 3, device=DEVICE)
    lora_a = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    y = lora_linear(x, weight, None, lora_a, lora_b, 0.5, kernel=kernel)
    y.add_(1.0)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = lora_a.detach().clone().requires_grad_(True)
    (lora_linear_naive(x_ref, weight, None, a_ref, lora_b, 0.5) + 1.0).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(lora_a.grad, a_ref.grad)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_input_without_grad_still_trains_the_adapter(kernel, dropout):
    # The first layer of a frozen tower sees inputs that need no gradient: only dA and dB are asked for.
    if kernel == "triton" and not triton_runs_on(torch.device(DEVICE)):
        pytest.skip("Triton needs CUDA or the interpreter")
    torch.manual_seed(0)
    x = torch.randn(7, 12, device=DEVICE)
    weight, lora_b = torch.randn(8, 12, device=DEVICE), torch.randn(8, 3, device=DEVICE, requires_grad=True)
    lora_a = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    lora_linear(x, weight, None, lora_a, lora_b, 0.5, dropout, training=True, kernel=kernel, seed=5).sum().backward()
    mask = dropout_mask(5, x.shape, dropout, x.device) if kernel == "torch" and dropout else None
    a_ref, b_ref = lora_a.detach().clone().requires_grad_(True), lora_b.detach().clone().requires_grad_(True)
    if dropout and kernel == "triton":  # the mask Triton's kernels regenerate, rebuilt for the comparison
        from peft_vision_lora.kernels.triton_lora import triton_dropout_mask

        mask = triton_dropout_mask(5, x.shape, dropout, x.device)
    lora_linear_naive(x, weight, None, a_ref, b_ref, 0.5, dropout, training=True, mask=mask).sum().backward()
    torch.testing.assert_close(lora_a.grad, a_ref.grad)
    torch.testing.assert_close(lora_b.grad, b_ref.grad)
