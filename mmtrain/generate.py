"""Ask a trained model about images.

    python -m mmtrain.generate --model OUTPUT/epoch-N --image a.png [--image b.png] --prompt "What color is the shape?"
    python -m mmtrain.generate --model OUTPUT/epoch-N --prompts_file questions.jsonl   # {"prompt": ..., "images": [...]} per line
    python -m mmtrain.generate --model OUTPUT/epoch-N --interactive [--image a.png]

Greedy by default (``--do_sample --temperature --top_p --top_k`` for sampling). Images
go to the ``<image>`` placeholders in the prompt in order; a prompt without
placeholders gets all its images in front. The prompt is rendered with the template
the model was trained with (recorded in the export). Loading is strict: a missing or
unexpected tensor in the export is an error. The interactive mode keeps the
conversation: earlier turns' images are encoded once and their features reused.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from PIL import Image

from mmtrain.args import ConfigError
from mmtrain.cli import FlagParser
from mmtrain.image_tokens import IMAGE_PLACEHOLDER
from mmtrain.model.generation import SamplingOptions, generate
from mmtrain.model.pretrained import load_pretrained, prompt_format


class Chat:
    """A conversation with a loaded export; image features are computed once per image."""

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, options: SamplingOptions = SamplingOptions()):
        self.built = load_pretrained(model_dir, dtype=dtype, device=device)
        self.template, self.system_prompt = prompt_format(model_dir)
        self.options = options
        self.turns: list[dict] = []
        self.features: list[torch.Tensor] = []  # one [tiles, patches, dim] per image so far (one tile without AnyRes)
        self.sizes: list[tuple[int, int]] = []  # each image's (height, width)

    def _pixels(self, paths: list[str]):
        images = []
        for path in paths:
            try:
                images.append(Image.open(path).convert("RGB"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"--image {path}: cannot read the image: {e}") from None
        if not images:
            return torch.zeros(0, *self.built.model.vision.pixel_shape), []
        sizes = [(image.height, image.width) for image in images]
        return self.built.image_processor(images=images, return_tensors="pt")["pixel_values"], sizes

    def encode_prompt(self, turns: list[dict], image_sizes=None) -> list[int]:
        from mmtrain.data import encode_conversation

        encoded = encode_conversation(
            turns, self.built.tokenizer, self.built.image_tokens, template=self.template,
            system_prompt=self.system_prompt, add_generation_prompt=True, image_sizes=image_sizes,
        )
        return encoded.input_ids

    def ask(self, prompt: str, images: list[str] = (), keep: bool = True) -> str:
        """Answer ``prompt`` about ``images`` (after earlier turns when ``keep``)."""
        prompt = with_placeholders(prompt, len(images))
        model = self.built.model
        pixels, new_sizes = self._pixels(list(images))
        sized = self.built.image_tokens.sized
        with torch.no_grad():
            encoded = model.encode_images(pixels.to(next(model.vision.parameters()).device), new_sizes if sized else None)
        tiles = [sized.tiles(size) if sized else 1 for size in new_sizes]
        new_features = list(encoded.split(tiles)) if tiles else []
        history = self.turns if keep else []
        features = (self.features if keep else []) + new_features
        sizes = (self.sizes if keep else []) + new_sizes
        turns = history + [{"role": "user", "text": prompt}]
        ids = torch.tensor(self.encode_prompt(turns, sizes))
        stacked = torch.cat(features) if features else self._no_features()
        out = generate(
            model, [ids], [], eos_token_id=self.built.tokenizer.eos_token_id, pad_token_id=self.built.tokenizer.pad_token_id,
            options=self.options, image_features=[stacked], image_sizes=[torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)],
        )[0]
        answer = self.built.tokenizer.decode(out, skip_special_tokens=True).strip()
        if keep:
            self.turns = turns + [{"role": "assistant", "text": answer}]
            self.features, self.sizes = features, sizes
        return answer

    def _no_features(self) -> torch.Tensor:
        vision = self.built.model.vision
        return torch.zeros(0, vision.num_patches, vision.hidden_size)


def with_placeholders(prompt: str, num_images: int) -> str:
    """Images go to the prompt's placeholders; without any, all images go in front."""
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found == 0:
        return (IMAGE_PLACEHOLDER + "\n") * num_images + prompt
    if found != num_images:
        raise ConfigError(f"--prompt has {found} {IMAGE_PLACEHOLDER} placeholders but {num_images} --image given")
    return prompt


def _read_prompts(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--prompts_file {path} line {i}: not JSON: {e}") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ConfigError(f"--prompts_file {path} line {i}: expected {{\"prompt\": str, \"images\": [paths]}}")
                rows.append({"prompt": row["prompt"], "images": list(row.get("images", []))})
    except FileNotFoundError:
        raise ConfigError(f"--prompts_file {path}: no such file") from None
    return rows


@dataclass
class GenerateArguments:
    model: str = field(metadata={"help": "An export folder (OUTPUT/epoch-N)."})
    image: list[str] = field(
        default_factory=list,
        # extend: `--image a.png --image b.png` and `--image a.png b.png` both give two images
        metadata={"help": "An image file; repeat the flag (or list several) for more images, in placeholder order.", "action": "extend"},
    )
    prompt: Optional[str] = field(default=None, metadata={"help": "The question."})
    prompts_file: Optional[str] = field(
        default=None, metadata={"help": 'JSONL of {"prompt": ..., "images": [...]}; answers one per line, as JSON.'}
    )
    interactive: bool = field(default=False, metadata={"help": "A multi-turn chat on the terminal."})
    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens generated per answer."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens reaching this probability."})
    top_k: int = field(default=0, metadata={"help": "Sample among the k likeliest tokens only (0: all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    device: str = field(
        default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "Where the model runs."}
    )
    dtype: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata={"help": "Dtype the export is loaded in."})

    def __post_init__(self):
        if sum(bool(x) for x in (self.prompt, self.prompts_file, self.interactive)) != 1:
            raise ConfigError("give exactly one of --prompt, --prompts_file, --interactive")

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(self.max_new_tokens, self.do_sample, self.temperature, self.top_p, self.top_k)


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(GenerateArguments, prog="python -m mmtrain.generate", description=__doc__.splitlines()[0])
    (args,) = parser.parse(argv)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        chat = Chat(args.model, device=args.device, dtype=dtype, options=args.sampling())
        if args.prompt:
            print(chat.ask(args.prompt, args.image, keep=False))
        elif args.prompts_file:
            for row in _read_prompts(args.prompts_file):
                print(json.dumps({"prompt": row["prompt"], "answer": chat.ask(row["prompt"], row["images"], keep=False)}))
        else:
            _interactive(chat, args.image)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)  # an export's own config is what failed: its fields, not flags, are named
        return 2
    return 0


def _interactive(chat: Chat, first_images: list[str]) -> None:
    print("multi-turn chat; ':image PATH' adds an image to the next question, ':reset' starts over, ':quit' ends")
    pending = list(first_images)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if line in (":quit", ":q"):
            return
        if line == ":reset":
            chat.turns, chat.features, pending = [], [], []
            continue
        if line.startswith(":image "):
            pending.append(line.split(" ", 1)[1].strip())
            continue
        if line:
            print("model>", chat.ask(line, pending))
            pending = []


def cli(argv: list[str] | None = None) -> int:
    """The console script's entry point: the exit status (0 done, 2 a bad flag or input)."""
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
