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

import argparse
import json
import sys

import torch
from PIL import Image

from mmtrain.args import ConfigError
from mmtrain.model.generation import SamplingOptions, generate
from mmtrain.model.pretrained import load_pretrained, prompt_format
from mmtrain.model.tokens import IMAGE_PLACEHOLDER


class Chat:
    """A conversation with a loaded export; image features are computed once per image."""

    def __init__(self, model_dir: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, options: SamplingOptions = SamplingOptions()):
        self.built = load_pretrained(model_dir, dtype=dtype, device=device)
        self.template, self.system_prompt = prompt_format(model_dir)
        self.options = options
        self.turns: list[dict] = []
        self.features: list[torch.Tensor] = []  # one [patches, dim] per image so far

    def _pixels(self, paths: list[str]) -> torch.Tensor:
        images = []
        for path in paths:
            try:
                images.append(Image.open(path).convert("RGB"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"--image {path}: cannot read the image: {e}") from None
        if not images:
            size = self.built.model.vision.image_size
            return torch.zeros(0, 3, size, size)
        return self.built.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def encode_prompt(self, turns: list[dict]) -> list[int]:
        from mmtrain.data import encode_conversation

        encoded = encode_conversation(
            turns, self.built.tokenizer, self.built.image_tokens, template=self.template,
            system_prompt=self.system_prompt, add_generation_prompt=True,
        )
        return encoded.input_ids

    def ask(self, prompt: str, images: list[str] = (), keep: bool = True) -> str:
        """Answer ``prompt`` about ``images`` (after earlier turns when ``keep``)."""
        prompt = with_placeholders(prompt, len(images))
        model = self.built.model
        with torch.no_grad():
            new_features = list(model.encode_images(self._pixels(list(images)).to(model.vision.tower.device)))
        history = self.turns if keep else []
        features = (self.features if keep else []) + new_features
        turns = history + [{"role": "user", "text": prompt}]
        ids = torch.tensor(self.encode_prompt(turns))
        stacked = torch.stack(features) if features else None
        out = generate(
            model, [ids], [], eos_token_id=self.built.tokenizer.eos_token_id, pad_token_id=self.built.tokenizer.pad_token_id,
            options=self.options, image_features=[stacked] if stacked is not None else [self._no_features()],
        )[0]
        answer = self.built.tokenizer.decode(out, skip_special_tokens=True).strip()
        if keep:
            self.turns = turns + [{"role": "assistant", "text": answer}]
            self.features = features
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an export folder (OUTPUT/epoch-N)")
    parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    parser.add_argument("--prompt", help="the question")
    parser.add_argument("--prompts_file", help="JSONL of {\"prompt\": ..., \"images\": [...]} (answers one per line, as JSON)")
    parser.add_argument("--interactive", action="store_true", help="a multi-turn chat on the terminal")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    args = parser.parse_args(argv)
    if sum(bool(x) for x in (args.prompt, args.prompts_file, args.interactive)) != 1:
        parser.error("give exactly one of --prompt, --prompts_file, --interactive")
    torch.manual_seed(args.seed)
    options = SamplingOptions(args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.top_k)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        chat = Chat(args.model, device=args.device, dtype=dtype, options=options)
        if args.prompt:
            print(chat.ask(args.prompt, args.image, keep=False))
        elif args.prompts_file:
            for row in _read_prompts(args.prompts_file):
                print(json.dumps({"prompt": row["prompt"], "answer": chat.ask(row["prompt"], row["images"], keep=False)}))
        else:
            _interactive(chat, args.image)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
