"""`VisionLoraLinear` against PEFT's own LoRA `Linear`: same numbers, same adapter API, fused only where it may be."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from torch.utils.checkpoint import checkpoint

from peft_vision_lora.kernels import dispatch, dropout_mask, lora_linear_naive, new_dropout_seed
from peft_vision_lora.tuner.layer import VisionLoraLinear, dispatch_vision_lora

_TRITON_RUNS = dispatch.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
IN, OUT, R = 24, 16, 4


def _config(dropout: float = 0.0, kernel: str | None = "torch", **kwargs) -> LoraConfig:
    """A plain LoraConfig; `init_lora_weights=False` keeps B non-zero so the LoRA term shows in every output."""
    config = LoraConfig(r=R, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, **kwargs)
    if kernel is not None:
        config.kernel = kernel  # what VisionLoraConfig carries
    return config


def _pair(dropout: float = 0.0, kernel: str = "torch", bias: bool = True, **kwargs):
    """PEFT's Linear and ours around identical copies of one frozen base layer, with identical adapter weights."""
    base = nn.Linear(IN, OUT, bias=bias).requires_grad_(False)
    theirs = LoraLinear(copy.deepcopy(base), "default", config=_config(dropout, None, **kwargs), r=R, lora_alpha=8)
    ours = VisionLoraLinear(
        copy.deepcopy(base), "default", config=_config(dropout, kernel, **kwargs), r=R, lora_alpha=8
    )
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _step(layer: nn.Module, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Output and the gradients of x and every trainable parameter, for an arbitrary (fixed) loss."""
    x = x.detach().clone().requires_grad_(True)
    y = layer(x, **kwargs)
    (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    grads = [p.grad.clone() for _, p in sorted(layer.named_parameters()) if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    return [y.detach(), x.grad, *grads]


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], **tolerance) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **tolerance)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(7, IN), (2, 5, IN)])
def test_forward_backward_match_peft(x_shape, bias):
    theirs, ours = _pair(bias=bias)
    assert ours.kernel_path == "torch-fused"
    x = torch.randn(x_shape)
    _assert_same(_step(ours, x), _step(theirs, x))


def test_dropout_eval_matches_peft_and_train_uses_the_seeded_mask():
    theirs, ours = _pair(dropout=0.3)
    x = torch.randn(6, IN)
    theirs.eval(), ours.eval()
    _assert_same(_step(ours, x), _step(theirs, x))  # eval: no dropout anywhere

    ours.train()
    torch.manual_seed(11)
    y = ours(x)
    torch.manual_seed(11)  # the layer draws its dropout seed from the global RNG: rebuild its mask
    mask = dropout_mask(new_dropout_seed(), x.shape, 0.3, x.device)
    weight, bias = ours.base_layer.weight, ours.base_layer.bias
    lora_A, lora_B = ours.lora_A["default"].weight, ours.lora_B["default"].weight
    expected = lora_linear_naive(x, weight, bias, lora_A, lora_B, ours.scaling["default"], 0.3, True, mask=mask)
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, theirs.eval()(x))  # dropout did something


def test_merge_unmerge_and_disable_fall_back_to_peft():
    theirs, ours = _pair()
    x = torch.randn(5, IN)
    unmerged = _step(ours, x)
    for layer in (theirs, ours):
        layer.merge()
    assert ours.kernel_path == "peft" and "merged" in ours.fallback_reason()
    _assert_same(_step(ours, x), _step(theirs, x))
    for layer in (theirs, ours):
        layer.unmerge()
    assert ours.kernel_path == "torch-fused"
    _assert_same(_step(ours, x), unmerged, atol=1e-5, rtol=1e-5)

    for layer in (theirs, ours):
        layer.enable_adapters(False)
    assert ours.kernel_path == "peft"
    torch.testing.assert_close(ours(x), ours.base_layer(x))
    _assert_same(_step(ours, x), _step(theirs, x))


@pytest.mark.filterwarnings("ignore:Adapter second was active")
def test_two_active_adapters_fall_back_and_set_adapter_switches():
    theirs, ours = _pair()
    for layer in (theirs, ours):
        layer.update_layer("second", 2, lora_alpha=4, config=_config())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, IN)
    for layer in (theirs, ours):
        layer.set_adapter(["default", "second"])
    assert ours.kernel_path == "peft" and "2 active adapters" in ours.fallback_reason()
    _assert_same(_step(ours, x), _step(theirs, x))
    for layer in (theirs, ours):
        layer.set_adapter("second")
    assert ours.kernel_path == "torch-fused"
    _assert_same(_step(ours, x), _step(theirs, x))
    assert ours.lora_kernel == {"default": "torch", "second": "torch"}
    ours.delete_adapter("second")
    assert ours.lora_kernel == {"default": "torch"}


def test_mixed_adapter_batch_falls_back():
    theirs, ours = _pair()
    for layer in (theirs, ours):
        layer.update_layer("second", 2, lora_alpha=4, config=_config())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, IN)
    names = ["default", "second", "__base__", "default"]
    torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names))


def test_dora_falls_back_to_peft():
    theirs, ours = _pair(use_dora=True)
    assert ours.kernel_path == "peft" and "variant" in ours.fallback_reason()
    x = torch.randn(3, IN)
    _assert_same(_step(ours, x), _step(theirs, x))


def test_adapters_kept_in_fp32_on_a_bf16_base_still_take_the_fused_path():
    theirs, ours = _pair()
    for layer in (theirs, ours):
        layer.base_layer.to(torch.bfloat16)  # PEFT keeps adapters in fp32 on bf16 models by default
    x = torch.randn(2, 3, IN, dtype=torch.bfloat16)
    assert ours.kernel_path == "torch-fused"
    actual, expected = _step(ours, x), _step(theirs, x)
    assert [t.dtype for t in actual] == [t.dtype for t in expected]  # grads land in fp32 on the fp32 adapters
    _assert_same([t.float() for t in actual], [t.float() for t in expected], atol=5e-2, rtol=5e-2)


def test_autocast_matches_peft():
    theirs, ours = _pair()
    x = torch.randn(4, IN)
    results = []
    for layer in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_step(layer, x))
    assert results[0][0].dtype == results[1][0].dtype == torch.bfloat16
    _assert_same(*[[t.float() for t in r] for r in results], atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not _TRITON_RUNS, reason="Triton needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py)")
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_triton_kernel_matches_torch_kernel(dropout):
    _, ours_torch = _pair(dropout=dropout, kernel="torch")
    _, ours_triton = _pair(dropout=dropout, kernel="triton")
    ours_triton.load_state_dict(ours_torch.state_dict())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU only through the interpreter
    ours_torch.to(device), ours_triton.to(device)
    assert ours_triton.kernel_path == "triton"
    x = torch.randn(2, 9, IN, device=device)
    results = []
    for layer in (ours_triton, ours_torch):
        layer.train()  # dropout runs: both kernels hash the same seed into the same mask
        torch.manual_seed(5)  # each layer draws its dropout seed from the global RNG
        results.append(_step(layer, x))
    _assert_same(*results, atol=1e-5, rtol=1e-5)
    if dropout:
        ours_torch.eval()
        assert not torch.allclose(results[1][0], ours_torch(x))  # the mask dropped something


def test_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="'auto', 'triton', 'torch'"):
        _pair(kernel="fast")
    _, ours = _pair(kernel="auto")
    assert ours.kernel_path == "torch-fused"  # CPU weights
    base = nn.Linear(IN, OUT)
    plain = VisionLoraLinear(base, "default", config=_config(kernel=None), r=R, lora_alpha=8)
    assert plain.lora_kernel == {"default": "auto"}  # a plain LoraConfig has no `kernel`


def test_dispatch_takes_plain_linear_only():
    config = _config()
    assert isinstance(dispatch_vision_lora(nn.Linear(IN, OUT), "default", config=config, r=R), VisionLoraLinear)
    assert dispatch_vision_lora(nn.Conv2d(3, 3, 1), "default", config=config, r=R) is None

    class RouterLinear(nn.Linear):  # e.g. Llama4's router returns a tuple
        def forward(self, x):
            return super().forward(x), None

    assert dispatch_vision_lora(RouterLinear(IN, OUT), "default", config=config, r=R) is None
    assert dispatch_vision_lora(nn.Linear(IN, OUT), "default", config=config, parameter_name="weight") is None
    config.fan_in_fan_out = True
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        layer = dispatch_vision_lora(nn.Linear(IN, OUT), "default", config=config, r=R)
    assert not layer.fan_in_fan_out and not config.fan_in_fan_out


def test_inside_a_peft_model_training_step_matches_plain_lora():
    """Whole-model check through PEFT's own injection: same state-dict keys, same loss and gradients."""
    mlp = nn.Sequential(nn.Linear(IN, 32), nn.GELU(), nn.Linear(32, OUT))
    models = []
    for use_ours in (False, True):
        config = LoraConfig(r=R, lora_alpha=8, init_lora_weights=False, target_modules=["0", "2"])
        if use_ours:
            config.kernel = "torch"
            config._register_custom_module({nn.Linear: VisionLoraLinear})
        torch.manual_seed(0)
        models.append(get_peft_model(copy.deepcopy(mlp), config))
    theirs, ours = models
    assert sum(isinstance(m, VisionLoraLinear) for m in ours.modules()) == 2
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, IN)
    _assert_same(_step(ours, x), _step(theirs, x))


def test_gradient_checkpointing_recomputes_the_same_dropout_mask():
    """Checkpointing replays the forward with the RNG state restored, so the seed, and the mask, come out the same."""
    _, ours = _pair(dropout=0.3)
    grads = []
    for checkpointed in (False, True):
        x = torch.randn(6, IN, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        torch.manual_seed(5)
        y = checkpoint(ours, x, use_reentrant=False) if checkpointed else ours(x)
        y.square().sum().backward()
        grads.append([x.grad, ours.lora_A["default"].weight.grad, ours.lora_B["default"].weight.grad])
        ours.zero_grad(set_to_none=True)
    _assert_same(*grads)


def _llama4_text_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The LM loss of a text-only batch through the PEFT-wrapped Llama 4.

    transformers 5.24.0 has a bug in ``Llama4ForConditionalGeneration.forward``: it ends with
    ``image_outputs=outputs.image_outputs``, but ``outputs`` is what ``self.language_model`` (``Llama4ForCausalLM``)
    returns, a ``MoeCausalLMOutputWithPast`` without that field, so every call raises AttributeError after the loss
    is computed (``return_dict=False`` does not avoid it: ``capture_outputs`` pops it). Without images that forward is
    ``embed_tokens`` -> ``language_model`` -> loss, so on that error run the wrapped language model itself: the same
    LoRA layers, the same MoE blocks, the same loss. Once transformers fixes it the top-level call is used again.
    """
    try:
        return model(input_ids=ids, labels=ids).loss
    except AttributeError as error:
        if "image_outputs" not in str(error):
            raise
    return model.get_base_model().language_model(input_ids=ids, labels=ids).loss


def test_fused_layer_inside_llama4_moe():
    # Llama 4's MoE adds the routed experts into the shared expert's output in place (`out.add_(...)`).
    from peft import get_peft_model

    from peft_vision_lora import VisionLoraConfig, explain
    from peft_vision_lora.zoo.catalog import build_zoo_model

    model = get_peft_model(
        build_zoo_model("llama4", seed=0), VisionLoraConfig(r=4, task="vqa", kernel="torch", init_lora_weights=False)
    ).train()
    assert {row.path for row in explain(model, show=False)} == {"torch-fused"}
    ids = torch.randint(3, 100, (2, 8))
    loss = _llama4_text_loss(model, ids)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n and "shared_expert" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
