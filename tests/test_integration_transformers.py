"""transformers integration: KbitConfig through from_pretrained, checkpoints in bitsandbytes' layout both
ways, bitsandbytes 4-bit checkpoints loaded without bitsandbytes, kbit optimizers under Trainer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors = pytest.importorskip("safetensors")

from hf_tiny import float_with_weights_of, logits, tiny_llama, token_batch  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments  # noqa: E402
from transformers.quantizers import auto as hf_auto  # noqa: E402

import kbit  # noqa: E402
import kbit.integrations.transformers as kt  # noqa: E402
from kbit.integrations.transformers import KbitConfig  # noqa: E402
from kbit.nn import Linear4bit  # noqa: E402

#: The 4-bit model computes the float model with dequantized weights; what is left is the order of float32
#: sums (measured 0 here) and, for bf16 compute, bf16 rounding of activations (measured 2.4e-3, logits ~0.6).
MAX_DEQUANT_REF_ERROR = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
#: 4-bit weights move the logits of this randomly initialized model by 11.6% of their norm with NF4 and 13.9%
#: with FP4 (measured); a wrong scale, nibble order or orientation gives errors of the size of the logits.
MAX_REL_LOGIT_ERROR_4BIT = 0.25
#: bitsandbytes' CPU inference path runs in bfloat16 with bfloat16 scales (fact sheet 9.5; measured 2.4e-3
#: on these logits of magnitude ~0.6).
MAX_BNB_CPU_BF16_ERROR = 1e-2
LAYER_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT_KEYS_NESTED = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture
def bnb_routed():
    """transformers sends 4-bit bitsandbytes configs and checkpoints to kbit for this test only."""
    kt.register(bitsandbytes=True)
    yield
    kt.unregister_bitsandbytes()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linear_types(model) -> dict:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def saved_tensors(path) -> dict:
    with safetensors.safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---- config ---------------------------------------------------------------------------------------
def test_config_dict_round_trip_and_routing():
    cfg = KbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16",
                     bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_blocksize=128,
                     llm_int8_skip_modules=["lm_head"])
    d = cfg.to_dict()
    # transformers routes any dict with load_in_4bit to bitsandbytes, so a kbit config must not carry it.
    assert "load_in_4bit" not in d and d["quant_method"] == "kbit"
    json.dumps(d)
    back = hf_auto.AutoQuantizationConfig.from_dict(d)
    assert isinstance(back, KbitConfig) and back.to_dict() == d
    assert back.bnb_4bit_compute_dtype == torch.bfloat16 and back.bnb_4bit_quant_storage == torch.bfloat16
    assert isinstance(hf_auto.AutoHfQuantizer.from_config(back), kt.KbitHfQuantizer)
    bnb_cfg = cfg.to_bitsandbytes_config()
    assert bnb_cfg.to_dict()["quant_method"] == "bitsandbytes" and bnb_cfg.load_in_4bit
    assert bnb_cfg.bnb_4bit_quant_type == "nf4" and bnb_cfg.bnb_4bit_use_double_quant


@pytest.mark.parametrize("kwargs, error", [
    (dict(load_in_8bit=True), ValueError),
    (dict(load_in_4bit=False), ValueError),
    (dict(bnb_4bit_quant_type="int4"), ValueError),
    (dict(bnb_4bit_blocksize=48), ValueError),
    (dict(bnb_4bit_compute_dtype=torch.int8), ValueError),
    (dict(bnb_4bit_quant_storage="float64"), ValueError),
    (dict(llm_int8_skip_modules="lm_head"), TypeError),
    (dict(llm_int8_threshold=6.0), TypeError),
])
def test_config_rejects_what_it_cannot_do(kwargs, error):
    with pytest.raises(error):
        KbitConfig(**kwargs)


def test_register_is_idempotent_and_bitsandbytes_routing_undoes():
    original = hf_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"]
    kt.register()
    kt.register(bitsandbytes=True)
    kt.register(bitsandbytes=True)
    assert hf_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is kt.KbitHfQuantizer
    assert hf_auto.AUTO_QUANTIZER_MAPPING["kbit"] is kt.KbitHfQuantizer
    kt.unregister_bitsandbytes()
    assert hf_auto.AUTO_QUANTIZER_MAPPING["bitsandbytes_4bit"] is original
    with pytest.raises(ValueError, match="LLM.int8"):
        kt.KbitHfQuantizer(BitsAndBytesConfig(load_in_8bit=True))


def test_core_imports_without_transformers_and_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
        "import kbit, kbit.nn, kbit.optim, kbit.integrations\n"
        "for name in ('transformers', 'peft'):\n"
        "    try:\n"
        "        __import__('kbit.integrations.' + name)\n"
        "    except ImportError as e:\n"
        "        assert 'pip install \"kbit[hf]\"' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('imported without ' + name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- loading and saving ---------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type, double_quant, compute_dtype", [
    ("nf4", True, None), ("nf4", False, torch.bfloat16), ("fp4", True, torch.float32)])
def test_from_pretrained_quantizes_linear_layers(float_dir, quant_type, double_quant, compute_dtype):
    ref = AutoModelForCausalLM.from_pretrained(float_dir).eval()
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=KbitConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                  bnb_4bit_use_double_quant=double_quant,
                                                  bnb_4bit_compute_dtype=compute_dtype))
    types = linear_types(model)
    assert types.pop("lm_head") is torch.nn.Linear  # transformers' default skip: the output head
    assert len(types) == 2 * len(LAYER_NAMES) and set(types.values()) == {Linear4bit}
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.bnb_quantized and layer.weight.quant_type == quant_type
    assert layer.weight.compress_statistics == double_quant and layer.compute_dtype == compute_dtype
    assert model.is_quantized and model.is_loaded_in_4bit and model.quantization_method == "kbit"

    ids = token_batch()
    got = logits(model, ids)
    exact = logits(float_with_weights_of(model, ref), ids)
    tol = MAX_DEQUANT_REF_ERROR[compute_dtype or torch.float32]
    assert float((got - exact).abs().max()) <= tol * max(1.0, float(exact.abs().max()))
    assert rel_error(got, logits(ref, ids)) < MAX_REL_LOGIT_ERROR_4BIT


def test_skip_modules_replace_the_default(float_dir):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=KbitConfig(bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["down_proj"]))
    types = linear_types(model)
    assert types["lm_head"] is Linear4bit  # an explicit list replaces transformers' default skips
    assert all(t is torch.nn.Linear for n, t in types.items() if n.endswith("down_proj"))
    assert all(t is Linear4bit for n, t in types.items() if n.endswith("up_proj"))


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
def test_save_pretrained_writes_bitsandbytes_layout_and_reloads_identically(float_dir, tmp_path, quant_storage):
    cfg = KbitConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=quant_storage)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "kbit"
    tensors = saved_tensors(tmp_path)
    prefix = "model.layers.1.self_attn.k_proj."
    keys = {k[len(prefix):] for k in tensors if k.startswith(prefix)}
    assert keys == WEIGHT_KEYS_NESTED | {"weight.quant_state.bitsandbytes__nf4"}
    assert tensors[prefix + "weight"].dtype == quant_storage
    assert tensors[prefix + "weight.absmax"].dtype == torch.uint8  # double-quantized scales
    blob = json.loads(bytes(tensors[prefix + "weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert blob["shape"] == [32, 64] and blob["quant_type"] == "nf4" and blob["blocksize"] == 64

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # the config comes from config.json
    assert isinstance(reloaded.config.quantization_config, KbitConfig)
    layer, again = model.model.layers[1].self_attn.k_proj, reloaded.model.layers[1].self_attn.k_proj
    assert isinstance(again, Linear4bit) and again.weight.quant_storage == quant_storage
    assert torch.equal(layer.weight.data.view(torch.uint8), again.weight.data.view(torch.uint8))
    ids = token_batch()
    assert torch.equal(logits(model, ids), logits(reloaded, ids))


def test_dequantize_gives_a_float_model(float_dir):
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=KbitConfig(bnb_4bit_quant_type="nf4"))
    ids = token_batch()
    before = logits(model, ids)
    model = model.dequantize()
    assert set(linear_types(model).values()) == {torch.nn.Linear}
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(model, ids), before, atol=MAX_DEQUANT_REF_ERROR[torch.float32], rtol=0)


def test_gpt2_conv1d_layers_are_quantized_in_linear_orientation(tmp_path):
    """GPT-2 stores its projections as Conv1D ([in, out] weights); they become Linear4bit of [out, in]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)).eval()
    ref.save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float",
                                                 quantization_config=KbitConfig(bnb_4bit_quant_type="nf4"))
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Linear4bit) and (c_attn.out_features, c_attn.in_features) == (192, 64)
    ids = token_batch()
    got = logits(model, ids)
    assert rel_error(got, logits(ref, ids)) < MAX_REL_LOGIT_ERROR_4BIT
    model.save_pretrained(tmp_path / "nf4")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "nf4"), ids), got)


# ---- bitsandbytes checkpoints ---------------------------------------------------------------------
def test_bitsandbytes_checkpoint_written_by_kbit_loads_without_bitsandbytes(float_dir, tmp_path, monkeypatch,
                                                                         bnb_routed):
    cfg = KbitConfig(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    model.config.quantization_config = cfg.to_bitsandbytes_config()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_4bit"] is True

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError):
        import bitsandbytes  # noqa: F401
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.config.quantization_config, BitsAndBytesConfig)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Linear4bit)
    ids = token_batch()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_bitsandbytes_config_quantizes_through_kbit(float_dir, monkeypatch, bnb_routed):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit) and layer.weight.quant_type == "nf4"
    assert layer.compute_dtype == torch.float32  # BitsAndBytesConfig's default, honoured


def test_checkpoint_from_real_bitsandbytes_loads_without_it(float_dir, tmp_path, monkeypatch):
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes is not importable here ({type(exc).__name__}: {exc})")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    try:
        theirs = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    except (RuntimeError, ImportError) as exc:  # a bitsandbytes build without a CPU backend
        pytest.skip(f"transformers + bitsandbytes cannot quantize on this machine: {exc}")
    assert type(theirs.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    theirs.save_pretrained(tmp_path)
    their_tensors = saved_tensors(tmp_path)

    kt.register(bitsandbytes=True)
    try:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)
        ours = AutoModelForCausalLM.from_pretrained(tmp_path)
        fresh = AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=KbitConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))
    finally:
        kt.unregister_bitsandbytes()
    layer = ours.model.layers[0].mlp.up_proj
    assert isinstance(layer, Linear4bit)
    # The packed NF4 codes are the same bytes kbit writes for that float weight (fact sheet 3.1).
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(their_tensors[name], layer.weight.data)
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight.data, layer.weight.data)
    # Scales may differ by one 8-bit code (bitsandbytes' CPU lookup table); the function is the same.
    ids = token_batch()
    ref = AutoModelForCausalLM.from_pretrained(float_dir).eval()
    got = logits(ours, ids)
    exact = logits(float_with_weights_of(ours, ref), ids)
    assert float((got - exact).abs().max()) <= MAX_DEQUANT_REF_ERROR[torch.float32]
    assert rel_error(got, logits(fresh, ids)) < 1e-2


def test_bitsandbytes_checkpoint_written_by_kbit_loads_in_real_bitsandbytes(float_dir, tmp_path):
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bitsandbytes is not importable here ({type(exc).__name__}: {exc})")
    cfg = KbitConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    ours = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    ours.config.quantization_config = cfg.to_bitsandbytes_config()
    ours.save_pretrained(tmp_path)
    try:
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path)
    except (RuntimeError, ImportError) as exc:  # a bitsandbytes build without a CPU backend
        pytest.skip(f"transformers + bitsandbytes cannot load 4-bit models on this machine: {exc}")
    their_layer, our_layer = theirs.model.layers[0].mlp.down_proj, ours.model.layers[0].mlp.down_proj
    assert isinstance(their_layer, bnb.nn.Linear4bit)
    # Before any forward (which may repack the weight for bitsandbytes' CPU kernel): the same numbers.
    theirs_w = bnb.functional.dequantize_4bit(their_layer.weight.data, their_layer.weight.quant_state)
    assert torch.equal(theirs_w, kbit.functional.dequantize_4bit(our_layer.weight.data, our_layer.weight.quant_state))
    ids = token_batch()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=MAX_BNB_CPU_BF16_ERROR, rtol=0)


# ---- Trainer ------------------------------------------------------------------------------------
def test_trainer_steps_with_kbit_optimizer(tmp_path):
    model = tiny_llama().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = token_batch(batch=4)
    data = [{"input_ids": row, "labels": row} for row in ids] * 2  # one fixed batch, seen 4 times
    optimizer = kbit.optim.AdamW8bit(model.parameters(), lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                             lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert trainer.state.global_step == 4
    big = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(big, before["model.layers.0.mlp.up_proj.weight"])
    state = optimizer.state[big]
    assert state["state1"].dtype == torch.uint8  # 8-bit state, kbit's optimizer is the one that stepped
