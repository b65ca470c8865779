"""The benchmarks under benchmarks/ run end to end on CPU with the tiny presets, and their pieces count right.

The smoke test starts ``python benchmarks/bench.py`` in a subprocess, as a user would: the
real training path (Accelerate + DeepSpeed ZeRO-2 on CPU) and the plain transformers +
peft loop, then checks the JSON it writes. The first DeepSpeed run on a machine compiles
its CPU communication op once (cached under ~/.cache/torch_extensions).
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtrain import memory
from mmtrain.args import ConfigError
from mmtrain.image_tokens import ImageTokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _benchmark(name: str):
    """A module of benchmarks/, a folder of scripts (not a package) that import their siblings by name."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(name)


bench = _benchmark("bench")
flops = _benchmark("flops")
mmtrain_run = _benchmark("mmtrain_run")
workload = _benchmark("workload")


def _positive(d: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(d[key], (int, float)) and d[key] > 0, (key, d.get(key))


@pytest.mark.slow
def test_bench_smoke_writes_figures(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "benchmarks/bench.py",
        "--lm", "tiny-llama", "--vision", "tiny-clip",
        "--steps", "2", "--warmup", "1", "--micro_batch", "2",
        "--text_tokens", "16", "48", "--plain_batches", "2",
        "--deepspeed_set", "zero_optimization.reduce_bucket_size=2e7",
        "--out", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    for key in ("device", "versions", "git", "command", "flags", "lm", "flops_convention", "mmtrain", "plain", "ratio_tokens_per_s"):
        assert key in result, key
    for lib in ("torch", "transformers", "peft", "accelerate", "deepspeed"):
        assert result["versions"][lib][0].isdigit(), (lib, result["versions"][lib])
    assert result["command"].startswith("python benchmarks/bench.py --lm tiny-llama")

    mm, plain = result["mmtrain"], result["plain"]
    _positive(mm, "tokens_per_s", "samples_per_s", "tflops_per_s", "seconds", "step_s_median")
    _positive(plain, "tokens_per_s", "samples_per_s", "seconds")
    # a CPU has no dense bf16 peak in the table: no MFU rather than one against a GPU's peak
    assert mm["mfu"] is None and plain["mfu"] is None and result["peak_tflops"] is None
    assert result["peak_tflops_source"].startswith("none: ")
    assert result["ratio_tokens_per_s"] > 0
    assert mm["steps"] == 2 and mm["samples"] == 4 and mm["zero_stage"] == 2
    # The epoch's first batch is fetched before the clock (one wait per epoch, recorded apart);
    # both timed steps ran, the first on that batch.
    for system in (mm, plain):
        assert len(system["first_batch_wait_s"]) == 1 and system["first_batch_wait_s"][0] > 0
        assert 0 <= system["data_wait_max_s"] <= system["data_wait_s"] < system["seconds"]
    assert plain["micro_batch"] == 2
    assert mm["lm_attention"] == "sdpa"  # padded batches on a CPU: the LM's own SDPA
    # Both systems ran the same samples: the same token count, and every one counted by the loop.
    assert mm["tokens"] == plain["tokens"] == mm["tokens_counted_by_loop"]
    assert mm["trainable_params"] > 0 and mm["parameter_counts"]["LM LoRA"]["trainable"] > 0
    # The trainer's own DeepSpeed settings reached the engine: clipping, and the bf16
    # per-tensor overflow scan off (the loop stops on a non-finite loss instead).
    assert mm["deepspeed_config"]["gradient_clipping"] == 1.0
    assert mm["deepspeed_config"]["bf16"] == {"enabled": True, "check_grad_overflow": False}
    # --deepspeed_set reached the engine's config, and the memory prediction took it
    assert mm["deepspeed_config"]["zero_optimization"]["reduce_bucket_size"] == 20_000_000
    assert "peak_bytes" in mm["memory_prediction"]


def test_deepspeed_settings_parse_and_reach_the_memory_setup(capsys):
    assert mmtrain_run.deepspeed_settings(["a.b=2.2e8", "c=0.5", "d=true", "e=cpu"]) == {"a.b": 220_000_000, "c": 0.5, "d": True, "e": "cpu"}
    assert bench.bucket_settings(["zero_optimization.stage3_prefetch_bucket_size=0", "bf16.enabled=true"]) == {"prefetch_bucket_size": 0}
    with pytest.raises(SystemExit):
        bench.parse_options(["--deepspeed_set", "zero_optimization"])
    assert "--deepspeed_set 'zero_optimization': expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_on_one_and_two_processes_reports_scaling(tmp_path):
    """``--num_processes 1 2``: each count a launched group of its own (two DeepSpeed processes over gloo here)."""
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "benchmarks/bench.py", "--lm", "tiny-llama", "--vision", "tiny-clip", "--steps", "2", "--warmup", "1",
        "--micro_batch", "2", "--text_tokens", "16", "48", "--plain", "skip", "--num_processes", "1", "2", "--peak_tflops", "0.5", "--out", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    one, two = result["scaling"]
    assert (one["num_processes"], two["num_processes"]) == (1, 2) and one["scaling_efficiency"] == 1.0
    _positive(two, "tokens_per_s", "tokens_per_s_per_gpu", "mfu_per_gpu", "scaling_efficiency", "predicted_peak_gib")
    assert two["tokens_per_s_per_gpu"] == pytest.approx(two["tokens_per_s"] / 2)
    group = result["mmtrain_by_processes"]["2"]
    # Every process ran --steps timed steps on its own share: twice the samples, all of them counted.
    assert group["samples"] == 2 * 2 * 2 and group["tokens"] == group["tokens_counted_by_loop"]
    assert len(group["seconds_per_rank"]) == 2 and group["memory_prediction"]["num_gpus"] == 2
    assert result["mmtrain"] == result["mmtrain_by_processes"]["1"] and result["mmtrain"]["samples"] == 2 * 2
    assert "2 processes:" in proc.stdout


@pytest.mark.slow
def test_bench_runs_the_token_budget_path(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "benchmarks/bench.py", "--lm", "tiny-llama", "--vision", "tiny-clip",
        "--steps", "3", "--warmup", "1", "--text_tokens", "16", "48", "--plain", "skip",
        "--max_tokens_per_batch", "512", "--peak_tflops", "0.5", "--out", str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    mm = result["mmtrain"]
    assert result["max_tokens_per_batch"] == mm["max_tokens_per_batch"] == 512 and mm["micro_batch"] is None
    assert mm["collator"] == "PackingCollator" and mm["mmtrain_args"]["train"]["per_device_train_batch_size"] == 16
    # several whole samples per micro-batch, each micro-batch within the budget, every token counted
    assert mm["samples"] > 2 * mm["steps"] and mm["tokens"] <= 512 * mm["steps"]
    assert mm["tokens"] == mm["tokens_counted_by_loop"]
    assert result["peak_tflops"] == 0.5 and result["peak_tflops_source"] == "--peak_tflops" and mm["mfu"] > 0
    assert "budget 512 tokens" in proc.stdout


def test_peak_table_names_the_devices_and_the_batch_search_reaches_eight():
    assert flops.dense_bf16_peak("NVIDIA H100 80GB HBM3") == (989.0, "H100")
    assert flops.dense_bf16_peak("NVIDIA H200") == (989.0, "H200")
    assert flops.dense_bf16_peak("NVIDIA A100-SXM4-80GB") == (312.0, "A100")
    assert flops.dense_bf16_peak("NVIDIA H100 PCIe")[0] == 756.0
    assert flops.dense_bf16_peak("AMD EPYC 9654") is None
    assert flops.figures(1.0, [10], {"params": 1, "hidden": 1, "layers": 1}, None)["mfu"] is None
    opts, _ = bench.parse_options([])
    assert opts.plain_batches == [8, 6, 4, 2, 1] and opts.peak_tflops is None


def test_token_budget_replaces_the_micro_batch():
    opts, rest = bench.parse_options(["--lm", "tiny-llama", "--vision", "tiny-clip", "--max_tokens_per_batch", "4096"])
    argv = bench.mmtrain_argv(opts, rest, "out")
    assert "--per_device_train_batch_size" not in argv and argv[-2:] == ["--max_tokens_per_batch", "4096"]
    _, data_args, _ = bench.training_arguments(opts, rest, "out")
    # about --steps budgets of mean-length samples (an image span and the mean text length)
    assert mmtrain_run.timed_samples(opts, data_args, 10) == -(-opts.steps * 4096 // (10 + sum(opts.text_tokens) / 2))
    with pytest.raises(ConfigError, match="would win over --micro_batch; drop --micro_batch"):
        bench.parse_options(["--micro_batch", "2", "--max_tokens_per_batch", "4096"])


def test_fp8_base_passes_through_to_training_and_the_memory_prediction():
    opts, rest = bench.parse_options(["--lm", "tiny-llama", "--vision", "tiny-clip", "--fp8_base", "--plain", "skip"])
    assert rest == ["--fp8_base"]
    model_args, _, train_args = bench.training_arguments(opts, rest, "out")
    assert train_args.fp8_base
    plain = bench.memory_prediction(opts, model_args, 1)
    fp8 = bench.memory_prediction(opts, model_args, 1, fp8_base=True)
    assert fp8["setup"] == "zero2+fp8" and fp8["peak_bytes"] < plain["peak_bytes"]


@pytest.mark.parametrize("task", ["markov", "memorise"])
def test_fp8_quality_runs_both_precisions_on_the_same_batches(task, tmp_path):
    """The quality script's dry run: tiny preset, CPU (whose float8 products are slow but right)."""
    quality = _benchmark("fp8_quality")
    out = tmp_path / "q.json"
    result = quality.main(["--preset", "tiny-llama", "--task", task, "--steps", "3", "--seq", "32", "--batches", "2", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["max_relative_difference"] == result["max_relative_difference"]
    assert len(result["loss_bf16"]) == len(result["loss_fp8"]) == len(result["relative_difference"]) == 3
    assert result["loss_bf16"] != result["loss_fp8"]  # float8 really ran
    assert result["max_relative_difference"] < 0.01


def test_fp8_quality_markov_batches_are_fresh_and_follow_one_chain():
    quality = _benchmark("fp8_quality")
    args = quality.parse_args(["--preset", "tiny-llama", "--steps", "4", "--batch", "2", "--seq", "64"])
    data = quality.batches(args, vocab=5000)
    assert len(data) == 4 and all(b.shape == (2, 64) for b in data)
    assert len({tuple(b.flatten().tolist()) for b in data}) == 4  # no batch repeats
    ids = torch.cat(data)
    assert int(ids.max()) < quality.CHAIN_IDS
    followers: dict[int, set[int]] = {}
    for row in ids.tolist():
        for a, b in zip(row, row[1:]):
            followers.setdefault(a, set()).add(b)
    assert max(len(f) for f in followers.values()) <= quality.SUCCESSORS  # each id has at most 4 successors


def test_samples_follow_the_layout():
    tokens = ImageTokens(image_id=11, start_id=10, end_id=12, per_image=5, original_vocab_size=10)
    data = workload.SyntheticSamples(6, tokens, (4, 9), 0.25, image_size=8, bos_id=0, seed=3)
    for i in range(len(data)):
        item = data[i]
        text = data.text[i]
        assert 4 <= text <= 9
        assert len(item["input_ids"]) == data.length(i) == tokens.span_length + text
        assert item["input_ids"][0] == 0 and item["input_ids"][1:8].tolist() == tokens.span()
        assert int((item["labels"] != -100).sum()) == int(0.25 * text)
        assert item["input_ids"][8:].max() < tokens.original_vocab_size
        assert item["pixel_values"].shape == (1, 3, 8, 8)
    again = workload.SyntheticSamples(6, tokens, (4, 9), 0.25, image_size=8, bos_id=0, seed=3)
    assert torch.equal(again[2]["input_ids"], data[2]["input_ids"])
    assert torch.equal(again[2]["pixel_values"], data[2]["pixel_values"])


def test_flops_follow_the_convention():
    shape = {"params": 1000, "hidden": 8, "layers": 2}
    assert flops.sample_flops([10], shape) == 4 * 1000 * 10 + 4 * 10 * 10 * 8 * 2
    f = flops.figures(2.0, [10, 30], shape, peak_tflops=1e-9)
    assert f["tokens"] == 40 and f["tokens_per_s"] == 20 and f["samples_per_s"] == 1
    assert f["mfu"] == pytest.approx(flops.sample_flops([10, 30], shape) / 2.0 / 1e3)
    assert f["mfu_attention_6"] > f["mfu"]


def test_accelerate_environment_matches_the_configs():
    opts, rest = bench.parse_options(["--zero_stage", "3", "--offload", "optimizer+params", "--packing"])
    env = mmtrain_run.accelerate_environment(opts)
    assert rest == ["--packing"]
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "cpu" and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    opts, _ = bench.parse_options(["--zero_stage", "none"])
    assert mmtrain_run.accelerate_environment(opts)["ACCELERATE_USE_DEEPSPEED"] == "false"
    with pytest.raises(SystemExit):
        bench.parse_options(["--zero_stage", "2", "--offload", "optimizer+params"])


def test_memory_validation_rows_and_combine(tmp_path):
    mv = _benchmark("memory_validation")
    assert mv.parse_rows("0-2,5", 16) == [0, 1, 2, 5] and mv.parse_rows("all", 3) == [0, 1, 2]
    rows = []
    for s in mv.validation_rows()[:2]:
        rows.append({
            "stage": s.zero_stage, "offload": s.offload, "micro_batch": s.micro_batch, "seq_len": s.seq_len,
            "gradient_checkpointing": s.gradient_checkpointing, "num_gpus": 1, "measured_peak_bytes": 10 * 2**30,
            "predicted_peak_bytes": 11 * 2**30, "device": "test", "versions": {"torch": torch.__version__}, "command": "x",
        })
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(rows[1:]))
    b.write_text(json.dumps(rows[:1]))
    out = tmp_path / "memory.json"
    merged = mv.combine([str(a), str(b)], str(out))
    assert [r["gradient_checkpointing"] for r in merged] == [False, True]  # validation_rows() order
    assert mv.load_measurements(str(out)) == merged
    assert "within" in mv.summarise(merged)


def test_validation_rows_and_measurement_file(tmp_path):
    mv = _benchmark("memory_validation")
    rows = mv.validation_rows()
    assert len(rows) == 16 and len({r.name + str(r.micro_batch) for r in rows}) == 16
    assert {(r.zero_stage, r.offload) for r in rows} == {(0, "none"), (2, "none"), (2, "optimizer"), (3, "optimizer+params")}
    facts = memory.model_facts(memory.ref_model_args("ref-7b"))
    records = [
        {
            "stage": r.zero_stage,
            "offload": r.offload,
            "micro_batch": r.micro_batch,
            "seq_len": r.seq_len,
            "gradient_checkpointing": r.gradient_checkpointing,
            "num_gpus": r.num_gpus,
            "measured_peak_bytes": int(memory.estimate(facts, r).total * 1.05),
            "predicted_peak_bytes": memory.estimate(facts, r).total,
            "device": "NVIDIA H100 80GB HBM3",
            "versions": {"torch": "x"},
            "command": "python benchmarks/measure_memory.py",
        }
        for r in rows
    ]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(records))
    loaded = mv.load_measurements(str(path))
    assert all(c["within"] and c["ratio"] == pytest.approx(1.05, rel=1e-6) for c in mv.compare(loaded))
    del records[0]["device"]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="device"):
        mv.load_measurements(str(path))


def test_full_finetune_rows_run_on_two_gpus_through_torchrun(tmp_path):
    """The two-GPU measurement of 7B with the whole LM trained: its commands parse as the bench takes them."""
    mv = _benchmark("memory_validation")
    args = mv.model_args(False, "full-7b")
    rows = mv.setups(False, "full-7b")
    assert args.lm_mode == "full" and {(r.zero_stage, r.num_gpus) for r in rows} == {(3, 2)}
    cmd = mv.bench_command(args, rows[0], 1470, 3)
    assert cmd[:5] == ["torchrun", "--standalone", "--nproc_per_node", "2", "benchmarks/bench.py"]
    opts, passthrough = bench.parse_options(cmd[5:])
    model_args, _, _ = bench.training_arguments(opts, passthrough, str(tmp_path))
    assert model_args.lm_mode == "full" and model_args.lang_lora_dim == 0 and opts.zero_stage == 3
    facts = memory.model_facts(args)
    assert memory.estimate(facts, rows[0]).optimizer_states == 12 * -(-facts.total(trainable=True) // 2)


def test_plain_loop_batch_search_runs_each_attempt_in_its_own_process(tmp_path, monkeypatch):
    """The GPU path of the plain loop's batch search: a failing micro-batch is recorded, the next one runs.

    Micro-batch 0 cannot run (the loader refuses it), standing in for an attempt that
    dies; micro-batch 2 then runs in a fresh process and its figures come back.
    """
    monkeypatch.chdir(ROOT)
    raw = ["--lm", "tiny-llama", "--vision", "tiny-clip", "--steps", "1", "--warmup", "0", "--text_tokens", "8", "16",
           "--plain_batches", "4", "2", "--out", str(tmp_path / "unused.json")]
    plain = bench.plain_in_subprocesses(raw, [0, 2])
    assert plain["micro_batch"] == 2 and plain["tokens_per_s"] > 0
    assert plain["out_of_memory_at"] == [0] and plain["failed_attempts"][0]["returncode"] != 0
    assert not (tmp_path / "unused.json").exists()  # the children write only their own files


@pytest.mark.parametrize("name, budget", [("budget_h200_seq2048_24576_fp8_vs_bf16_8fef268", 24576),
                                          ("budget_h200_mix_16384_fp8_vs_bf16_8fef268", 16384)])
def test_budget_runs_are_predicted_for_a_full_budget_row(name, budget):
    """The bench's prediction for a token budget: one packed row of the whole budget, against the current H200 peaks in results."""
    result = json.loads(Path(ROOT, "benchmarks", "results", f"{name}.json").read_text())
    opts, rest = bench.parse_options(result["command"].split()[2:])
    model_args, data_args, _ = bench.training_arguments(opts, rest, "out")
    assert data_args.max_tokens_per_batch == budget == result["max_tokens_per_batch"]
    for run, fp8 in ((result["mmtrain_bf16"], False), (result["mmtrain"], True)):
        predicted = bench.memory_prediction(opts, model_args, 1, compiled=True, fp8_base=fp8, max_tokens=data_args.max_tokens_per_batch)
        assert (predicted["micro_batch"], predicted["seq_len"]) == (1, budget)
        assert predicted["peak_bytes"] == pytest.approx(run["peak_allocated_bytes"], rel=0.10), (fp8, predicted["peak_gib"], run["peak_allocated_gib"])


def test_fp8_runs_carry_their_bf16_baseline_in_the_same_json(tmp_path, monkeypatch):
    """The bfloat16 baseline of a float8 run: the same flags less --fp8_base, in a process of its own.

    On a CPU the child could not start with --fp8_base (refused before weights load), so
    figures coming back show the flag was taken off; the comparison then names what was missed.
    """
    monkeypatch.chdir(ROOT)
    raw = ["--lm", "tiny-llama", "--vision", "tiny-clip", "--steps", "1", "--warmup", "0", "--text_tokens", "8", "16",
           "--fp8_base", "--profile", "on", "--out", str(tmp_path / "unused.json")]
    bf16 = bench.bf16_in_subprocess(raw)
    assert bf16["tokens_per_s"] > 0
    assert "profile" not in bf16 and not (tmp_path / "unused.json").exists()
    opts, _ = bench.parse_options(raw)
    result = {"workload": "ref-7b", "mmtrain_bf16": {"tokens_per_s": 100.0, "peak_allocated_bytes": 2 * 2**30, "peak_allocated_gib": 2.0}}
    fp8 = {"tokens_per_s": 150.0, "peak_allocated_bytes": 3 * 2**30, "peak_allocated_gib": 3.0}
    missed = bench.fp8_comparison(result, fp8, opts, cuda=True)
    assert result["targets"]["fp8_workload"] == "mix" and result["fp8_over_bf16"]["tokens_per_s"] == 1.5
    assert missed == ["peak 3.0 GiB not below bf16's 2.0", "tokens/s 150 < 20000"]


def test_attention_kernel_bench_rows_and_reference():
    attention = _benchmark("attention_kernels")
    assert attention.document_lengths(16384, "2048", 0) == [2048] * 8
    mix = attention.document_lengths(16384, "mix", 0)
    assert sum(mix) <= 16384 and all(578 + 64 <= n <= 578 + 1024 for n in mix)
    assert mix == attention.document_lengths(16384, "mix", 0)  # seeded
    # per-sample causal attention: two samples of 4 equal the batch of two rows under SDPA
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.view(2, 4, 2, 16).transpose(1, 2) for t in (q, k, v)), is_causal=True)
    assert torch.allclose(attention.reference(q, k, v, [4, 4]), dense.transpose(1, 2).reshape(8, 2, 16), atol=1e-6)
    assert attention.causal_flops([4, 4], 2, 16) == 2 * (2.0 * 16 * 16 * 2)
    assert attention.main(["--tokens", "64", "--docs", "16"]) == {} or torch.cuda.is_available()


def test_results_name_the_code_they_ran(monkeypatch):
    provenance = _benchmark("provenance")
    monkeypatch.setenv("MMTRAIN_CODE_COMMIT", "0" * 40)
    info = provenance.git_commit()
    assert info["code_commit"] == "0" * 40 and len(info["commit"]) in (40, len("unknown"))


TRL_MISSING = importlib.util.find_spec("trl") is None


@pytest.fixture(scope="module")
def dpo_smoke(tmp_path_factory):
    """``benchmarks/dpo_bench.py --smoke`` once: mmtrain, and TRL where trl is installed; (JSON, stdout)."""
    out = tmp_path_factory.mktemp("dpo") / "dpo.json"
    systems = ["mmtrain"] if TRL_MISSING else ["mmtrain", "trl"]
    cmd = [sys.executable, "benchmarks/dpo_bench.py", "--smoke", "--systems", *systems, "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_dpo_bench_smoke_runs_mmtrain_dpo_steps(dpo_smoke):
    result, stdout = dpo_smoke
    assert result["workload"] == "smoke" and result["command"].startswith("python benchmarks/dpo_bench.py --smoke")
    assert result["git"]["commit"] and result["versions"]["torch"][0].isdigit()
    mm = result["mmtrain"]
    _positive(mm, "pairs_per_s", "tokens_per_s", "seconds", "trainable_params")
    # two timed steps of two pairs, every half 160 tokens, no padding: all counted by the loop
    assert mm["batch"] == 2 and mm["steps"] == 2 and mm["pairs"] == 4
    assert mm["tokens"] == 4 * 2 * 160  # both halves of 4 timed pairs, what TRL computes
    # each pair's prompt once: its 160-token half, then the other answer's 32 tokens and the last shared token
    assert mm["shared_prompt"] and mm["tokens_counted_by_loop"] == 4 * (160 + 32 + 1)
    assert mm["tokens_per_s"] == pytest.approx(mm["pairs_per_s"] * 2 * 160)
    assert mm["mmtrain_args"]["train"]["objective"] == "dpo" and mm["zero_stage"] == 2
    assert mm["parameter_counts"]["LM LoRA"]["trainable"] > 0 and mm["parameter_counts"]["projector"]["trainable"] > 0
    assert mm["out_of_memory_at"] == [] and [t["batch"] for t in mm["tries"]] == [2]
    assert "mmtrain batch 2:" in stdout


@pytest.mark.slow
@pytest.mark.skipif(TRL_MISSING, reason="trl is not installed here: TRL's side of benchmarks/dpo_bench.py runs only where it is "
                    "(benchmarks/gpu_suite.sh installs trl 1.16.0 from the carried wheels); mmtrain's side is tested above")
def test_dpo_bench_smoke_runs_trl_on_the_same_pairs_and_model(dpo_smoke):
    result, stdout = dpo_smoke
    mm, trl = result["mmtrain"], result["trl"]
    assert result["versions"]["trl"][0].isdigit()
    _positive(trl, "pairs_per_s", "tokens_per_s", "seconds")
    assert trl["batch"] == 2 and trl["pairs"] == mm["pairs"] and trl["tokens"] == mm["tokens"]
    # TRL's collated rows are mmtrain's ids, answer spans and pixels; the same parts train, the same size
    assert trl["same_pairs_as_mmtrain"]["same_ids_labels_and_pixels"]
    assert trl["trainable_params"] == mm["trainable_params"]
    assert trl["dpo_config"]["max_length"] is None and trl["dpo_config"]["precompute_ref_log_probs"] is False
    assert trl["dpo_config"]["gradient_checkpointing"] is True
    assert result["ratio"]["pairs_per_s"] == pytest.approx(mm["pairs_per_s"] / trl["pairs_per_s"])
    assert result["ratio"]["peak_allocated"] is None and result["target_met"] is None  # no GPU memory on a CPU
    assert "mmtrain/TRL" in stdout


def test_dpo_bench_search_doubles_until_out_of_memory_and_halves_below_a_guess(monkeypatch):
    dpo_bench = _benchmark("dpo_bench")
    fits_up_to = {"mmtrain": 5, "trl": 0}

    def attempt(raw, system, batch):
        if batch <= fits_up_to[system]:
            return {"batch": batch, "pairs_per_s": float(batch), "tokens_per_s": 1.0}
        return {"batch": batch, "out_of_memory": True, "error": "OutOfMemoryError"}

    monkeypatch.setattr(dpo_bench, "attempt", attempt)
    row = dpo_bench.search([], "mmtrain", 2, 64)
    assert row["batch"] == 4 and row["out_of_memory_at"] == [8] and [t["batch"] for t in row["tries"]] == [2, 4, 8]
    row = dpo_bench.search([], "mmtrain", 16, 64)
    assert row["batch"] == 4 and row["out_of_memory_at"] == [16, 8]
    row = dpo_bench.search([], "trl", 4, 64)
    assert "pairs_per_s" not in row and row["out_of_memory_at"] == [4, 2, 1]
    row = dpo_bench.search([], "mmtrain", 4, 4)  # the ceiling stops the doubling
    assert row["batch"] == 4 and row["out_of_memory_at"] == []


@pytest.mark.skipif(TRL_MISSING, reason="trl is not installed here: TRL's side of benchmarks/dpo_bench.py runs only where it is")
def test_dpo_bench_llava_scores_the_pairs_as_mmtrain_does():
    """transformers' LLaVA made from mmtrain's model gives each half the summed answer log-probability mmtrain's gives it.

    mmtrain's model carries fresh LoRA (B = 0, a no-op), as its DPO run starts; TRL's LLaVA is
    built from the same flags without LoRA: the same weights, so both systems start from the
    same policy and reference on the same pairs.
    """
    from accelerate.utils import set_seed
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mmtrain.data.preference import PairCollator
    from mmtrain.model.builder import build_model

    dpo_bench, dpo_pairs, trl_dpo = _benchmark("dpo_bench"), _benchmark("dpo_pairs"), _benchmark("trl_dpo")
    opts, rest = dpo_bench.parse_options(["--smoke"])
    with_lora, _, train_args = dpo_bench.mmtrain_flags(opts, rest, batch=2, output_dir="unused", lora=True)
    without, _, _ = dpo_bench.mmtrain_flags(opts, rest, batch=2, output_dir="unused", lora=False)
    set_seed(train_args.seed)
    ours = build_model(with_lora.model_config(), dtype=torch.float32)
    torch.manual_seed(opts.seed)
    plain = build_model(without.model_config(), dtype=torch.float32)
    pairs = dpo_pairs.pairs_for(opts, ours, 2)
    llava, processor = trl_dpo.llava_from_mmtrain(plain, torch.float32, torch.device("cpu"))

    batch = PairCollator(ours.tokenizer.pad_token_id)([pairs[0], pairs[1]])
    with torch.no_grad():
        expected = -ours.model(**batch).loss_sum_per_sample
        columns = pairs.trl_columns_of(range(2))
        trl_batch = DataCollatorForVisionPreference(processor)([{k: columns[k][i] for k in columns} for i in range(2)])
        logits = llava(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"], pixel_values=trl_batch["pixel_values"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, trl_batch["input_ids"][:, 1:, None])[..., 0]
    got = (logp * trl_batch["completion_mask"][:, 1:]).sum(dim=1)
    assert expected.shape == got.shape == (4,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)

def test_nf4_quality_dry_run_plants_outliers_in_both_runs(tmp_path):
    """--base nf4: the same batches through a 4-bit base, with outlier channels planted alike in both runs."""
    pytest.importorskip("bitsandbytes")
    quality = _benchmark("fp8_quality")
    out = tmp_path / "q.json"
    result = quality.main(["--preset", "tiny-llama", "--base", "nf4", "--outlier_channels", "2", "--steps", "3", "--seq", "32",
                           "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text())["base"] == "nf4"
    assert len(result["loss_bf16"]) == len(result["loss_nf4"]) == 3 and result["loss_bf16"] != result["loss_nf4"]
    args = quality.parse_args(["--preset", "tiny-llama", "--outlier_channels", "3", "--device", "cpu"])
    plain, planted = quality.build(quality.parse_args(["--preset", "tiny-llama", "--device", "cpu"]), False), quality.build(args, False)
    norm = planted.model.layers[0].input_layernorm.weight / plain.model.layers[0].input_layernorm.weight
    assert sorted(set(norm.float().round().tolist())) == [1.0, quality.OUTLIER_FACTOR] and int((norm > 1).sum()) == 3


def test_nf4_passes_through_to_training_and_the_memory_prediction():
    pytest.importorskip("bitsandbytes")  # the training flags are checked, and --quantize_base needs it
    opts, rest = bench.parse_options(["--lm", "tiny-llama", "--vision", "tiny-clip", "--quantize_base", "nf4", "--plain", "skip"])
    assert rest == ["--quantize_base", "nf4"]
    _, _, train_args = bench.training_arguments(opts, rest, "unused")
    assert train_args.quantize_base == "nf4"
    model_args, _, _ = bench.training_arguments(opts, rest, "unused")
    plain = bench.memory_prediction(opts, model_args, 1)
    nf4 = bench.memory_prediction(opts, model_args, 1, nf4_base=True)
    assert nf4["setup"] == "zero2+nf4" and nf4["peak_bytes"] < plain["peak_bytes"]


def test_small_gpu_runs_each_cap_with_the_recommended_setting():
    small_gpu = _benchmark("small_gpu")
    rec = small_gpu.recommendation(12, smoke=False, float8_gpu=False)
    assert rec["base"] == "nf4" and rec["predicted_peak_gib"] < 12 and "--quantize_base nf4" in rec["command"]
    argv = small_gpu.bench_argv(rec, smoke=False, steps=4, warmup=2, out="x.json")
    assert argv[argv.index("--quantize_base") + 1] == "nf4" and argv[argv.index("--zero_stage") + 1] == str(rec["zero_stage"])
    assert argv[argv.index("--max_tokens_per_batch") + 1] == str(rec["max_tokens_per_batch"])
    assert ("--gradient_checkpointing" in argv) == rec["gradient_checkpointing"] and "--plain" in argv
    assert bench.parse_options(argv)  # flags bench.py takes
