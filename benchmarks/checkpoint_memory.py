"""Host memory a checkpoint costs each rank, measured in a real training run, beside mmtrain.memory's prediction.

    python benchmarks/checkpoint_memory.py --out benchmarks/results/checkpoint_memory_cpu_tiny.json
    python benchmarks/checkpoint_memory.py --workload ref-7b --config_file accelerate_configs/zero2.yaml \\
        --out benchmarks/results/checkpoint_memory_h200_ref7b_full.json -- --lm_training full --lang_lora_dim 0

Launches the trainer itself (``accelerate launch mmtrain/train.py``) for ``--max_steps``
optimizer steps with one checkpoint at the end, and reads what the checkpoint recorded of
its own cost: each process samples its resident set size from a thread while it saves
(``host_memory`` in the checkpoint's ``manifest.json``: the growth above the resident set
before the save, for the whole save and for the portable trainable state alone). The
result file holds those figures per rank, the largest tensor of the portable state (the
most the main rank should hold at once), the bytes on disk, the prediction of
``mmtrain.memory`` and the provenance (device, versions, commit, command).

Flags after ``--`` go to the trainer and override the workload's.

``--portable_only`` measures the portable state alone, in this process: the run is set
up as ``mmtrain.train`` sets it up (``--zero_stage`` picks the DeepSpeed stage, as
``accelerate_configs/zeroN.yaml`` would), takes one optimizer step and writes the
portable state to ``--sink``. For a 7B full fine-tune on one GPU, whose whole checkpoint
(about 165 GiB: the engine's files and the portable state) does not fit a 64 GiB disk:

    python benchmarks/checkpoint_memory.py --portable_only --zero_stage 2 --sink /dev/null --workload ref-7b \
        --out benchmarks/results/checkpoint_memory_h200_ref7b_full.json -- --lm_training full --lang_lora_dim 0 --gradient_checkpointing true
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):  # benchmarks/ is not a package: its modules, and this checkout's mmtrain
    if _path not in sys.path:
        sys.path.insert(0, _path)

from provenance import ROOT, git_commit  # noqa: E402

WORKLOADS = {
    "tiny": ["--lm_model_name_or_path", "tiny-llama", "--vision_model_name_or_path", "tiny-clip", "--lang_lora_dim", "4"],
    # The bench's reference model (benchmarks/bench.py); add --lm_training full --lang_lora_dim 0 for LLaVA's stage 2.
    "ref-7b": ["--lm_model_name_or_path", "llama-2-7b", "--vision_model_name_or_path", "clip-vit-large-patch14-336", "--vis_proj", "mlp", "--lang_lora_dim", "16"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_options(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="tiny")
    parser.add_argument("--config_file", default=None, help="Accelerate config (accelerate_configs/X.yaml); default: one plain process.")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=1, help="Optimizer steps before the one checkpoint.")
    parser.add_argument("--seq_len", type=int, default=512, help="The trainer's --max_seq_len.")
    parser.add_argument("--output_dir", default=None, help="Where the run writes (default: a temporary folder, removed after).")
    parser.add_argument("--out", default=None, help="Result JSON file.")
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--portable_only", action="store_true", help="Measure the portable state's write alone, in this process.")
    parser.add_argument("--zero_stage", type=int, default=None, help="With --portable_only: DeepSpeed's ZeRO stage (default: no DeepSpeed).")
    parser.add_argument("--sink", default=None, help="With --portable_only: where the state is written (default: under the run's folder).")
    return parser.parse_args(argv), passthrough


def trainer_flags(opts, passthrough: list[str], output_dir: str) -> list[str]:
    samples = 16 * opts.num_processes
    return [
        *WORKLOADS[opts.workload],
        "--output_dir", output_dir, "--data_path", os.path.join(output_dir, "data"),
        "--synthetic_num_samples", str(samples), "--eval_ratio", "0.25", "--eval_generate", "0",
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--max_seq_len", str(opts.seq_len),
        "--max_steps", str(opts.max_steps), "--save_steps", str(opts.max_steps), "--save_total_limit", "1",
        "--export_each_epoch", "false", "--logging_steps", "1",
        *passthrough,
    ]


def launch_command(opts, flags: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if opts.config_file:
        cmd += ["--config_file", opts.config_file]
    cmd += ["--num_processes", str(opts.num_processes), "--num_machines", "1", "--main_process_port", str(_free_port())]
    return [*cmd, os.path.join("mmtrain", "train.py"), *flags]  # run from the checkout's root


def largest_tensor_bytes(path: str) -> tuple[int, int]:
    """``(largest tensor's bytes, tensors)`` of a safetensors file, from its header alone."""
    from safetensors import safe_open

    sizes = []
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            sizes.append(4 * math.prod(f.get_slice(key).get_shape()))
    return max(sizes, default=0), len(sizes)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def predicted(flags: list[str], manifest: dict, num_processes: int) -> dict:
    """``mmtrain.memory``'s checkpoint figures for this model and layout."""
    from mmtrain.args import parse_args
    from mmtrain.memory import MemorySetup, checkpoint_cost, model_facts

    model_args, _, _ = parse_args(flags)
    precision = "bf16" if manifest.get("zero_stage") is not None or _cuda() else "fp32"
    setup = MemorySetup(zero_stage=manifest.get("zero_stage") or 0, num_gpus=num_processes, precision=precision)
    host, disk = checkpoint_cost(model_facts(model_args), setup)
    return {"setup": setup.name, "precision": precision, "checkpoint_host": host, "checkpoint_disk": disk}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "accelerate", "deepspeed", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # recorded, not fatal
            out[name] = f"unavailable: {type(e).__name__}"
    return out


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return platform.processor() or platform.machine() or "cpu"


def measure_portable_only(opts, flags: list[str], output_dir: str) -> dict:
    """One optimizer step of the trainer's set-up in this process, then the portable state written under watch."""
    import torch
    from types import SimpleNamespace

    from mmtrain_run import accelerate_environment

    cuda = torch.cuda.is_available()
    os.environ.update(accelerate_environment(SimpleNamespace(zero_stage=opts.zero_stage, offload="none", precision="bf16" if cuda else "fp32")))
    from mmtrain.compat import deepspeed as deepspeed_compat
    from mmtrain.args import parse_args
    from mmtrain.data import build_datasets, read_sources
    from mmtrain.training import distributed, portable_state, setup, speedups
    from mmtrain.training.engine_view import EngineView
    from mmtrain.training.host_memory import RssWatch, rss_bytes

    distributed.prepare_environment()
    model_args, data_args, train_args = parse_args(flags)
    accelerator = distributed.make_accelerator(train_args)
    data_args.num_workers = 0  # one batch is read
    sources = read_sources(data_args, seed=train_args.seed, main_process_first=accelerator.main_process_first)
    built = setup.build_for_training(accelerator, model_args, train_args, data_args)
    data = build_datasets(data_args, built.tokenizer, built.image_processor, built.image_tokens, seed=train_args.seed, sources=sources,
                          rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = setup.make_train_loader(accelerator, data.train, speedups.make_train_collator(built, model_args, data_args), data_args, train_args)
    model = EngineView(built.model)
    optimizer, scheduler, _ = setup.make_optimizer_and_schedule(accelerator, model, train_args, setup.batches_per_epoch(loader, 1))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    setup.place_outside_engine(accelerator, model)
    out = model(**next(iter(loader)))
    accelerator.backward(out.loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    trainable = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    largest = 4 * max(deepspeed_compat.full_numel(p) for p in trainable)
    sink = opts.sink or os.path.join(output_dir, portable_state.PORTABLE_STATE)
    deepspeed = distributed.deepspeed_plugin(accelerator) is not None
    start = time.time()
    with RssWatch() as watch:
        report = portable_state.write(sink, model, optimizer, deepspeed, writer=accelerator.is_main_process)
    return {
        "mode": "portable_only",
        "zero_stage": opts.zero_stage,
        "sink": opts.sink or "<output_dir>/" + portable_state.PORTABLE_STATE,
        "write_s": round(time.time() - start, 1),
        "loss": out.loss.detach().item(),
        "trainable_parameters": sum(deepspeed_compat.full_numel(p) for p in trainable),
        "rss_before": watch.start,
        "rss_after": rss_bytes(),
        "per_rank": {"portable_state_rss_growth": [watch.growth], "portable_state_host_copy_peak": [report.host_peak_bytes]},
        "portable_state": {"tensors": report.tensors, "bytes": report.bytes_on_disk, "largest_tensor_bytes": largest},
        "portable_growth_over_largest_tensor": round(watch.growth / largest, 3),
        "gpu_peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
    }


def main(argv: list[str] | None = None) -> dict:
    opts, passthrough = parse_options(argv)
    output_dir = opts.output_dir or tempfile.mkdtemp(prefix="checkpoint-memory-")
    flags = trainer_flags(opts, passthrough, output_dir)
    if opts.portable_only:
        try:
            measured = measure_portable_only(opts, flags, output_dir)
        finally:
            if opts.output_dir is None:
                shutil.rmtree(output_dir, ignore_errors=True)
        result = {
            "benchmark": "checkpoint_memory", "device": device(), "versions": versions(), "git": git_commit(),
            "command": ["python", "benchmarks/checkpoint_memory.py", *(sys.argv[1:] if argv is None else argv)],
            "workload": opts.workload, "num_processes": 1, **measured,
        }
        _write(result, opts.out)
        gib = 2**30
        print(f"portable state of {measured['portable_state']['bytes'] / gib:.2f} GiB ({measured['portable_state']['tensors']} tensors, largest "
              f"{measured['portable_state']['largest_tensor_bytes'] / gib:.3f} GiB) written in {measured['write_s']} s; RSS growth "
              f"{measured['per_rank']['portable_state_rss_growth'][0] / gib:.3f} GiB = {measured['portable_growth_over_largest_tensor']} x the largest tensor")
        return result
    cmd = launch_command(opts, flags)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=opts.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    try:
        checkpoint = os.path.join(output_dir, "checkpoints", f"step-{opts.max_steps:08d}")
        with open(os.path.join(checkpoint, "manifest.json")) as f:
            manifest = json.load(f)
        host = manifest["host_memory"]
        largest, tensors = largest_tensor_bytes(os.path.join(checkpoint, "trainable_state.safetensors"))
        main_growth = host["portable_state_rss_growth"][0]
        result = {
            "benchmark": "checkpoint_memory",
            "device": device(),
            "versions": versions(),
            "git": git_commit(),
            # As typed, from the checkout's root; the run's temporary folder as <output_dir>.
            "command": ["python", "benchmarks/checkpoint_memory.py", *(sys.argv[1:] if argv is None else argv)],
            "trainer_command": ["python", *(a.replace(output_dir, "<output_dir>") for a in cmd[1:])],
            "workload": opts.workload,
            "num_processes": opts.num_processes,
            "zero_stage": manifest.get("zero_stage"),
            "wall_s": round(time.time() - start, 1),
            "per_rank": {key: values for key, values in host.items()},
            "portable_state": {**manifest["portable_state"], "largest_tensor_bytes": largest},
            # The main rank's growth while writing the portable state, in units of its largest tensor.
            "portable_growth_over_largest_tensor": round(main_growth / largest, 3) if largest else None,
            "checkpoint_bytes_on_disk": folder_bytes(checkpoint),
            "predicted": predicted(flags, manifest, opts.num_processes),
        }
    finally:
        if opts.output_dir is None:
            shutil.rmtree(output_dir, ignore_errors=True)
    _write(result, opts.out)
    gib = 2**30
    print(
        f"checkpoint of {result['portable_state']['bytes'] / gib:.2f} GiB portable state ({tensors} tensors, largest "
        f"{largest / gib:.3f} GiB), {result['checkpoint_bytes_on_disk'] / gib:.2f} GiB on disk; RSS growth per rank: whole save "
        f"{[round(v / gib, 3) for v in host['save_rss_growth']]} GiB, portable state {[round(v / gib, 3) for v in host['portable_state_rss_growth']]} GiB"
    )
    return result


def _write(result: dict, out: str | None) -> None:
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
