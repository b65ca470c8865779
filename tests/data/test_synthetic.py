"""The generated default dataset: deterministic, reusable, balanced, and readable by the pipeline."""

import hashlib
import json
import os

from mmtrain.data import load_records
from mmtrain.data.synthetic import IMAGE_QUESTION_TYPES, generate_synthetic, majority_baseline, render_question


def digest(folder):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a = generate_synthetic(tmp_path / "a", 60, seed=1)
    b = generate_synthetic(tmp_path / "b", 60, seed=1)
    c = generate_synthetic(tmp_path / "c", 60, seed=2)
    assert digest(os.path.dirname(a)) == digest(os.path.dirname(b)) != digest(os.path.dirname(c))


def test_reuse_and_interrupted_runs(tmp_path):
    folder = tmp_path / "s"
    path = generate_synthetic(folder, 20, seed=0)
    mtime = os.path.getmtime(path)
    assert generate_synthetic(folder, 20, seed=0) == path and os.path.getmtime(path) == mtime
    # A killed run leaves only a temporary folder, never the final one.
    (tmp_path / "t.tmp-1-dead").mkdir()
    assert not os.path.exists(tmp_path / "t")
    generate_synthetic(tmp_path / "t", 20, seed=0)
    assert digest(tmp_path / "t") == digest(folder)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("s.tmp")]


def test_answers_need_the_image(tmp_path):
    path = generate_synthetic(tmp_path / "s", 1500, seed=0)
    records = json.load(open(path))
    baseline = majority_baseline(records)
    assert set(IMAGE_QUESTION_TYPES) <= set(baseline["per_type"])
    assert baseline["overall"] < 0.40 and baseline["question_lookup"] < 0.40
    for qtype in IMAGE_QUESTION_TYPES:
        info = baseline["per_type"][qtype]
        n_classes = {"color": 4, "shape": 3, "count": 4, "compare": 2}.get(qtype, 2)
        assert info["baseline"] < 1 / n_classes + 0.1, (qtype, info)
    text_only = sum("images" not in r for r in records) / len(records)
    assert 0.05 <= text_only <= 0.10
    assert any(len(r.get("images", [])) == 2 for r in records)
    assert any(len(r["conversations"]) == 4 for r in records)
    canonical = load_records(path)
    assert all(len(r["images"]) == sum(t["text"].count("<image>") for t in r["turns"]) for r in canonical)


def test_render_question():
    example = render_question("compare", seed=5)
    assert len(example["images"]) == 2 and example["images"][0].size == (64, 64)
    assert example["question"].startswith("<image>\n<image>\nWhich image")
    assert example["answer"] in ("first", "second")
    assert render_question("color", seed=1)["answer"] == render_question("color", seed=1)["answer"]


def test_build_datasets_generates_synthetic(tmp_path, tokenizer, image_processor, image_tokens):
    from contextlib import contextmanager

    from mmtrain.args import DataArguments
    from mmtrain.data import build_datasets

    entered = []

    @contextmanager
    def main_process_first():
        entered.append(True)
        yield

    args = DataArguments(data_path=str(tmp_path), synthetic_num_samples=40, eval_ratio=0.25)
    bundle = build_datasets(args, tokenizer, image_processor, image_tokens, seed=7, main_process_first=main_process_first)
    assert entered == [True]
    assert os.path.isfile(tmp_path / "synthetic-seed7-n40" / "train.json")
    assert (len(bundle.train), len(bundle.eval)) == (30, 10)
    examples = bundle.generation_examples(4)
    assert len(examples) == 4 and all(tokenizer.decode(e["input_ids"]).endswith("### Answer:\n") for e in examples)


def _generate(args):
    folder, n = args
    return generate_synthetic(folder, n, seed=3)


def test_two_processes_generating_at_once(tmp_path):
    import multiprocessing

    folder = str(tmp_path / "race")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        paths = pool.map(_generate, [(folder, 30), (folder, 30)])
    assert paths[0] == paths[1] and len(json.load(open(paths[0]))) == 30
    assert os.listdir(tmp_path) == ["race"]  # the loser's temporary copy is gone
