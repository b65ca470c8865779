"""Per-GPU memory of a training step: ``python -m mmtrain.memory [model flags] [--json]``.

Predicts the peak *allocated* GPU memory (what ``torch.cuda.max_memory_allocated``
reports) of one rank for a ZeRO stage (0-3), an offload setting, a GPU count, a
micro-batch, a sequence length, a precision and gradient checkpointing, and what
offload moves to host memory. The CUDA context (~0.5 GiB) and the caching
allocator's reserve and fragmentation are *not* in that figure; :func:`recommend`
adds a margin for them when it decides what fits.

Counts come from the model the trainer builds (``build_model(meta=True)`` and
``count_parameters``), shapes from its configs. Notation: Ψ_t trainable parameters
(projector, LoRA, new-token rows, and the LM's own weights with ``--lm_training full``
or ``last_layers``), Ψ_f frozen parameters inside the DeepSpeed engine
(the LM, and the vision encoder when it has LoRA), Ψ_v the frozen vision encoder kept
outside the engine (no vision LoRA), N GPUs, w bytes per value of the compute dtype
(2 for bf16/fp16, 4 for fp32), b micro-batch, s sequence length, h/i/L/V the LM's
width, MLP width, layers and vocabulary, a its heads, h_kv = kv heads x head dim.

Model states (Rajbhandari et al. 2020, "ZeRO", sec. 3 and 5: 2Ψ + 2Ψ + KΨ with K=12
for mixed-precision Adam, divided by N for what each stage partitions). Here only
trainable parameters have gradients and optimizer states:

========================  ==================  ==================  ==================
per GPU                   stage 0             stage 1             stage 2 / stage 3
========================  ==================  ==================  ==================
frozen weights            wΨ_v + wΨ_f         wΨ_v + wΨ_f         st.2: wΨ_v + wΨ_f;
                                                                  st.3: wΨ_v + wΨ_f/N
trainable weights         wΨ_t                wΨ_t                st.3: wΨ_t/N
gradients (compute dtype) wΨ_t                wΨ_t                wΨ_t/N
optimizer (fp32 master,   12Ψ_t               12Ψ_t/N             12Ψ_t/N
Adam m and v)
========================  ==================  ==================  ==================

* DeepSpeed keeps gradients in the compute dtype (``grad_accum_dtype`` unset) and an
  fp32 master copy in the optimizer; at the optimizer step the gradient partition is
  cast to fp32 (4Ψ_t, or 4Ψ_t/N with ZeRO): a transient of the step, not of backward.
  In fp32 the master copy is the weight, so the optimizer holds 8 bytes per parameter.
* ``--fp8_base`` / ``--fp8_vision`` (stages 0-2; training refuses them at stage 3): the
  frozen Linears they convert (Ψ_8 of the frozen weights above, counted from the meta
  build by ``mmtrain.model.fp8.convertible_linears``) take 1 byte each instead of w, plus
  4 bytes per output channel for their scales; the main process keeps the originals in
  host memory (wΨ_8, under "host: weights"). The transient float8 copies of one layer's
  activation and transposed weight are not counted.
* ``--quantize_base nf4`` / ``--quantize_vision nf4`` (stages 0-2; refused at stage 3): the
  frozen Linears they quantise (Ψ_4, counted by ``mmtrain.model.nf4.quantizable_linears``)
  take 4.127 bits each (4-bit codes, an 8-bit absmax per 64 weights and a float32 scale
  per 256 absmaxes: the QLoRA paper's double quantisation) instead of w bytes; no
  originals are kept. Each product dequantises one weight to w bytes and frees it: the
  largest such Linear (w·m_4) is added. The options table (:mod:`mmtrain.memory.options`)
  compares bfloat16, float8 and NF4 bases with checkpointing, offload and token budgets.
* The frozen vision encoder without LoRA is never given to DeepSpeed (see
  ``mmtrain.training.engine_view``): it is replicated whole on every GPU at every stage, in the
  compute dtype, and runs under ``no_grad``.
* Stage 3 leaves parameters below ``stage3_param_persistence_threshold`` elements whole
  on every rank (norm weights, biases); everything else (Ψ_p elements) is partitioned.
  Gathered parameters stay resident up to the live-parameter limit M
  (``stage3_max_live_parameters``, DeepSpeed's default 1e9; the trainer does not set it),
  not just one module: w·min(Ψ_p, max(m, M + p)) bytes, with m the largest module and p
  the largest partitioned parameter (the LM head for ref-7b: M + p = 1.13e9 elements,
  2.1 GiB in bf16). Source: DeepSpeed 0.19.8,
  ``runtime/zero/partitioned_param_coordinator.py``. ``fetch_sub_module`` gathers the
  running module unconditionally, then prefetches the next parameters of the recorded
  trace, whole parameters at a time, while the running total is below
  ``min(M - available, stage3_prefetch_bucket_size)``; ``available`` counts every
  gathered parameter (in flight, in use, or kept by ``stage3_max_reuse_distance``) and
  drops only on release. The prefetch bucket is thus a per-call cap, not a separate
  allowance: each hooked module (containers and parameter-less ones included) prefetches
  again, so within the first decoder layer the gathered set reaches M and overshoots it by
  at most the last parameter added. That happens while activations peak: the LM head,
  the largest parameter, is prefetched at the end of forward and kept for backward.
  With ``stage3_prefetch_bucket_size`` 0 only the running module is gathered (m).
* Optimizer offload (ZeRO-Offload, Ren et al. 2021) moves the fp32 master weights, Adam
  moments and fp32 gradients of each rank's partition to host memory (16Ψ_t/N bytes);
  the GPU keeps only the reduce buckets. Parameter offload (ZeRO-Infinity, stage 3)
  moves each rank's parameter partitions to host memory as well; the GPU then holds the
  persistent small parameters and the gathered working set.
* Communication buffers: ZeRO 1-3 reduce gradients through a contiguous bucket of
  ``reduce_bucket_size`` elements (DeepSpeed's default 5e8, in the gradient dtype);
  stage 0 flattens all gradients for its all-reduce when N > 1 (wΨ_t).

A checkpoint (``checkpoint: host``, ``checkpoint: disk``; host memory, not part of the
GPU peak). The portable trainable state (:mod:`mmtrain.training.portable_state`) is
written by the main rank one fp32 tensor at a time: 4·(largest trainable tensor) bytes
(the embedding table or LM head with ``--lm_training full``), nothing on the other ranks.
Accelerate's ``save_state`` writes each rank's engine files through ``torch.save``,
which copies one device storage to the host at a time; the largest is one parameter
group's flat fp32 partition, at most 4Ψ_t/N (none with optimizer offload: those are on
the host already). The two happen one after the other, so a rank's peak is the larger.
On disk: the portable state 12Ψ_t, the trainable weights wΨ_t and the optimizer's
partitions 12Ψ_t (8Ψ_t in fp32), all ranks together.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", sec. 4.1: s·b·h·(34 + 5·a·s/h) bytes per GPT layer in 16-bit with
dropout). That count does not fit the kernels used here, so each saved tensor of a
Hugging Face LLaMA/Qwen2 decoder layer is counted instead:

* SDPA (flash / memory-efficient kernels) keeps q, k, v, the output and a fp32
  log-sum-exp, never the a·s² score matrix: 2h + 4h_kv + 2h bytes per token + 4a;
  the o_proj input is a view of that output. No dropout anywhere (no masks).
* RMSNorm upcasts its input to fp32 and keeps it: 4h per norm, two norms per layer.
* SwiGLU MLP: gate (kept by SiLU), SiLU output and up (kept by the product): 6i.
* A frozen Linear needs only its weight for the input gradient, so its input is kept
  only when it carries LoRA (LoRA A's weight gradient needs it): +2h for the norm
  output feeding q/k/v, +2h for the one feeding gate/up, +2i for down_proj's input.
  Each LoRA keeps its rank-r intermediate: +2r per adapted Linear. With LoRA dropout > 0
  each adapter also keeps its dropped-out input and a bool mask: +3·(input width) per
  adapted Linear (18h + 3i per layer with every Linear adapted, ~26·s·b·h for 7B).
* Total per layer: s·b·(16h + 4h_kv + 8i + 4a) with LoRA on every Linear, plus 2r per
  adapted Linear; 41.5·s·b·h bytes for LLaMA-2-7B shapes (h_kv = h, i = 2.69h). A
  one-off check on an H100 (torch 2.11, SDPA, peft LoRA r=16, bf16) kept 41.6·s·b·h per
  layer at b=4, 40.1 at b=1. Without LoRA: s·b·(12h + 4h_kv + 6i) = 32.1·s·b·h (measured
  32.2).
* Compiled decoder layers (``--torch_compile``, on by default on a GPU): the compiler's
  partitioner keeps the cheaper tensors and recomputes pointwise work in backward. Each
  RMSNorm input is kept in the compute dtype (its fp32 upcast is redone): 2h instead of
  4h per norm; the SiLU output is recomputed from the kept gate: 4i instead of 6i. That
  is 9.4·s·b·h less per layer for 7B shapes (41.6 -> 32.2, a factor 0.77). Measured on
  an H200 (torch 2.11, ref-7b, ZeRO-2, 2048 tokens, micro-batch 6): 63.5 GiB peak
  against 78.8 predicted for eager layers (0.81 of it) and 64.7 for compiled ones.
* A decoder layer whose own weights train (``--lm_training full``, or one of the last
  ``--lm_trainable_layers``) keeps the input of every Linear for its weight gradient,
  as a layer with LoRA on every Linear does, without LoRA's rank-r intermediates:
  s·b·(16h + 4h_kv + 8i + 4a) bytes, 41.5·s·b·h for LLaMA-2-7B shapes. Full fine-tuning
  is where ZeRO-3 and offload matter: Ψ_t is then the whole LM, and 16 bytes of
  gradients and optimizer state per parameter (2 + 12 + the 2-byte weight) dominate.
* Full activation checkpointing of every decoder layer (Korthikanti's "full
  recomputation"): 2·s·b·h per layer (its input) plus one layer's saved set while that
  layer is recomputed in backward.
* Always, one layer's backward working set s·b·(2i + 4h)·w/2, the final norm's fp32
  input and the embedding output s·b·(4h + 2h), and the boolean attention mask b·s².
* Logits: the loss runs the LM head at label positions only (``causal_lm_loss``), so no
  [b, s, V] fp32 tensor exists. With n = label_fraction x text tokens x b label
  positions, the head output (w), its fp32 upcast (4) and the log-softmax output kept
  for backward (4) cost n·V·(w + 4 + 4) at the end of forward.
* Projector (trainable, per image of P patches, Q perceiver queries, vision width d_v):
  mlp P·(d_v + 2h)·w; baseline P·(d_v + h)·w; vit P·(14d_v + 2h)·w; perceiver
  (P·(d_v + 6h) + Q·6h)·w. These follow the same "saved inputs" rule, approximately.
* Frozen vision encoder under no_grad: transient only. With ``output_hidden_states``
  every layer's output lives until the tower returns: (L_v + 1)·T·d_v·w per image (T
  tokens, CLS included), plus one layer's working set T·(5d_v + 2i_v)·w. With vision
  LoRA its layers store T·(14d_v + 4i_v + 12r)·w/2 each (2T·d_v·w with checkpointing).
  Two fused towers (``--vision_model_name_or_path_2``) run one after the other: the
  transient is the larger of the first's and the second's plus the first's returned
  features; with LoRA their stored activations add up. d_v of the projector is the sum
  of the two widths.

* Sequence parallelism (``--sequence_parallel_size`` k): each GPU of a group keeps the
  LM activations of s·b/k positions (DeepSpeed's Ulysses attention holds all s positions
  for a/k heads inside attention: the same bytes), the logits of its share of the labels,
  and no mask; the vision tower and the projector run on all of the row's images on every
  GPU of the group, so their terms are not divided. Model states are those of N GPUs:
  ZeRO partitions over all of them.
* DPO pairs (``--objective dpo``): two rows per pair, or with ``--dpo_share_prompt`` (the
  default) one row of s + a tokens per pair, the prompt once and both answers (a: the
  answer's tokens, ``--label_fraction`` of a row's text tokens); the labels of both answers
  either way.
* DPO's reference (``--objective dpo``): a starting copy of every trained tensor but
  fresh LoRA, w·Ψ_copied (w·Ψ_copied/N at ZeRO-3, each rank's share; on the host with
  parameter offload), counted with the frozen weights. With ``--precompute_ref`` the
  copies live only while the reference's log-probabilities are computed, before the
  first step: a transient of copies + one no-grad forward's working set and logits
  (gradients still counted, conservatively).

Peak = model states + buffers + max(activations + logits, vision transient, optimizer
step transient, reference transient): the vision tower runs before the LM's activations
pile up, the step runs after they are freed, and the reference's table before any step.

DeepSpeed's estimators (``estimate_zero2_model_states_mem_needs_all_live`` and
``estimate_zero3_model_states_mem_needs_all_live``, which print
``estimate_zero{2,3}_model_states_mem_needs``) are reported beside ours by
:func:`deepspeed_estimate`. They treat every parameter of the model handed to the
engine as trainable (2Ψ + 18Ψ/N at ZeRO-2: 16-bit weights, 16-bit and fp32 gradients,
fp32 master and moments), add 4x the largest layer at ZeRO-3, and count no activations
and nothing outside the engine (our replicated vision encoder). For a frozen-heavy
model they overstate model states by an order of magnitude and still miss the
activations, which dominate at long sequences.

The package: :mod:`~mmtrain.memory.facts` (the setup and the model's counts and
shapes), :mod:`~mmtrain.memory.predict` (the terms above, the estimate and the
recommendation), :mod:`~mmtrain.memory.cli` (the command line). Measurements of real
steps against these predictions are a benchmark: ``benchmarks/memory_validation.py``.
"""

from mmtrain.memory.cli import format_table, main, parse_bytes
from mmtrain.memory.facts import GiB, OFFLOADS, PRECISIONS, MemorySetup, ModelFacts, largest_micro_batch, model_facts, ref_model_args
from mmtrain.memory.predict import (
    SPEED_ORDER,
    MemoryEstimate,
    checkpoint_cost,
    Recommendation,
    all_setups,
    deepspeed_estimate,
    estimate,
    fit_warning,
    lm_layer_activation_bytes,
    recommend,
    stage3_gathered_parameters,
)

__all__ = [
    "GiB", "OFFLOADS", "PRECISIONS", "SPEED_ORDER", "MemoryEstimate", "MemorySetup", "ModelFacts", "Recommendation",
    "all_setups", "checkpoint_cost", "deepspeed_estimate", "estimate", "fit_warning", "format_table", "largest_micro_batch", "lm_layer_activation_bytes", "main",
    "model_facts",
    "parse_bytes", "recommend", "ref_model_args", "stage3_gathered_parameters",
]
