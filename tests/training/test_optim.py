"""The seed's four optimizer groups and the warmup/decay schedule."""

import pytest
import torch

from mmtrain.model import build_model
from mmtrain.training.optim import build_scheduler, param_group_names, param_groups, warmup_steps


def test_groups_follow_the_seed_table(tiny_args):
    model = build_model(tiny_args(lang_lora_dim=4, vis_proj="baseline", train_full_embeddings=True)).model
    groups = param_groups(model, weight_decay=0.1, learning_rate=1e-3, embed_learning_rate=1e-5)
    names = param_group_names(model, groups)
    settings = {g["name"]: (g["weight_decay"], g["lr"]) for g in groups}
    assert settings["decay"] == (0.1, 1e-3)
    assert settings["no_decay"] == (0.0, 1e-3)
    assert settings["embed_decay"] == (0.1, 1e-5)
    # group 1: projector weights and LoRA matrices
    assert "projector.proj.weight" in names["decay"]
    assert "language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names["decay"]
    # group 2: biases and every norm weight (LayerNorm here; RMSNorm counts too, see below)
    assert {"projector.proj.bias", "projector.norm.weight", "projector.norm.bias"} <= set(names["no_decay"])
    # group 3: embedding tables (names with "embed") get the small rate
    assert set(names["embed_decay"]) == {"language_model.model.embed_tokens.base.weight", "language_model.model.embed_tokens.new_rows"}
    # every trainable parameter is in exactly one group, no frozen one in any
    grouped = [n for ns in names.values() for n in ns]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)


def test_rmsnorm_weights_get_no_decay(tiny_args):
    model = build_model(tiny_args(train_full_embeddings=True)).model
    for p in model.language_model.model.norm.parameters():
        p.requires_grad_(True)
    names = param_group_names(model, param_groups(model, weight_decay=0.1, learning_rate=1.0, embed_learning_rate=1.0))
    assert "language_model.model.norm.weight" in names["no_decay"]


def test_embed_bias_would_go_to_group_four():
    layer = torch.nn.Module()
    layer.embed_proj = torch.nn.Linear(4, 4)
    names = param_group_names(layer, param_groups(layer, weight_decay=0.1, learning_rate=1.0, embed_learning_rate=0.1))
    assert names == {"embed_decay": ["embed_proj.weight"], "embed_no_decay": ["embed_proj.bias"]}


@pytest.mark.parametrize("value,total,expected", [(0, 100, 0), (0.1, 100, 10), (0.05, 30, 2), (1, 100, 100), (1.0, 7, 7), (2, 100, 2), (40, 100, 40)])
def test_warmup_is_a_ratio_up_to_one_and_a_count_above(value, total, expected):
    assert warmup_steps(value, total) == expected


def _lrs(kind, warmup, total):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, kind, warmup, total)
    values = []
    for _ in range(total):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


def test_cosine_schedule_at_warmup_boundaries():
    lrs = _lrs("cosine", 4, 20)
    assert lrs[0] == 0.0
    assert lrs[2] == pytest.approx(0.5)
    assert lrs[4] == pytest.approx(1.0)  # the peak is reached right after warmup
    assert lrs[12] == pytest.approx(0.5)  # half way through the decay
    assert lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_warmup_ratio_one_means_the_whole_run():
    lrs = _lrs("cosine", 1.0, 10)
    assert lrs == pytest.approx([i / 10 for i in range(10)])


def test_linear_and_constant_schedules():
    assert _lrs("linear", 2, 6) == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert _lrs("constant", 2, 6) == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0])


def test_place_buffers_moves_every_buffer_left_behind_in_place():
    """At ZeRO-3 the engine moves parameters, not buffers; the trainer moves those left behind."""
    from mmtrain.training.setup import place_buffers

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module.register_buffer("ids", torch.arange(3), persistent=False)
    before = dict(module.named_buffers())
    saved = set(module.state_dict())
    moved = place_buffers(module, torch.device("meta"))
    assert sorted(moved) == sorted(before)
    after = dict(module.named_buffers())
    assert after.keys() == before.keys() and all(b.device.type == "meta" for b in after.values())
    assert set(module.state_dict()) == saved  # "ids" stays out of the state dict
    assert place_buffers(module, torch.device("meta")) == []
    assert next(module.parameters()).device.type == "cpu"


def test_each_component_gets_its_own_rate_and_decay(tiny_args):
    """--projector_learning_rate and friends split their component off the seed's groups, decay rules kept."""
    from mmtrain.args import component_settings, parse_args

    model = build_model(tiny_args(lm_training="last_layers", lm_trainable_layers=1, vis_lora_dim=2, train_lm_head=True)).model
    _, _, train_args = parse_args([
        "--learning_rate", "1e-3", "--weight_decay", "0.1", "--learning_rate_pretraining_components", "1e-4",
        "--projector_learning_rate", "2e-3", "--vision_learning_rate", "3e-5", "--vision_weight_decay", "0.0",
        "--lm_learning_rate", "2e-5", "--embedding_weight_decay", "0.0",
    ])
    groups = param_groups(
        model, weight_decay=train_args.weight_decay, learning_rate=train_args.learning_rate,
        embed_learning_rate=train_args.learning_rate_pretraining_components, components=component_settings(train_args),
    )
    names = param_group_names(model, groups)
    settings = {g["name"]: (g["lr"], g["weight_decay"]) for g in groups}
    assert settings == {
        "projector_decay": (2e-3, 0.1), "projector_no_decay": (2e-3, 0.0),
        "vision_decay": (3e-5, 0.0),
        "lm_decay": (2e-5, 0.1), "lm_no_decay": (2e-5, 0.0),
        "embed_decay": (1e-4, 0.0),
    }
    assert "projector.linear_1.bias" in names["projector_no_decay"]
    assert all(".lora_" in n for n in names["vision_decay"])
    assert "language_model.lm_head.weight" in names["lm_decay"]
    assert "language_model.model.layers.3.input_layernorm.weight" in names["lm_no_decay"]
    assert names["embed_decay"] == ["language_model.model.embed_tokens.new_rows"]
    grouped = [n for ns in names.values() for n in ns]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_components_without_settings_stay_in_the_seed_groups(tiny_args):
    model = build_model(tiny_args(lang_lora_dim=4)).model
    groups = param_groups(model, weight_decay=0.1, learning_rate=1e-3, embed_learning_rate=1e-3, components={"lm_lora": {"lr": 5e-4}})
    names = param_group_names(model, groups)
    assert sorted(names) == ["decay", "embed_decay", "lm_lora_decay", "no_decay"]
    assert all(".lora_" in n for n in names["lm_lora_decay"]) and not any(".lora_" in n for n in names["decay"])
