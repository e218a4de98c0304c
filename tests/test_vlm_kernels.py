"""A whole tiny VLM trains the same with kernel="triton" (interpreter on CPU) and kernel="torch"."""

import pytest
import torch
from helpers import fresh_model, inputs_for
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_vision_lora import VisionLoraConfig, explain
from peft_vision_lora.kernels.dispatch import triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # on a GPU machine the real kernels run


def _adapted(kernel: str):
    model = fresh_model("qwen2_vl").to(DEVICE)
    torch.manual_seed(0)
    config = VisionLoraConfig(r=4, init_lora_weights=False, finetune_projector=True, kernel=kernel)
    return get_peft_model(model, config)


@pytest.mark.skipif(not triton_runs_on(DEVICE), reason="needs triton, and CUDA or TRITON_INTERPRET=1 (conftest)")
def test_triton_and_torch_train_one_step_to_the_same_loss_and_gradients():
    models = {kernel: _adapted(kernel).train() for kernel in ("torch", "triton")}
    set_peft_model_state_dict(models["triton"], get_peft_model_state_dict(models["torch"]))
    assert {row.path for row in explain(models["triton"], show=False)} == {"triton"}
    assert {row.path for row in explain(models["torch"], show=False)} == {"torch-fused"}
    losses, grads = {}, {}
    for kernel, model in models.items():
        batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs_for("qwen2_vl").items()}
        loss = model(**batch).loss
        loss.backward()
        losses[kernel] = loss.detach()
        grads[kernel] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-5)
    assert grads["triton"].keys() == grads["torch"].keys()
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], grad, rtol=1e-4, atol=1e-5, msg=name)
