"""python -m kbit: every subcommand runs and reports; bad arguments exit with a message.

quantize: the output loads into kbit's Linear4bit and bitsandbytes' Params4bit and dequantizes to within
NF4's error; folders of shards work; an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kbit
import kbit.functional as F
from kbit.__main__ import main
from kbit.cli import quantize as quantize_cli

safetensors = pytest.importorskip("safetensors", reason="quantize needs safetensors (kbit[safetensors])")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# NF4 at blocksize 64 on Gaussian weights: relative RMS error ~0.095 (double quantization adds ~0.1%).
# The bound leaves room for small tensors' sampling noise; a wrong layout or nibble order gives ~1.
MAX_NF4_RELATIVE_RMSE = 0.12
MAX_FP4_RELATIVE_RMSE = 0.16


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kbit", *argv], capture_output=True, text=True)


def rel_rmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


# ---- doctor and the parser ---------------------------------------------------------------------------
def test_doctor_passes_and_names_the_cpu_level(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "CPU kernel level" in out and "self-check" in out and "OK" in out


def test_default_command_is_doctor(capsys):
    assert main([]) == 0
    assert "self-check" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["doctor", "demo", "quantize", "bench"])
def test_every_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "usage: python -m kbit " + command in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "invalid choice"),
    (["demo", "--steps", "-1"], "--steps must be a positive integer"),
    (["demo", "--model", "huge"], "invalid choice"),
    (["quantize", "only-one-path"], "the following arguments are required: OUT"),
    (["quantize", "/nonexistent/in.safetensors", "out.safetensors"], "does not exist"),
    (["bench", "--only", "everything"], "invalid choice"),
    (["bench", "--repeats", "0"], "--repeats must be a positive integer"),
])
def test_bad_arguments_exit_with_usage_and_reason(argv, message):
    result = run_cli(*argv)
    assert result.returncode == 2 and "usage" in result.stderr and message in result.stderr, result.stderr


def test_bad_capability_environment_is_a_clear_error():
    env = {"KBIT_CPU_CAPABILITY": "avx9000", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", "import kbit"], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "choose one of scalar, avx2, avx512" in result.stderr


# ---- quantize -------------------------------------------------------------------------------------
LAYERS = {"model.layers.0.mlp.up_proj": (96, 64), "model.layers.0.self_attn.q_proj": (64, 64),
          "model.layers.1.mlp.down_proj": (64, 96)}


def checkpoint(dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": torch.randn(50, 64, generator=gen).to(dtype),
          "lm_head.weight": torch.randn(50, 64, generator=gen).to(dtype),
          "model.norm.weight": torch.ones(64, dtype=dtype),
          "position_ids": torch.arange(8),
          "model.unused_proj.weight": torch.empty(0, 64, dtype=dtype)}  # empty: nothing to quantize, kept
    for name, shape in LAYERS.items():
        sd[name + ".weight"] = (torch.randn(*shape, generator=gen) * 0.02).to(dtype)
        sd[name + ".bias"] = torch.randn(shape[0], generator=gen).to(dtype)
    return sd


def read(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def weight_entries(sd: dict, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}


@pytest.mark.parametrize("quant_type, double_quant, bound", [("nf4", True, MAX_NF4_RELATIVE_RMSE),
                                                             ("fp4", False, MAX_FP4_RELATIVE_RMSE)])
def test_quantize_file_loads_into_linear4bit(tmp_path, capsys, quant_type, double_quant, bound):
    original = checkpoint()
    save_file(original, tmp_path / "in.safetensors")
    argv = ["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
            "--quant-type", quant_type, "--blocksize", "32"] + ([] if double_quant else ["--no-double-quant"])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"quantized {len(LAYERS)} tensors" in out and "kept" in out and "->" in out
    sd = read(tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "out.safetensors"]  # no temporary files left
    # Embeddings, the head, norms, biases and integer tensors are kept exactly.
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "position_ids",
                 "model.unused_proj.weight"]:
        assert torch.equal(sd[name], original[name]) and sd[name].dtype == original[name].dtype
    for name, (n_out, n_in) in LAYERS.items():
        assert sd[name + ".weight"].dtype == torch.uint8
        assert (name + f".weight.quant_state.bitsandbytes__{quant_type}") in sd
        assert (name + ".weight.nested_absmax" in sd) == double_quant
        layer = kbit.nn.Linear4bit(n_in, n_out, quant_type=quant_type)
        layer.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
        assert layer.weight.bnb_quantized and layer.weight.quant_type == quant_type
        assert layer.weight.blocksize == 32
        w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert rel_rmse(w, original[name + ".weight"]) < bound
        assert torch.equal(layer.bias, original[name + ".bias"])
        x = torch.randn(3, n_in)
        assert rel_rmse(layer(x), x @ w.t() + layer.bias) < 1e-5


def test_quantize_file_loads_into_bitsandbytes(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    original = checkpoint(torch.bfloat16)
    save_file(original, tmp_path / "in.safetensors")
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"),
                 "--no-progress"]) == 0
    sd = read(tmp_path / "out.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    param = bnb.nn.Params4bit.from_prequantized(sd[name], weight_entries(sd, name), device="cpu")
    assert param.quant_state.quant_type == "nf4" and param.quant_state.dtype == torch.bfloat16
    w = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    assert w.dtype == torch.bfloat16 and rel_rmse(w, original[name]) < MAX_NF4_RELATIVE_RMSE
    ours = F.dequantize_4bit(sd[name], kbit.functional.QuantState.from_dict(weight_entries(sd, name), "cpu"))
    assert torch.equal(w, ours)


def test_quantize_options_skip_and_storage(tmp_path, capsys):
    save_file(checkpoint(), tmp_path / "in.safetensors")
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "--no-progress",
                 "--skip", "*q_proj*", "--no-default-skip", "--quant-storage", "bfloat16",
                 "--compute-dtype", "bfloat16"]) == 0
    sd = read(tmp_path / "out.safetensors")
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # skipped by --skip
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16  # quantized: default skips dropped
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    layer = kbit.nn.Linear4bit(64, 96, quant_type="nf4", quant_storage=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj"
    layer.load_state_dict({k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")})
    w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert rel_rmse(w, checkpoint()[name + ".weight"]) < MAX_NF4_RELATIVE_RMSE
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata()["kbit.compute_dtype"] == "bfloat16"
    assert "kept in float by skip patterns: model.layers.0.self_attn.q_proj.weight" in capsys.readouterr().out


def test_quantize_folder_of_shards(tmp_path):
    original = checkpoint()
    names = sorted(original)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    src = tmp_path / "in"
    src.mkdir()
    for shard, keys in shards.items():
        save_file({k: original[k] for k in keys}, src / shard)
    index = {"metadata": {"total_size": 0}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (src / "tokenizer.json").write_text("{}")

    assert main(["quantize", str(src), str(tmp_path / "out"), "--no-progress", "--compute-dtype", "bfloat16"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "model.safetensors.index.json", "config.json",
                                                            "tokenizer.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = {}
    for shard in shards:
        part = read(out / shard)
        assert all(new_index["weight_map"][k] == shard for k in part)
        merged.update(part)
    assert set(new_index["weight_map"]) == set(merged)
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    for name, (n_out, n_in) in LAYERS.items():
        layer = kbit.nn.Linear4bit(n_in, n_out, quant_type="nf4")
        layer.load_state_dict({k[len(name) + 1:]: v for k, v in merged.items() if k.startswith(name + ".")})
        w = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert rel_rmse(w, original[name + ".weight"]) < MAX_NF4_RELATIVE_RMSE
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens"]


@pytest.mark.parametrize("folder", [False, True])
def test_interrupted_quantize_leaves_nothing(tmp_path, monkeypatch, folder):
    save_file(checkpoint(), tmp_path / "in.safetensors")
    src = tmp_path / "in.safetensors"
    if folder:
        (tmp_path / "in").mkdir()
        os.replace(src, tmp_path / "in" / "model.safetensors")
        src = tmp_path / "in"
    before = sorted(os.listdir(tmp_path))
    real = quantize_cli._quantize_tensor
    calls = []

    def interrupt_on_second_weight(tensor, opts):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tensor, opts)

    monkeypatch.setattr(quantize_cli, "_quantize_tensor", interrupt_on_second_weight)
    dst = tmp_path / ("out" if folder else "out.safetensors")
    assert main(["quantize", str(src), str(dst), "--no-progress"]) == 130
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == before  # no OUT, no temporary or spool files


def test_quantize_refuses_to_overwrite_without_force(tmp_path):
    save_file(checkpoint(), tmp_path / "in.safetensors")
    (tmp_path / "out.safetensors").write_bytes(b"precious")
    result = run_cli("quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"))
    assert result.returncode == 2 and "exists; pass --force" in result.stderr
    assert (tmp_path / "out.safetensors").read_bytes() == b"precious"
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "--force",
                 "--no-progress"]) == 0
    assert "model.layers.0.mlp.up_proj.weight.absmax" in read(tmp_path / "out.safetensors")


def test_quantize_refuses_a_quantized_input(tmp_path, capsys):
    save_file(checkpoint(), tmp_path / "in.safetensors")
    assert main(["quantize", str(tmp_path / "in.safetensors"), str(tmp_path / "q.safetensors"), "--no-progress"]) == 0
    assert main(["quantize", str(tmp_path / "q.safetensors"), str(tmp_path / "qq.safetensors"), "--no-progress"]) == 1
    assert "already 4-bit quantized" in capsys.readouterr().err
    assert not (tmp_path / "qq.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["in.safetensors", "q.safetensors"]


def test_streaming_writer_aligns_every_tensor(tmp_path):
    """Note [alignment without reordering]: mixed element sizes in any order load back exactly."""
    tensors = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(5), "c": torch.randn(3).half(),
               "d": torch.arange(7, dtype=torch.int64), "e": torch.tensor(2.5, dtype=torch.bfloat16),
               "f": torch.empty(0, 4), "g": torch.tensor([True, False, True])}
    with quantize_cli.StreamingSafetensorsWriter(tmp_path / "x.safetensors") as writer:
        for k, v in tensors.items():
            writer.add(k, v)
        writer.commit({"format": "pt"})
    back = read(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
    assert os.listdir(tmp_path) == ["x.safetensors"]


# ---- demo -----------------------------------------------------------------------------------------
# On a 40-step run of the tiny model, 8-bit AdamW's held-out loss stays this close to torch AdamW's
# (measured: within 0.3%); a broken 8-bit update lands tens of percent away.
MAX_ADAMW8BIT_RELATIVE_GAP = 0.03


def test_demo_quick_prints_the_table_and_writes_results(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for name in ["torch AdamW", "kbit AdamW8bit", "kbit Lion8bit", "QLoRA NF4+AdamW8bit"]:
        assert name in out
    assert "eval loss" in out and "opt. state bytes" in out and "step ms" in out
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert files == ["loss_curves.png", "results.csv", "results.json"]
    assert (tmp_path / "demo" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert len(runs["torch AdamW"]["train_losses"]) == 20 and len(runs["QLoRA NF4+AdamW8bit"]["train_losses"]) == 10
    for name in ["torch AdamW", "kbit AdamW8bit", "kbit Lion8bit"]:
        first, last = runs[name]["eval_points"][0][1], runs[name]["eval_loss"]
        assert last < first - 0.3, (name, first, last)  # ln(256) = 5.5 nats at the start
    # 8-bit state: ~2 bytes per parameter instead of torch AdamW's 8 (small tensors stay 32-bit).
    assert runs["kbit AdamW8bit"]["state_bytes"] < 0.35 * runs["torch AdamW"]["state_bytes"]
    qlora = runs["QLoRA NF4+AdamW8bit"]
    assert qlora["trainable_params"] < runs["torch AdamW"]["trainable_params"] / 4
    assert qlora["extra"]["linear_weight_bytes_nf4"] * 8 == qlora["extra"]["linear_weight_bytes_float"]
    csv_lines = (tmp_path / "demo" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,") and len(csv_lines) == 5


def test_demo_adamw8bit_tracks_torch_adamw():
    from kbit.cli import demo

    table = demo.optimizer_table(lr=2e-3)[:2]
    results = demo.run_demo(model_size="tiny", steps=40, show_progress=False, optimizers=table, qlora=False)
    torch_run, kbit_run = results["runs"]
    assert kbit_run.eval_loss < torch_run.eval_points[0][1] - 1.0  # it learns
    assert abs(kbit_run.eval_loss - torch_run.eval_loss) / torch_run.eval_loss < MAX_ADAMW8BIT_RELATIVE_GAP
    assert abs(kbit_run.final_train_loss - torch_run.final_train_loss) / torch_run.final_train_loss \
        < MAX_ADAMW8BIT_RELATIVE_GAP


def test_demo_without_optional_packages(tmp_path, monkeypatch, capsys):
    """No matplotlib, no tqdm: the demo still runs, prints plain progress lines and says what to install."""
    import builtins

    real_import = builtins.__import__

    def no_optional_packages(name, *args, **kwargs):
        if name.split(".")[0] in ("tqdm", "matplotlib"):
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional_packages)
    assert main(["demo", "--model", "tiny", "--steps", "3", "--qlora-steps", "2", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "pip install 'kbit[plot]'" in captured.err and "pip install 'kbit[progress]'" in captured.err
    assert "torch AdamW" in captured.err and "3/3 step" in captured.err  # the fallback progress lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json"]


def test_stdlib_corpus_split_is_deterministic_and_disjoint():
    from kbit.cli.tiny_lm import stdlib_corpus

    a, b = stdlib_corpus(max_train_bytes=1 << 16, max_eval_bytes=1 << 14), stdlib_corpus(1 << 16, 1 << 14)
    assert torch.equal(a.train, b.train) and torch.equal(a.eval, b.eval)
    assert a.eval_files >= 1 and a.train.numel() >= 1 << 16 and a.eval.numel() >= 1 << 14
    assert bytes(a.eval[:4096].tolist()) not in bytes(a.train.tolist())


# ---- bench ----------------------------------------------------------------------------------------
def test_bench_quick_runs_every_benchmark_at_a_tiny_size(capsys):
    assert main(["bench", "--quick", "--size", "128", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "## quantize" in out and "## optim" in out and "## linear4bit" in out
    assert "| quantize_4bit (NF4, bs 64, double quant)" in out  # the quantize table
    assert "| kbit AdamW8bit" in out and "speedup vs torch AdamW" in out  # the optimizer table
    assert "| 128->128 | bfloat16 | 1" in out and "| 128->125 |" in out  # Linear4bit, sizes scaled from 4096
    assert "## training" in out and "| kbit AdamW4bit" in out and "stochastic rounding" in out  # quality runs


def test_bench_only_and_argument_mapping(capsys):
    from kbit.cli.bench import benchmark_argv

    assert benchmark_argv("quantize", quick=True, size=None, repeats=None) == ["--size", "1024", "--repeats", "5"]
    assert benchmark_argv("optim", quick=False, size=64, repeats=3) == ["--params", str(12 * 64 * 64), "--tensors",
                                                                        "12", "--repeats", "3"]
    assert benchmark_argv("linear4bit", quick=False, size=None, repeats=None) == []
    assert benchmark_argv("training", quick=True, size=64, repeats=3) == ["--model", "tiny", "--steps", "20"]
    assert main(["bench", "--only", "quantize", "--size", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "## quantize" in out and "## optim" not in out and "## linear4bit" not in out


@pytest.mark.parametrize("script", ["bench_quantize.py", "bench_optim.py", "bench_linear4bit.py"])
def test_benchmark_scripts_still_run_from_the_repository(script):
    """BENCHMARKS.md cites `python benchmarks/bench_*.py`: the wrappers keep those commands working."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--repeats" in result.stdout, result.stderr


def test_training_benchmark_script_runs_from_the_repository():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_training.py"), "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--steps" in result.stdout, result.stderr


def test_pretrained_benchmark_reads_real_sentences_without_importing_them():
    """bench_pretrained.py (BENCHMARKS.md's NF4 vs FP4 table) runs its --help and finds its text offline."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_pretrained.py")
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--sentences" in result.stdout, result.stderr
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_pretrained", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sentences = module.stdlib_sentences(50)
    assert len(sentences) == 50 and all(len(s.split()) >= 4 and "\n" not in s for s in sentences)


def test_paired_timing_alternates_baseline_and_case():
    """bench_optim's ratios come from steps that alternate with the baseline's (the machine drifts)."""
    from kbit.benchmarks.timing import paired_median_seconds

    calls = []
    base, case = paired_median_seconds(lambda: calls.append("b"), lambda: calls.append("c"), repeats=4, warmup=1)
    assert calls == ["b", "c"] * 5
    assert base >= 0.0 and case >= 0.0
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        paired_median_seconds(lambda: None, lambda: None, repeats=0)


def test_optimizer_benchmark_rejects_zero_repeats(capsys):
    from kbit.benchmarks.optim import main as optim_main

    with pytest.raises(SystemExit) as exit_info:
        optim_main(["--params", "3000", "--tensors", "3", "--repeats", "0"])
    assert exit_info.value.code == 2 and "--repeats must be at least 1" in capsys.readouterr().err


def test_optimizer_benchmark_table_at_a_tiny_size(capsys):
    from kbit.benchmarks.optim import CASES, main as optim_main

    from kbit.benchmarks.optim import bitsandbytes_cases

    optim_main(["--params", "3000", "--tensors", "3", "--repeats", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3K")]
    expected = [name for name, _, _ in CASES + bitsandbytes_cases()]
    assert [r.split("|")[2].strip() for r in rows] == expected
    for r in rows:  # every row has a step time, a ratio and its memory columns filled in
        cells = [c.strip() for c in r.split("|")[1:-1]]
        assert float(cells[2]) >= 0.0 and cells[3].endswith("x") and float(cells[6]) >= 0.0
    optim_main(["--params", "3000", "--tensors", "3", "--repeats", "2", "--no-bitsandbytes"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3K")]
    assert [r.split("|")[2].strip() for r in rows] == [name for name, _, _ in CASES]


def test_kernel_ab_benchmark_times_a_build_and_rejects_a_wrong_directory(tmp_path):
    """benchmarks/bench_kernel_ab.py (BENCHMARKS.md's kernel A/B figures): one tiny round of the installed
    kbit gives a positive ns/param and a 1.00x row; a directory without a kbit package is a usage error."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "bench_kernel_ab.py")
    result = subprocess.run([sys.executable, script, "--params", "4096", "--rounds", "1", "--repeats", "1",
                             "--optimizer", "lion"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1].split("|")
    assert row[1].strip() == "installed" and float(row[2]) > 0 and row[4].strip() == "1.00x"
    bad = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "holds no kbit package" in bad.stderr


@pytest.mark.slow
@pytest.mark.skipif("avx512vbmi" not in kbit.supported_cpu_capabilities(), reason="this CPU has no AVX512-VBMI")
def test_in_process_kernel_ab_harness_builds_and_compares_two_variants(tmp_path):
    """benchmarks/kernel_ab (BENCHMARKS.md's in-process A/B figures): two builds of this tree, one with an
    extra define, give two rows, the first with ratio 1.000, and the same numbers (no "different" note);
    a variant that is not a checkout is a usage error naming the expected form."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = os.path.join(root, "benchmarks", "kernel_ab", "build.sh")
    out = tmp_path / "ab"
    made = subprocess.run(["bash", build, str(out), f"a:{root}", f"b:{root}:-DKBIT_UNUSED_DEFINE=1"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    run = subprocess.run([str(out / "harness"), "lion", "4096", "3", "1", str(out / "maps")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("k_")]
    assert [r[0] for r in rows] == ["k_a", "k_b"] and rows[0][7] == "1.000" and float(rows[1][2]) > 0
    assert "different" not in run.stdout
    bad = subprocess.run(["bash", build, str(out), f"c:{tmp_path}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "NAME:SRCTREE" in bad.stderr
