"""PEFT integration: LoRA on kbit Linear4bit (QLoRA) trains only the adapters, adapters save and load,
merging gives a float model with the same function, prepare_model_for_kbit_training."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import logits, tiny_llama, token_batch  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import kbit  # noqa: E402
from kbit.integrations import peft as kpeft  # noqa: E402
from kbit.integrations.transformers import KbitConfig  # noqa: E402
from kbit.nn import Linear4bit  # noqa: E402

#: Merging into float computes dequantize(W) + scale * B @ A once instead of adding the two branches per call:
#: only float32 summation order differs (measured < 1e-6 on logits ~0.6).
MAX_MERGE_FLOAT_ERROR = 1e-5
#: Merging inside the 4-bit layer re-quantizes W + delta: the logits move by 4-bit rounding of the sum,
#: of the order of the 4-bit error of the model itself (11.6% of the logits' norm for NF4, see the
#: transformers tests); the bound only rules out a merge that drops or doubles the adapter.
MAX_REL_4BIT_MERGE_ERROR = 0.25
TRAIN_STEPS = 6


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    tiny_llama().save_pretrained(path)
    return path


def load_4bit(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=KbitConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, **kwargs))


def lora_config(**kwargs) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", **kwargs)


def packed_weights(model) -> dict:
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def train(model, ids, steps=TRAIN_STEPS, lr=1e-2) -> list[float]:
    """Plain loop on one batch; asserts that only adapter weights get gradients."""
    opt = kbit.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.fixture(scope="module")
def trained(float_dir):
    """A QLoRA model after a few steps (shared: training is the slow part)."""
    model = kpeft.prepare_model_for_kbit_training(load_4bit(float_dir), use_gradient_checkpointing=True)
    before = packed_weights(model)
    peft_model = kpeft.get_peft_model(model, lora_config())
    losses = train(peft_model, token_batch(batch=4))
    return peft_model, before, losses


def test_lora_wraps_every_4bit_layer_with_kbit_lora(trained):
    peft_model, _, _ = trained
    wrapped = {n: type(m) for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert len(wrapped) == 14 and set(wrapped.values()) == {kpeft.LoraLinear4bit}
    assert all(isinstance(m.get_base_layer(), Linear4bit) for m in peft_model.modules()
               if isinstance(m, kpeft.LoraLinear4bit))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_qlora_trains_only_the_adapters(trained):
    peft_model, before, losses = trained
    assert losses[-1] < losses[0] - 0.05, losses
    after = {k.removesuffix(".base_layer"): v for k, v in packed_weights(peft_model.get_base_model()).items()}
    assert before.keys() == after.keys()
    for name, data in before.items():
        assert torch.equal(data, after[name])  # the 4-bit weights never move


def test_adapter_save_and_load_give_identical_outputs(trained, float_dir, tmp_path):
    peft_model, _, _ = trained
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    ids = token_batch()
    expected = logits(peft_model, ids)

    loaded = kpeft.load_adapter(load_4bit(float_dir), tmp_path)
    assert isinstance(loaded, PeftModel)
    assert isinstance(loaded.get_base_model().model.layers[0].mlp.up_proj, kpeft.LoraLinear4bit)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False by default
    assert torch.equal(logits(loaded, ids), expected)


def test_merge_to_float_matches_the_adapter_model(trained):
    peft_model, _, _ = trained
    ids = token_batch()
    expected = logits(peft_model, ids)
    merged = kpeft.merge_to_float(peft_model)
    assert type(merged) is type(peft_model.get_base_model())
    assert not any(isinstance(m, (Linear4bit, peft.tuners.lora.LoraLayer)) for m in merged.modules())
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert getattr(merged.config, "quantization_config", None) is None and not merged.is_quantized
    torch.testing.assert_close(logits(merged, ids), expected, atol=MAX_MERGE_FLOAT_ERROR, rtol=0)
    assert torch.equal(logits(peft_model, ids), expected)  # the adapter model is left as it was


def test_merge_to_float_saves_as_a_plain_checkpoint(trained, tmp_path):
    merged = kpeft.merge_to_float(trained[0], dtype=torch.bfloat16)
    assert merged.model.layers[1].self_attn.o_proj.weight.dtype == torch.bfloat16
    merged.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert not getattr(again, "is_quantized", False)
    assert type(again.model.layers[0].mlp.up_proj) is torch.nn.Linear
    ids = token_batch()
    assert torch.equal(logits(again, ids), logits(merged, ids))


def test_merge_in_4bit_and_unmerge_restores_exactly(trained, float_dir, tmp_path):
    peft_model, _, _ = trained
    peft_model.save_pretrained(tmp_path)
    model = kpeft.load_adapter(load_4bit(float_dir), tmp_path)  # a copy to merge into
    ids = token_batch()
    unmerged = logits(model, ids)
    with model.disable_adapter():
        base_only = logits(model, ids)
    assert not torch.equal(base_only, unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "merging LoRA into a 4-bit layer re-quantizes the weight"
        model.merge_adapter()
        layer = model.get_base_model().model.layers[0].mlp.up_proj
        assert layer.merged
        merged = logits(model, ids)
        assert float((merged - unmerged).norm() / unmerged.norm()) < MAX_REL_4BIT_MERGE_ERROR
        model.unmerge_adapter()
        assert not layer.merged and torch.equal(logits(model, ids), unmerged)
        model.merge_adapter()
        with model.disable_adapter():  # PEFT unmerges before running the base alone
            assert torch.equal(logits(model, ids), base_only)


def test_merge_to_float_handles_plain_peft_lora_layers(float_dir):
    """peft.get_peft_model without kbit's registration wraps Linear4bit in PEFT's float lora.Linear;
    forward is right and merge_to_float still merges correctly."""
    model = load_4bit(float_dir)
    peft_model = peft.get_peft_model(model, lora_config(init_lora_weights=False))  # random B: a nonzero delta
    layer = peft_model.get_base_model().model.layers[0].mlp.up_proj
    assert type(layer) is peft.tuners.lora.Linear and isinstance(layer.get_base_layer(), Linear4bit)
    ids = token_batch()
    expected = logits(peft_model, ids)
    with peft_model.disable_adapter():
        assert not torch.equal(logits(peft_model, ids), expected)
    torch.testing.assert_close(logits(kpeft.merge_to_float(peft_model), ids), expected,
                               atol=MAX_MERGE_FLOAT_ERROR, rtol=0)


def test_dora_is_rejected_with_a_clear_error(float_dir):
    with pytest.raises(ValueError, match="plain LoRA only"):
        kpeft.get_peft_model(load_4bit(float_dir), lora_config(use_dora=True))


def test_prepare_model_for_kbit_training(float_dir):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, dtype=torch.bfloat16,
        quantization_config=KbitConfig(bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    packed = packed_weights(model)
    assert model.model.norm.weight.dtype == torch.bfloat16
    model = kpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert not any(p.requires_grad for p in model.parameters())
    for name, param in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, Linear4bit) and name.endswith("weight"):
            assert torch.equal(param.data, packed[name.removesuffix(".weight")])  # 4-bit weights untouched
        else:
            assert param.dtype == torch.float32, name  # norms, embeddings, output head
    assert not model.is_activation_checkpointing

    model = kpeft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    ids = token_batch()
    assert model.get_input_embeddings()(ids).requires_grad  # checkpointed blocks still get a graph


def test_qlora_with_trainer_and_kbit_optimizer(float_dir, tmp_path):
    model = kpeft.prepare_model_for_kbit_training(load_4bit(float_dir), use_gradient_checkpointing=False)
    peft_model = kpeft.get_peft_model(model, lora_config())
    lora_b = peft_model.get_base_model().model.layers[0].self_attn.v_proj.lora_B["default"].weight
    assert not lora_b.any()  # PEFT starts B at zero
    optimizer = kbit.optim.PagedAdamW8bit([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(batch=4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=peft_model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                      optimizers=(optimizer, None))
    trainer.train()
    assert trainer.state.global_step == 3 and lora_b.any()
