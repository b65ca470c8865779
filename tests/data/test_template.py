"""Rendering, tokenisation and labels."""

import pytest

from mmtrain.data import IGNORE_INDEX, encode_conversation

TURNS = [
    {"role": "user", "text": "<image>\n<image>\nWhich has more red?"},
    {"role": "assistant", "text": "first"},
    {"role": "user", "text": "And this one <image> is what shape?"},
    {"role": "assistant", "text": " a blue circle "},
]


def trained_text(tokenizer, encoded):
    return tokenizer.decode([i for i, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX])


def test_labels_exact_on_multi_turn_multi_image(tokenizer, image_tokens):
    encoded = encode_conversation(TURNS, tokenizer, image_tokens, system_prompt="You look at images.")
    assert trained_text(tokenizer, encoded) == "first</s>a blue circle</s>"
    # Labels equal ids where trained, so the loss sees the real answer tokens.
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(encoded.input_ids, encoded.labels))
    assert encoded.num_images == 3


def test_image_spans_inserted_whole_and_never_trained(tokenizer, image_tokens):
    encoded = encode_conversation(TURNS, tokenizer, image_tokens)
    ids, labels = encoded.input_ids, encoded.labels
    span = image_tokens.span()
    starts = [i for i, t in enumerate(ids) if t == image_tokens.start_id]
    assert len(starts) == 3
    for s in starts:
        assert ids[s : s + len(span)] == span
        assert labels[s : s + len(span)] == [IGNORE_INDEX] * len(span)
    assert ids.count(image_tokens.image_id) == 3 * image_tokens.per_image
    for special in (image_tokens.start_id, image_tokens.image_id, image_tokens.end_id):
        assert special not in labels


def test_plain_rendering_reads_as_the_template(tokenizer, image_tokens):
    encoded = encode_conversation(TURNS, tokenizer, image_tokens, system_prompt="Sys.")
    text = tokenizer.decode([t for t in encoded.input_ids if t != image_tokens.image_id])
    assert text == (
        "<s>Sys.\n\n### Image 1:\n<im_start><im_end>\n\n### Image 2:\n<im_start><im_end>\n\n"
        "### Question:\nWhich has more red?\n\n### Answer:\nfirst</s>"
        "### Question:\nAnd this one \n### Image 3:\n<im_start><im_end>\n is what shape?\n\n### Answer:\na blue circle</s>"
    )
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.turn_ends[-1] == len(encoded.input_ids)


def test_user_text_cannot_inject_special_tokens(tokenizer, image_tokens):
    turns = [{"role": "user", "text": "say </s> <im_start>"}, {"role": "assistant", "text": "ok"}]
    encoded = encode_conversation(turns, tokenizer, image_tokens)
    assert encoded.input_ids.count(tokenizer.eos_token_id) == 1
    assert image_tokens.start_id not in encoded.input_ids


def test_generation_prompt_is_the_training_prefix(tokenizer, image_tokens):
    full = encode_conversation(TURNS, tokenizer, image_tokens)
    prompt = encode_conversation(TURNS[:3], tokenizer, image_tokens, add_generation_prompt=True)
    assert full.input_ids[: len(prompt.input_ids)] == prompt.input_ids
    assert tokenizer.decode(prompt.input_ids).endswith("### Answer:\n")
    assert full.labels[len(prompt.input_ids)] != IGNORE_INDEX  # the answer starts right after
    with pytest.raises(ValueError, match="ends with a user question"):
        encode_conversation(TURNS, tokenizer, image_tokens, add_generation_prompt=True)


CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def test_chat_template_labels_and_images(tokenizer, image_tokens):
    tokenizer.chat_template = None  # a tokenizer without one (the presets' has one)
    with pytest.raises(ValueError, match="--template"):
        encode_conversation(TURNS, tokenizer, image_tokens, template="chat")
    tokenizer.chat_template = CHAT
    encoded = encode_conversation(TURNS, tokenizer, image_tokens, template="chat", system_prompt="Sys.")
    assert trained_text(tokenizer, encoded) == "first</s> a blue circle </s>"
    assert encoded.input_ids.count(image_tokens.image_id) == 3 * image_tokens.per_image
    assert encoded.input_ids[0] == tokenizer.bos_token_id and encoded.input_ids[1] != tokenizer.bos_token_id
    prompt = encode_conversation(TURNS[:3], tokenizer, image_tokens, template="chat", add_generation_prompt=True)
    assert tokenizer.decode(prompt.input_ids).endswith("<s>assistant\n")
