"""The loop the bench competes with: what a user would write with transformers + peft alone.

On the same language model and the same samples as mmtrain, in the same process (run
first, then freed), or one process per micro-batch on a GPU: ``AutoModelForCausalLM`` in
bf16 (SDPA), ``peft.get_peft_model`` with LoRA on all linear layers, fused torch AdamW,
gradient clipping, ``model(input_ids, attention_mask, labels)`` on right-padded batches
(image positions are ordinary token ids there; there is no vision tower). It tries the
micro-batches of ``--plain_batches`` in order and keeps the first that does not run out
of memory.
"""

from __future__ import annotations

import math

import torch

from timing import free_memory, timed_run
from workload import SyntheticSamples


def run_plain(opts, tokenizer, image_tokens, image_size: int, shape: dict, timed_n: int, pad_to_multiple_of: int = 1) -> dict:
    """The plain loop; its batches are padded like mmtrain's (``pad_to_multiple_of``), so both see the same shapes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mmtrain.data import Collator
    from mmtrain.model.language import load_language_config
    from mmtrain.training.distributed import loader_workers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
    config = load_language_config(opts.lm)
    config.use_cache = False
    torch.manual_seed(opts.seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_rank, lora_dropout=0.0, target_modules="all-linear", bias="none")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of)
    info = {
        "pad_to_multiple_of": pad_to_multiple_of,
        "model": f"AutoModelForCausalLM({opts.lm}) {opts.precision} sdpa + peft LoRA r={opts.lora_rank} all-linear, torch AdamW (fused on GPU), clip 1.0",
        "trainable_params": sum(p.numel() for p in params),
        "base_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "out_of_memory_at": [],
    }

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        out = model(**batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Device tensors, read after the timed region: a per-step .item() would make the
        # host wait for the GPU every step (as mmtrain's loop avoids too).
        return out.loss.detach(), batch["attention_mask"].sum(), batch["input_ids"].numel()

    for b in opts.plain_batches:
        steps = opts.plain_steps or max(1, math.ceil(timed_n / b))
        warm = SyntheticSamples(opts.warmup * b, image_tokens, opts.text_tokens, opts.label_fraction, image_size,
                                tokenizer.bos_token_id, opts.seed + 7919, with_pixels=False)
        timed = SyntheticSamples(steps * b, image_tokens, opts.text_tokens, opts.label_fraction, image_size,
                                 tokenizer.bos_token_id, opts.seed, with_pixels=False)
        # The same loader workers as mmtrain's run, so neither waits on data more than the other.
        n = loader_workers(opts.num_workers, device)
        workers = dict(num_workers=n, persistent_workers=n > 0)
        loader = torch.utils.data.DataLoader(timed, batch_size=b, collate_fn=collator, shuffle=False, **workers)
        warm_loader = torch.utils.data.DataLoader(warm, batch_size=b, collate_fn=collator, shuffle=False, **workers)
        try:
            result = timed_run(step, warm_loader, loader, [timed.length(i) for i in range(len(timed))], opts.epochs, shape, opts.peak_tflops)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            # Near the memory limit cuBLAS may fail to get its workspace and report
            # CUBLAS_STATUS_EXECUTION_FAILED / ALLOC_FAILED instead of an out-of-memory error.
            if not isinstance(err, torch.OutOfMemoryError) and "CUBLAS_STATUS" not in str(err):
                raise
            info["out_of_memory_at"].append(b)
            info.setdefault("out_of_memory_errors", []).append(f"{type(err).__name__}: {str(err)[:200]}")
            optimizer.zero_grad(set_to_none=True)
            free_memory()
            continue
        result["micro_batch"] = b
        info.update(result)
        info["_profile_step"] = (step, loader)
        return info
    info["error"] = f"out of memory at every micro-batch of {opts.plain_batches}"
    return info
