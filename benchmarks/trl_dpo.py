"""TRL's side of the DPO bench: ``trl.DPOTrainer`` on transformers' own LLaVA, holding the weights mmtrain builds.

The model is ``LlavaForConditionalGeneration`` made from the same presets, in memory:
mmtrain builds its model (the presets' seeded random weights, LoRA off), and its vision
tower, projector, LM (the image tokens' rows folded into the table, as
``mmtrain.export`` folds them) and head are copied into a LLaVA of the same shape, as
``python -m mmtrain.export --format llava`` would write it, without the 7B round trip
through a folder. The processor is transformers' ``LlavaProcessor`` over mmtrain's
tokenizer and image processor: it expands ``<image>`` into the image's tokens, so each
half TRL builds holds the same ids as mmtrain's (checked on the first pairs).

TRL gets what a user gives it for LoRA DPO on a VLM: the model, a peft ``LoraConfig``
(the same rank, alpha and Linears of the LM's decoder layers; the projector and the
image tokens' rows trained too, as mmtrain trains them), ``ref_model=None`` (its
reference is the model with the adapters switched off), the pairs as ``prompt``,
``chosen``, ``rejected`` and ``images`` columns, gradient checkpointing, bf16, no
truncation and ``precompute_ref_log_probs=False``.
"""

from __future__ import annotations

import time

import torch

LM_LINEARS = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def llava_from_mmtrain(built, dtype: torch.dtype, device: torch.device):
    """transformers' LLaVA holding the weights of mmtrain's model ``built`` (built without LoRA), and its processor."""
    from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaProcessor

    vlm, tokenizer, image_tokens = built.model, built.tokenizer, built.image_tokens
    vision, lm = vlm.vision, vlm.language_model
    decoder = lm.get_decoder()
    state = decoder.state_dict()
    rows_key = next(k for k in state if k.endswith(".new_rows"))
    base_key = rows_key[: -len("new_rows")] + "base.weight"
    base, new_rows = state.pop(base_key), state.pop(rows_key)
    rows = max(base.shape[0], len(tokenizer))
    table = torch.zeros(rows, base.shape[1], dtype=base.dtype, device=base.device)
    table[: base.shape[0]] = base
    first = image_tokens.original_vocab_size
    table[first : first + new_rows.shape[0]] = new_rows.to(base.dtype)
    state[base_key.replace(".base.weight", ".weight")] = table
    head = lm.get_output_embeddings().weight.detach()
    grown = torch.zeros(rows, head.shape[1], dtype=head.dtype, device=head.device)
    grown[: head.shape[0]] = head  # the image tokens are never targets: their output rows are zero, as the export writes them

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = LlavaConfig(
        vision_config=vision.tower.config.to_dict(),
        text_config={**lm.config.to_dict(), **special, "vocab_size": rows},
        image_token_index=image_tokens.image_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,  # mmtrain's tower already ends at the layer it reads
        vision_feature_select_strategy="default" if vision.drop_cls else "full",
        image_seq_length=image_tokens.per_image,
        multimodal_projector_bias=True,
    )
    config.vision_config.model_type = vision.tower.config.model_type
    with torch.device(device):
        llava = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    llava.model.vision_tower.load_state_dict(vision.tower.state_dict(), strict=True)
    llava.model.multi_modal_projector.load_state_dict(vlm.projector.state_dict(), strict=True)
    llava.model.language_model.load_state_dict(state, strict=True)
    llava.lm_head.weight.data.copy_(grown)
    processor = LlavaProcessor(
        image_processor=built.image_processor,
        tokenizer=tokenizer,
        patch_size=vision.tower.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_token=tokenizer.convert_ids_to_tokens(image_tokens.image_id),
        num_additional_image_tokens=vision.prefix_tokens,
    )
    return llava, processor


def check_same_tokens(processor, pairs, n: int = 2) -> dict:
    """TRL's collated rows of the first ``n`` pairs against mmtrain's: the same ids, prompt mask and pixels, or an error."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    columns = pairs.trl_columns_of(range(n))
    examples = [{k: columns[k][i] for k in columns} for i in range(n)]
    batch = DataCollatorForVisionPreference(processor)(examples)
    for i in range(n):
        chosen, rejected, answer_start = pairs.halves(i)
        for row, ids in ((i, chosen), (n + i, rejected)):
            got = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            if got != ids:
                raise RuntimeError(f"pair {i}: TRL's half {row} has other ids than mmtrain's ({len(got)} vs {len(ids)} tokens)")
            answer = batch["completion_mask"][row][batch["attention_mask"][row].bool()].tolist()
            if answer != [0] * answer_start + [1] * (len(ids) - answer_start):
                raise RuntimeError(f"pair {i}: TRL's completion mask of half {row} is not mmtrain's answer span")
        pixels = pairs[i]["pixel_values"][0]
        if not torch.equal(batch["pixel_values"][i].to(pixels.dtype), pixels):
            raise RuntimeError(f"pair {i}: TRL's pixels differ from mmtrain's")
    return {"pairs_checked": n, "same_ids_labels_and_pixels": True}


def run_trl(opts, model_args, batch: int, tmp: str) -> dict:
    """``opts.warmup`` + ``opts.steps`` steps of ``DPOTrainer`` at ``batch`` pairs on the model ``model_args`` describes (without LoRA)."""
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_pairs import pairs_for
    from mmtrain.model.builder import build_model

    dtype = torch.bfloat16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(opts.seed)
    with device:
        built = build_model(model_args.model_config(), dtype=dtype, trainable_dtype=dtype, preset_device=device)
    pairs = pairs_for(opts, built, (opts.warmup + opts.steps) * batch)
    llava, processor = llava_from_mmtrain(built, dtype, device)
    new_ids = list(range(built.image_tokens.original_vocab_size, built.image_tokens.original_vocab_size + built.model.language_model.get_input_embeddings().num_new))
    built.model = None  # mmtrain's copy is no longer needed
    if device.type == "cuda":
        torch.cuda.empty_cache()
    same = check_same_tokens(processor, pairs)

    lora = LoraConfig(
        r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=0.0, bias="none", target_modules=LM_LINEARS,
        modules_to_save=["multi_modal_projector"], trainable_token_indices={"embed_tokens": new_ids},
    )
    total = opts.warmup + opts.steps
    dataset = datasets.Dataset.from_dict(pairs.trl_columns_of(range(total * batch)))
    config = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=batch, max_steps=total, learning_rate=5e-6, lr_scheduler_type="constant",
        beta=opts.beta, loss_type=["sigmoid"], bf16=True, gradient_checkpointing=True, max_length=None,
        precompute_ref_log_probs=False, logging_steps=10**6, save_strategy="no", report_to=[], seed=opts.seed,
        dataloader_num_workers=opts.num_workers, use_cpu=device.type != "cuda", disable_tqdm=True,
    )

    class Clock(TrainerCallback):
        """The time after the warm-up's last step and after the last one (the device synchronised at both)."""

        marks: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (opts.warmup, total):
                _sync(device)
                self.marks[state.global_step] = time.perf_counter()

    clock = Clock()
    trainer = DPOTrainer(model=llava, args=config, train_dataset=dataset, processing_class=processor, peft_config=lora, callbacks=[clock])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    output = trainer.train()
    seconds = clock.marks[total] - clock.marks[opts.warmup] if opts.warmup else clock.marks[total] - start
    pairs_timed = opts.steps * batch
    tokens = pairs_timed * 2 * pairs.tokens_per_half
    result = {
        "batch": batch,
        "steps": opts.steps,
        "warmup_steps": opts.warmup,
        "seconds": seconds,
        "pairs": pairs_timed,
        "pairs_per_s": pairs_timed / seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_s_mean": seconds / opts.steps,
        "train_loss": output.training_loss,
        "trainable_params": trainable,
        "same_pairs_as_mmtrain": same,
        "model": "LlavaForConditionalGeneration (sdpa) + peft LoRA, ref = adapters off",
        "lora": {"r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": LM_LINEARS,
                 "modules_to_save": list(lora.modules_to_save), "trainable_token_indices": new_ids},
        "dpo_config": {k: getattr(config, k) for k in ("beta", "loss_type", "bf16", "gradient_checkpointing", "gradient_checkpointing_kwargs",
                                                       "max_length", "precompute_ref_log_probs", "dataloader_num_workers", "optim")},
    }
    if device.type == "cuda":
        result.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(), peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_bytes=torch.cuda.max_memory_reserved())
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
