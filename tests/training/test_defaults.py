"""The flags' defaults are a real run's (LLaVA-1.5-like); the embedded default reads its own recipe."""

import pytest
import yaml

from mmtrain.args import EMBEDDED_DEFAULT, ConfigError, embedded_default, parse_args, training_parser
from mmtrain.model import build_model
from mmtrain.model.lora import lora_scalings

from .conftest import REPO


def _real_run(*extra):
    # A model flag makes it a run of one's own: the flags' defaults apply, not the demo's recipe.
    return parse_args(["--lm_model_name_or_path", "tiny-llama", "--vision_model_name_or_path", "tiny-clip", *extra])


def test_flag_defaults_are_llava_like():
    model_args, data_args, train_args = _real_run()
    assert train_args.learning_rate == 2e-4
    assert train_args.num_train_epochs == 1
    assert (train_args.adam_beta1, train_args.adam_beta2, train_args.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert train_args.weight_decay == 0.0 and train_args.num_warmup_steps == 0.03 and train_args.lr_scheduler_type == "cosine"
    assert train_args.eval_generate == 0
    assert model_args.lang_lora_alpha is None  # resolved by the builder: 2 x the rank


def test_default_lora_scale_is_two(tiny_args):
    built = build_model(tiny_args(lang_lora_dim=4))
    scales = set(lora_scalings(built.model.language_model).values())
    assert scales == {2.0}


def test_the_embedded_default_reads_its_recipe():
    """No flags: the demo's settings, from recipes/tiny/default.yaml, as they were before the flags' defaults changed."""
    assert EMBEDDED_DEFAULT == str(REPO / "recipes" / "tiny" / "default.yaml")
    model_args, data_args, train_args = embedded_default()
    recipe = yaml.safe_load(open(EMBEDDED_DEFAULT))
    assert (train_args.learning_rate, train_args.num_train_epochs, train_args.eval_generate) == (2e-3, 12, 256) == (
        recipe["learning_rate"], recipe["num_train_epochs"], recipe["eval_generate"]
    )
    assert (train_args.adam_beta1, train_args.adam_beta2, train_args.num_warmup_steps) == (0.9, 0.95, 0.05)
    assert (model_args.lm_model_name_or_path, model_args.vision_model_name_or_path, model_args.lang_lora_dim) == ("tiny-llama", "tiny-clip", 16)
    assert model_args.lang_lora_alpha == 64  # scale 4
    assert data_args.dataset_names == ["synthetic"] and data_args.synthetic_num_samples == 3000
    assert train_args.output_dir == "outputs/default" and train_args.per_device_train_batch_size == 16


def test_flags_without_a_model_or_data_still_train_the_embedded_default():
    """Flags that only adjust the demo (a shorter run, float8, another seed) keep its recipe; a flag given wins."""
    _, _, train_args = parse_args(["--max_steps", "5", "--learning_rate", "1e-3"])
    assert (train_args.max_steps, train_args.learning_rate, train_args.num_train_epochs) == (5, 1e-3, 12)
    # a token budget with the demo: the recipe sets no sample count, so the two flags do not collide
    _, data_args, _ = parse_args(["--max_tokens_per_batch", "1024"])
    assert data_args.max_tokens_per_batch == 1024
    for own in (["--dataset_names", "synthetic"], ["--config", str(REPO / "recipes/tiny/stage1_pretrain.yaml")]):
        _, _, train_args = parse_args(own)
        assert train_args.num_train_epochs == 1 and train_args.learning_rate != 2e-3, own


def test_adam_flags_are_checked():
    with pytest.raises(ConfigError, match="--adam_beta2 must be in \\[0, 1\\), got 1.0"):
        _real_run("--adam_beta2", "1.0")
    with pytest.raises(ConfigError, match="--adam_epsilon must be > 0"):
        _real_run("--adam_epsilon", "0")


def test_the_optimizer_gets_the_betas_and_epsilon(tiny_args):
    from accelerate import Accelerator

    from mmtrain.training.setup import make_optimizer_and_schedule

    _, _, train_args = _real_run("--adam_beta1", "0.8", "--adam_beta2", "0.99", "--adam_epsilon", "1e-6")
    model = build_model(tiny_args(lang_lora_dim=4)).model
    optimizer, _, _ = make_optimizer_and_schedule(Accelerator(cpu=True), model, train_args, [10])
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    assert all(g["initial_lr"] == 2e-4 for g in optimizer.param_groups)


def test_learning_rate_help_says_what_it_sets():
    text = " ".join(training_parser().format_help().split())
    start = text.index("--learning_rate LEARNING_RATE, ")  # its entry, not the usage line
    help_text = text[start : start + 600]
    for part in ("projector", "LoRA", "--lm_training full", "new token rows", "--learning_rate_pretraining_components"):
        assert part in help_text, part


def test_llava_recipes_state_every_published_setting():
    """Written in each file, not inherited from a default that may change."""
    for name in ("stage1_pretrain", "stage2_finetune", "stage2_finetune_lora"):
        values = yaml.safe_load(open(REPO / "recipes" / "llava-1.5-7b" / f"{name}.yaml"))
        for key, value in {
            "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "weight_decay": 0.0, "num_train_epochs": 1,
            "num_warmup_steps": 0.03, "lr_scheduler_type": "cosine", "max_grad_norm": 1.0, "max_seq_len": 2048,
        }.items():
            assert values.get(key) == value, (name, key)
    lora = yaml.safe_load(open(REPO / "recipes" / "llava-1.5-7b" / "stage2_finetune_lora.yaml"))
    assert (lora["lang_lora_dim"], lora["lang_lora_alpha"], lora["learning_rate"]) == (128, 256, 2e-4)
