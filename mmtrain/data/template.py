"""Render a conversation with a prompt template, tokenise it, and mark what trains.

The ``plain`` template (DeepSpeed-VisualChat's)::

    <bos>{system}\\n\\n### Image 1:\\n<image span>\\n\\n### Question:\\n{q1}\\n\\n### Answer:\\n{a1}<eos>### Question:\\n{q2}...

Image k is numbered across the whole sample and sits where its placeholder was
(placeholders before any question text go before ``### Question:``). The ``chat``
template uses the tokenizer's own ``apply_chat_template``.

Text between placeholders is tokenised piece by piece and each placeholder becomes
``ImageTokens.span()`` ids inserted directly, so the tokenizer never sees an image
span as text and the number of image tokens is exact. Only answers and their
end-of-turn token carry labels; everything else is -100.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mmtrain.batch import IGNORE_INDEX
from mmtrain.image_tokens import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, ImageTokens

TEMPLATES = ("plain", "chat")
_MARKS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


def split_visuals(text: str) -> tuple[list[str], list[str]]:
    """``text`` cut at its ``<image>`` and ``<video>`` placeholders: (the n + 1 pieces, the n placeholders in order)."""
    parts = _MARKS.split(text)
    return parts[0::2], parts[1::2]


@dataclass
class EncodedConversation:
    """Token ids and labels of one conversation."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    num_videos: int = 0
    # Sequence length right after each answer: where the sample may be cut when whole
    # turns are dropped from the end (so a cut never falls inside an image span).
    turn_ends: list[int] = field(default_factory=list)
    # Tokens before the first question (bos, system prompt): paid once per sample,
    # which is what concatenation saves when it joins samples.
    prefix_length: int = 0


class _Builder:
    """Accumulates segments: untrained text is tokenised with placeholders turned into spans."""

    def __init__(self, tokenizer, image_tokens: ImageTokens, literal_text: bool, image_sizes=None, video_frames=None):
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_sizes = list(image_sizes) if image_sizes is not None else None
        self.video_frames = list(video_frames) if video_frames is not None else []
        # User text is never allowed to smuggle in special tokens (an '</s>' typed in a
        # question must not end the turn); chat templates emit special tokens as text, so
        # their output must be parsed with them.
        self.split_special = literal_text
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.num_images = 0
        self.num_videos = 0

    def tokens(self, ids: list[int], trained: bool) -> None:
        self.ids += ids
        self.labels += ids if trained else [IGNORE_INDEX] * len(ids)

    def text(self, text: str, trained: bool = False) -> None:
        if text:
            ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=self.split_special)["input_ids"]
            self.tokens(ids, trained)

    def image(self) -> None:
        size = None
        if self.image_tokens.sized is not None:
            if self.image_sizes is None or self.num_images >= len(self.image_sizes):
                have = 0 if self.image_sizes is None else len(self.image_sizes)
                raise ValueError(f"the conversation has more <image> placeholders than the {have} image sizes given (AnyRes tiles need each image's size)")
            size = self.image_sizes[self.num_images]
        self.num_images += 1
        self.tokens(self.image_tokens.span(self.image_tokens.count(size)), trained=False)

    def video(self) -> None:
        if self.num_videos >= len(self.video_frames):
            raise ValueError(f"the conversation has more <video> placeholders than the {len(self.video_frames)} frame counts given")
        frames = self.video_frames[self.num_videos]
        self.num_videos += 1
        self.tokens(self.image_tokens.video_span(frames), trained=False)

    def visual(self, mark: str) -> None:
        self.image() if mark == IMAGE_PLACEHOLDER else self.video()

    def header(self, mark: str) -> str:
        """The plain template's heading of the next image or video: ``### Image k:`` or ``### Video k:``."""
        if mark == IMAGE_PLACEHOLDER:
            return f"### Image {self.num_images + 1}:\n"
        return f"### Video {self.num_videos + 1}:\n"

    def text_with_images(self, text: str) -> None:
        pieces, marks = split_visuals(text)
        for k, piece in enumerate(pieces):
            if k:
                self.visual(marks[k - 1])
            self.text(piece)


def _system_text(turns: list[dict], system_prompt: str) -> tuple[str, list[dict]]:
    """A record's own system turn wins over ``--system_prompt``."""
    if turns and turns[0]["role"] == "system":
        return turns[0]["text"], turns[1:]
    return system_prompt, turns


def _encode_plain(builder: _Builder, turns: list[dict], system_prompt: str, add_generation_prompt: bool) -> EncodedConversation:
    tok = builder.tokenizer
    if tok.bos_token_id is not None:
        builder.tokens([tok.bos_token_id], trained=False)
    system, turns = _system_text(turns, system_prompt)
    if system.strip():
        builder.text(system.strip() + "\n\n")
    prefix_length = len(builder.ids)
    turn_ends = []
    for turn in turns:
        if turn["role"] == "user":
            pieces, marks = split_visuals(turn["text"])
            # Placeholders with only whitespace before them are the turn's leading images (and videos).
            lead = 0
            while lead < len(pieces) - 1 and not pieces[lead].strip():
                lead += 1
            for mark in marks[:lead]:
                builder.text(builder.header(mark))
                builder.visual(mark)
                builder.text("\n\n")
            rest = pieces[lead:]
            builder.text("### Question:\n" + rest[0].lstrip() if len(rest) > 1 else "### Question:\n" + rest[0].strip())
            for k, (mark, piece) in enumerate(zip(marks[lead:], rest[1:]), start=1):
                builder.text("\n" + builder.header(mark))
                builder.visual(mark)
                builder.text("\n" + (piece.rstrip() if k == len(rest) - 1 else piece))
            builder.text("\n\n### Answer:\n")
        else:
            # The answer is its own piece so the prompt tokenises identically at generation time.
            builder.text(turn["text"].strip(), trained=True)
            builder.tokens([tok.eos_token_id], trained=True)
            turn_ends.append(len(builder.ids))
    return EncodedConversation(builder.ids, builder.labels, builder.num_images, builder.num_videos, turn_ends, prefix_length)


def _encode_chat(builder: _Builder, turns: list[dict], system_prompt: str, add_generation_prompt: bool) -> EncodedConversation:
    tok = builder.tokenizer
    system, turns = _system_text(turns, system_prompt)
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": t["role"], "content": t["text"]} for t in turns
    ]
    if chat_template_takes_parts(tok):
        messages = [{"role": m["role"], "content": content_parts(m["content"])} for m in messages]

    def render(msgs, generation_prompt):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    first = 1 if system.strip() else 0
    done = ""  # text already turned into tokens
    turn_ends = []
    prefix_length = None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix; use --template plain")
        if prefix_length is None:
            system_only = render(messages[:first], False) if first else ""
            prefix_length = len(tok(system_only, add_special_tokens=False)["input_ids"]) if system_only else 0
        builder.text_with_images(prompt[len(done) :])
        answer = full[len(prompt) :]
        trailing = answer[len(answer.rstrip()) :]  # newline after the end-of-turn token: not trained
        builder.text(answer.rstrip(), trained=True)
        builder.text(trailing)
        turn_ends.append(len(builder.ids))
        done = full
    if add_generation_prompt:
        builder.text_with_images(render(messages, True)[len(done) :])
    if tok.bos_token_id is not None and (not builder.ids or builder.ids[0] != tok.bos_token_id):
        builder.ids.insert(0, tok.bos_token_id)
        builder.labels.insert(0, IGNORE_INDEX)
        turn_ends = [e + 1 for e in turn_ends]
    return EncodedConversation(builder.ids, builder.labels, builder.num_images, builder.num_videos, turn_ends, prefix_length or 0)


_PROBE = "mmtrain-probe-text"


def chat_template_takes_parts(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads contents as lists of parts (a VLM processor's, such as
    LLaVA's) rather than strings: it renders a string content's text only in the parts form."""

    def renders(content) -> bool:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        except Exception:  # a template that cannot read this form at all
            return False
        return _PROBE in text

    template = tokenizer.chat_template
    key = template if isinstance(template, str) else repr(template)
    if key not in _TAKES_PARTS:  # asked once per template, not once per sample
        _TAKES_PARTS[key] = not renders(_PROBE) and renders([{"type": "text", "text": _PROBE}])
    return _TAKES_PARTS[key]


_TAKES_PARTS: dict[str, bool] = {}


def content_parts(text: str) -> list[dict]:
    """A text with ``<image>`` (and ``<video>``) placeholders as the content parts a processor's template reads.

    The inverse of how records' part lists become text (``mmtrain.data.formats``): the one
    newline set between an image and its neighbour goes, so ``"<image>\nWhat?"`` is
    ``[image, "What?"]`` as a processor is given it.
    """
    pieces, marks = split_visuals(text)
    parts: list[dict] = []
    for k, piece in enumerate(pieces):
        if k:
            parts.append({"type": "image" if marks[k - 1] == IMAGE_PLACEHOLDER else "video"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if k < len(pieces) - 1 and piece.endswith("\n"):
            piece = piece[:-1]
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def encode_conversation(
    turns: list[dict],
    tokenizer,
    image_tokens: ImageTokens,
    template: str = "plain",
    system_prompt: str = "",
    add_generation_prompt: bool = False,
    image_sizes=None,
    video_frames=None,
) -> EncodedConversation:
    """Token ids and labels for ``turns`` (canonical ``{"role", "text"}`` dicts, ``<image>`` marks).

    With ``add_generation_prompt=True`` the last turn is a user question with no answer
    yet and the ids end where the answer would start (``### Answer:\\n`` for ``plain``):
    this is how generation builds prompts for new questions with the training template.
    Every ``<image>`` becomes ``image_tokens.span()``; the caller supplies images in
    placeholder order. With AnyRes tiles (``image_tokens.anyres``) an image's span follows
    its size: ``image_sizes`` gives each image's ``(height, width)`` in that order.
    Every ``<video>`` becomes ``image_tokens.video_span(frames)``, ``video_frames`` giving
    each video's sampled frame count in placeholder order.
    """
    if template not in TEMPLATES:
        raise ValueError(f"--template {template!r}: valid are {', '.join(TEMPLATES)}")
    if add_generation_prompt and (not turns or turns[-1]["role"] != "user"):
        raise ValueError("add_generation_prompt needs a conversation that ends with a user question")
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--template chat: the tokenizer has no chat template; use --template plain")
        return _encode_chat(_Builder(tokenizer, image_tokens, literal_text=False, image_sizes=image_sizes, video_frames=video_frames), turns, system_prompt, add_generation_prompt)
    if tokenizer.eos_token_id is None:
        raise ValueError("--template plain needs a tokenizer with an eos token to end each answer")
    return _encode_plain(_Builder(tokenizer, image_tokens, literal_text=True, image_sizes=image_sizes, video_frames=video_frames), turns, system_prompt, add_generation_prompt)


def check_template(tokenizer, template: str) -> None:
    """Fail early, naming the flag, when ``template`` cannot work with ``tokenizer``."""
    if template not in TEMPLATES:
        raise ValueError(f"--template {template!r}: valid are {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--template chat: the tokenizer has no chat template; use --template plain")
