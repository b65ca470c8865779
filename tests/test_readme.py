"""The README is a script a newcomer follows: every command in its ``bash`` blocks works as written.

The pages under ``docs/`` are held to the same rule, and every relative link of the
README and of those pages must lead to a file of the repository.

Each command is run here or listed in ``SKIPPED`` with the reason; one in neither fails
:func:`test_every_command_is_run_or_skipped`, so a new command gets classified when it is
written. The cheap ones run in README order in one fresh folder, with a tiny export
standing in for the trained default (``outputs/default/epoch-11``), and in this process
(``python -m MODULE`` through runpy, ``python -c`` through exec): one import of torch
and transformers for all of them keeps the test to seconds. The skipped ones are still
checked where that is cheap: training flags parsed by the trainer's parser, config
files and scripts present.

The README also says that ``python -m mmtrain.train`` and ``accelerate launch
mmtrain/train.py`` train the same default identically; the last test checks it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
README_MAX_LINES = 320  # a guide that links the rest, not a lab notebook
EXPORT = "outputs/default/epoch-11"  # where the README's commands expect the default's last export

# Command prefix -> why it is not run here. Checks that still apply are in test_skipped_command.
SKIPPED = {
    "bash scripts/run.sh train": "trains the embedded default (minutes; tests/test_default_run.py runs it)",
    "bash scripts/run.sh test": "runs this whole test suite",
    "accelerate launch": "a training run (the same launch runs in tests/training); its flags are only parsed",
    "bash benchmarks/gpu_suite.sh": "needs GPUs (the GPU tier, tests/gpu)",
    "python benchmarks/": "a benchmark (a GPU, or minutes of CPU; tests/test_bench.py runs its pieces)",
}
USER_PATHS = ("/models/", "/data/")  # folders of the reader's machine, not of this one
# What the interactive chat is sent on stdin: the questions the README suggests, then the way out.
CHAT_INPUT = "What shape is in the image?\nWhat color is the shape?\n:quit\n"


@dataclass(frozen=True)
class Command:
    text: str  # for messages: the words as the shell reads them
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return self.text if len(self.text) < 100 else self.text[:97] + "..."


def readme_commands(text: str | None = None) -> list[Command]:
    """The shell commands of the README's ``bash`` blocks, in order (comments dropped)."""
    text = README.read_text() if text is None else text
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.splitlines(keepends=True):
            pending += line
            if pending.rstrip().endswith("\\"):
                continue
            joined = pending.replace("\\\n", " ")
            try:
                argv = shlex.split(joined, comments=True)
            except ValueError:  # inside a quoted string that goes on over the next line
                continue
            if argv:
                commands.append(Command("python -c '...'" if argv[:2] == ["python", "-c"] else shlex.join(argv), tuple(argv)))
            pending = ""
        assert not pending.strip(), f"a README bash block ends inside a command: {pending!r}"
    return commands


def without_assignments(argv: tuple[str, ...]) -> tuple[str, ...]:
    """The command after any leading ``NAME=value`` environment settings."""
    i = 0
    while i < len(argv) and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[i]):
        i += 1
    return argv[i:]


def skip_reason(command: Command) -> str | None:
    if any(word.startswith(USER_PATHS) for word in command.argv):
        return f"names the user's own checkpoints and data ({', '.join(p + '...' for p in USER_PATHS)}); its flags are only parsed"
    argv = without_assignments(command.argv)
    for prefix, reason in SKIPPED.items():
        words = prefix.split()
        if prefix.endswith("/"):  # a folder: any script in it
            if len(argv) > len(words) - 1 and argv[: len(words) - 1] == tuple(words[:-1]) and argv[len(words) - 1].startswith(words[-1]):
                return reason
        elif argv[: len(words)] == tuple(words):
            return reason
    return None


def is_runnable(command: Command) -> bool:
    argv = command.argv
    if argv[0] == "source" or argv[:2] == ("python", "-c"):
        return True
    # a python -m mmtrain tool, but not a training run (train only with --help)
    return argv[:2] == ("python", "-m") and argv[2].startswith("mmtrain.") and (argv[2] != "mmtrain.train" or "--help" in argv)


COMMANDS = readme_commands()
DOC_COMMANDS = [(page.name, command) for page in DOCS for command in readme_commands(page.read_text())]


def test_readme_extraction_joins_continuations_and_quotes():
    text = "```bash\nfoo --a 1 \\\n    --b 2   # note\npython -c '\nprint(1)\n'\n```\n```\nnot a command\n```\n"
    assert [c.argv for c in readme_commands(text)] == [("foo", "--a", "1", "--b", "2"), ("python", "-c", "\nprint(1)\n")]


def test_every_command_is_run_or_skipped():
    assert len(COMMANDS) >= 15, [str(c) for c in COMMANDS]
    unclassified = [str(c) for c in COMMANDS if not is_runnable(c) and skip_reason(c) is None]
    assert not unclassified, f"README commands neither run by this test nor in SKIPPED with a reason: {unclassified}"
    # every CLI's --help is on the page
    helped = {c.argv[2] for c in COMMANDS if c.argv[:2] == ("python", "-m") and "--help" in c.argv}
    assert helped == {"mmtrain.train", "mmtrain.budget", "mmtrain.memory", "mmtrain.generate", "mmtrain.export"}


def test_every_docs_command_is_run_or_skipped():
    assert DOCS and DOC_COMMANDS, "docs/ has pages with commands"
    unclassified = [f"{page}: {c}" for page, c in DOC_COMMANDS if not is_runnable(c) and skip_reason(c) is None]
    assert not unclassified, f"docs commands neither run by this test nor in SKIPPED with a reason: {unclassified}"
    assert not [f"{page}: {c}" for page, c in DOC_COMMANDS if c.argv[0] == "source"], "docs pages rely on the README's environment"


def test_the_readme_is_a_guide_that_links_every_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/ (at most {README_MAX_LINES})"
    linked = {target.split("#")[0] for target in _relative_links(README)}
    assert not [p.name for p in DOCS if f"docs/{p.name}" not in linked], "every docs/ page is reachable from the README"
    for page in ("CHANGELOG.md", "benchmarks/README.md"):
        assert page in linked, f"the README links {page}"


def test_the_architecture_section_names_every_module():
    """The README's package tree is the package as it is: each module's file is named in it, and no file that is gone."""
    text = README.read_text()
    section = text[text.index("## Architecture") :]
    tree = section[section.index("```") : section.index("```", section.index("```") + 3)]
    tree = tree[tree.index("mmtrain/") : tree.index("\naccelerate_configs/")]  # the package's part of the tree
    modules = {p.name for p in (REPO / "mmtrain").rglob("*.py") if p.name != "__init__.py"}
    named = set(re.findall(r"[\w]+\.py", tree))
    assert not sorted(modules - named), f"README architecture tree misses {sorted(modules - named)}"
    assert not sorted(named - modules), f"README architecture tree names files that are gone: {sorted(named - modules)}"


def _relative_links(page: Path) -> list[str]:
    """Targets of the page's Markdown links that are paths in the repository (not URLs, not anchors alone)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links inside code blocks are not links
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", [README, *DOCS, REPO / "CHANGELOG.md", REPO / "benchmarks" / "README.md"], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_lead_to_files(page):
    assert page.is_file(), f"{page.relative_to(REPO)} is missing"
    broken = [t for t in _relative_links(page) if not (page.parent / t.split("#")[0]).resolve().exists()]
    assert not broken, f"{page.relative_to(REPO)} links to paths that do not exist: {broken}"


def test_link_extraction_keeps_paths_only(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md) [b](https://x.org/b) [c](#here) [d](../e.md#part)\n```\n[f](not/a/link.md)\n```\n")
    assert _relative_links(page) == ["docs/a.md", "../e.md#part"]


def test_the_page_says_how_to_enter_the_environment():
    text = README.read_text()
    assert any(c.argv == ("source", ".venv/bin/activate") for c in COMMANDS)
    first_python = next(i for i, c in enumerate(COMMANDS) if c.argv[0] in ("python", "accelerate"))
    activate = next(i for i, c in enumerate(COMMANDS) if c.argv[0] == "source")
    assert activate < first_python, "the environment must be activated before the first python command"
    assert "scripts/run.sh" in text


def _run_in_process(command: Command, stdin: str = "") -> str:
    """Run ``python -m MODULE ...`` or ``python -c CODE`` here, as the shell would; returns stdout."""
    argv = command.argv
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_stdin = sys.argv, sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings():
            # runpy warns when the module was imported before (it is: by the other commands)
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                if argv[1] == "-c":
                    sys.argv = ["-c", *argv[3:]]
                    exec(compile(argv[2], "<README>", "exec"), {"__name__": "__main__"})
                else:
                    sys.argv = [argv[2], *argv[3:]]
                    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
    assert code == 0, f"`{command}` exited with {code}:\n{err.getvalue()[-3000:]}\n{out.getvalue()[-2000:]}"
    return out.getvalue()


@pytest.fixture
def newcomer_folder(tmp_path, monkeypatch):
    """A folder holding what the README's commands expect after training: the default's last export."""
    from mmtrain.args import ModelArguments
    from mmtrain.model import build_model
    from mmtrain.model.pretrained import save_pretrained

    args = ModelArguments()  # the embedded default's model, untrained: its answers are noise, its files are real
    built = build_model(args)
    save_pretrained(str(tmp_path / EXPORT), built.model.state_dict(), built.model, built.tokenizer, built.image_processor, args)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cheap_commands_run_as_written(newcomer_folder, capsys):
    ran = []
    for command in COMMANDS:
        if not is_runnable(command):
            continue
        argv = command.argv
        if argv[0] == "source":
            if Path(sys.prefix).resolve() == (REPO / ".venv").resolve():
                assert (REPO / argv[1]).is_file(), f"`{command}`: no {argv[1]} in the environment this suite runs in"
            ran.append(command)
            continue
        out = _run_in_process(command, stdin=CHAT_INPUT if "--interactive" in argv else "")
        if os.environ.get("MMTRAIN_SHOW_README_OUTPUT"):  # to read what the page's commands print, when one changes
            with capsys.disabled():
                print(f"\n$ {command}\n{out[-1500:]}")
        _check_output(command, out, newcomer_folder)
        ran.append(command)
    skipped = [(c, skip_reason(c)) for c in COMMANDS if not is_runnable(c)]
    with capsys.disabled():
        print(f"\nREADME: {len(ran)} commands run as written, {len(skipped)} skipped:")
        for command, reason in skipped:
            print(f"  skipped `{command}`: {reason}")
    assert len(ran) >= 14


def test_docs_cheap_commands_run_as_written(newcomer_folder):
    ran = 0
    for page, command in DOC_COMMANDS:
        if is_runnable(command):
            _check_output(command, _run_in_process(command, stdin=CHAT_INPUT if "--interactive" in command.argv else ""), newcomer_folder)
            ran += 1
    assert ran >= 2  # the training guide's budget and memory estimates


def _check_output(command: Command, out: str, newcomer_folder: Path) -> None:
    """What a runnable command of a page must print (or write) to count as working."""
    argv = command.argv
    if argv[:2] == ("python", "-c"):
        return
    if "--help" in argv:
        assert "usage:" in out and "--help" in out, out[:500]
    elif argv[2] == "mmtrain.budget":
        assert re.search(r"trainable: [\d,]+ of [\d,]+ parameters", out), out[-1000:]
    elif argv[2] == "mmtrain.memory":
        assert "recommended for" in out and "peak allocated" in out, out[-1000:]
    elif argv[2] == "mmtrain.generate" and "--prompts_file" in argv:
        rows = [json.loads(line) for line in out.splitlines()]
        asked = [json.loads(line)["prompt"] for line in Path(argv[argv.index("--prompts_file") + 1]).read_text().splitlines()]
        assert [r["prompt"] for r in rows] == asked and all(isinstance(r["answer"], str) for r in rows)
    elif argv[2] == "mmtrain.generate" and "--interactive" in argv:
        assert out.count("model>") == 2, out
    elif argv[2] == "mmtrain.generate":
        assert out.endswith("\n"), "generate printed no answer line"  # an untrained model may answer with nothing
    elif argv[2] == "mmtrain.export":
        assert (newcomer_folder / argv[argv.index("--out") + 1] / "config.json").is_file()


def test_the_model_path_is_where_the_default_run_writes_its_last_export():
    from mmtrain.args import embedded_default

    _, _, defaults = embedded_default()  # what `python -m mmtrain.train` trains with no flags
    assert EXPORT == f"{defaults.output_dir}/epoch-{defaults.num_train_epochs - 1}"
    assert f"the last of its {defaults.num_train_epochs} is\n`{EXPORT}`" in README.read_text()
    models = {c.argv[c.argv.index("--model") + 1] for c in COMMANDS if "--model" in c.argv}
    assert models == {EXPORT}, models


def _generate_commands() -> list[Command]:
    return [c for c in COMMANDS if c.argv[:3] == ("python", "-m", "mmtrain.generate") and "--prompt" in c.argv]


def test_questions_are_what_the_default_model_was_taught(tmp_path, monkeypatch):
    """Every question the README asks the default model is worded as its training data words it."""
    from mmtrain.data.synthetic import COLORS, QUESTIONS, TEXT_FACTS
    from mmtrain.generate import with_placeholders

    taught = {q.format(color=c) for q in QUESTIONS.values() for c in COLORS} | {q for q, _ in TEXT_FACTS}
    commands = _generate_commands()
    assert len(commands) >= 2 and any(c.argv.count("--image") == 2 for c in commands)
    # the questions the text says the model was taught, word for word
    text = README.read_text()
    after = text[text.index("## After training") :]
    quoted = [q for q in re.findall(r"`([^`]+)`", " ".join(after[: after.index("```")].split())) if q.endswith(("?", "."))]
    assert len(quoted) >= 6 and all(q in taught for q in quoted), [q for q in quoted if q not in taught]
    # the README's own drawing command writes the images these questions are about
    monkeypatch.chdir(tmp_path)
    printed = _run_in_process(next(c for c in COMMANDS if c.argv[:2] == ("python", "-c") and "render_question" in c.argv[2]))
    example = re.search(r"It prints each question with its right answer \(`([^`]+)`", " ".join(text.split()))[1]
    assert example in [" ".join(line.split()) for line in printed.splitlines()], (example, printed)
    drawn = {tuple(row["images"]): row["prompt"] for row in map(json.loads, Path("questions.jsonl").read_text().splitlines())}
    for row_prompt in drawn.values():
        assert row_prompt.replace("<image>\n", "") in taught
    for command in commands:
        argv = list(command.argv)
        prompt = argv[argv.index("--prompt") + 1]
        images = tuple(argv[i + 1] for i, a in enumerate(argv) if a == "--image")
        assert prompt.replace("<image>", "").strip() in taught, f"`{command}` asks something the default model was never taught"
        # the images it names were drawn for exactly this question, in the form training wrote
        assert with_placeholders(prompt, len(images)) == drawn[images], f"`{command}`: {images} were drawn for {drawn[images]!r}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if skip_reason(c)] + [c for _, c in DOC_COMMANDS if skip_reason(c)], ids=str)
def test_skipped_command(command, tmp_path):
    """What can be checked without running it; then skipped, with the reason."""
    argv = list(command.argv)
    for word in argv:
        if re.match(r"^(scripts|benchmarks|accelerate_configs|mmtrain|recipes)/", word):
            assert (REPO / word).exists(), f"`{command}` names {word}, which is not in the repository"
    if argv[:2] == ["accelerate", "launch"]:
        from mmtrain.args import parse_args

        flags = argv[argv.index("mmtrain/train.py") + 1 :]
        # The user's own checkpoints (/models/...) stand in as the presets of the same architecture.
        stand_ins = (("--lm_model_name_or_path", "tiny-llama"), ("--vision_model_name_or_path", "tiny-clip"),
                     ("--vision_model_name_or_path_2", "tiny-siglip"))
        for flag, preset in stand_ins:
            if flag in flags and flags[flags.index(flag) + 1].startswith("/"):
                flags[flags.index(flag) + 1] = preset
        if "--vlm_name_or_path" in flags:  # a released LLaVA checkpoint: a tiny LLaVA folder stands in
            from tests.llava_folders import write_tiny_llava

            flags[flags.index("--vlm_name_or_path") + 1] = write_tiny_llava(tmp_path / "llava")
        if any(f in flags for f in ("--quantize_base", "--quantize_vision")) and importlib.util.find_spec("bitsandbytes") is None:
            pytest.skip(f"{skip_reason(command)}; its flags need bitsandbytes to parse (pip install 'mmtrain[qlora]')")
        parse_args(flags)
    pytest.skip(skip_reason(command))


@pytest.mark.slow
def test_both_entry_points_train_the_default_identically(tmp_path):
    """``python -m mmtrain.train`` and ``accelerate launch mmtrain/train.py``: same process set-up, same losses."""
    import torch

    if torch.cuda.device_count() > 1:
        pytest.skip("accelerate launch without flags starts one process per GPU here: a different run")
    flags = ["--synthetic_num_samples", "64", "--per_device_train_batch_size", "8", "--max_steps", "4", "--logging_steps", "1",
             "--eval_generate", "0", "--export_each_epoch", "false", "--data_path", str(tmp_path / "data")]
    # as a newcomer's shell has it: no thread count chosen by anyone
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MMTRAIN_CPU_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    entry_points = {
        "python": [sys.executable, "-m", "mmtrain.train"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "mmtrain/train.py"],
    }
    runs = {}
    for name, cmd in entry_points.items():
        out = tmp_path / name
        proc = subprocess.run([*cmd, *flags, "--output_dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        process = re.findall(r"process: (.*)", proc.stderr)
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
        runs[name] = (process, losses)
    (py_process, py_losses), (acc_process, acc_losses) = runs["python"], runs["accelerate"]
    print(f"python -m: {py_process}\naccelerate launch: {acc_process}")
    assert len(py_process) == 1 and py_process == acc_process
    if "x cpu" in py_process[0]:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        assert f"{cores} CPU threads and 0 loader workers per process" in py_process[0]
    assert len(py_losses) == 4 and py_losses == acc_losses
