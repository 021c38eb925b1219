"""Finding DreamOmni2Bench's cases: the published folders (which image is image 1, what a category's
name says of its scope), the cases.jsonl override, and the cases that cannot run, each named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from api_schemas.common import Task
from dreamomni2 import cli
from dreamomni2.bench.command import sampling_options, select_cases
from dreamomni2.bench.discovery import BenchLayoutError, discover, scope_of
from dreamomni2.bench.results import BenchFolder, SamplingOptions, case_key


def image(path: Path, color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)
    return path


def case_folder(root: Path, relative: str, instruction: str | None, images: list[str]) -> Path:
    folder = root / relative
    folder.mkdir(parents=True, exist_ok=True)
    if instruction is not None:
        (folder / "instruction.txt").write_text(instruction + "\n")
    for number, name in enumerate(images):
        image(folder / name, (number * 40, 0, 0))
    return folder


def test_the_published_layout_orders_images_by_their_names(tmp_path: Path):
    case_folder(tmp_path, "editing_benchmark/local_attribute/2", "make it rattan", ["ref_1.png", "src.jpg",
                "ref_0.png", "res.jpg"])  # fmt: skip
    case_folder(tmp_path, "editing_benchmark/local_attribute/10", "swap the bag", ["ref_0.jpg", "ref_1.jpg"])
    case_folder(tmp_path, "editing_benchmark/concrete_object/1", "add the dog", ["src.png", "ref.png"])
    case_folder(
        tmp_path, "generation_benchmark/global_attribute/a", "in this style", ["img2.png", "img1.png"]
    )
    case_folder(tmp_path, "generation_benchmark/global_attribute/b", "a cat", [])

    cases, problems = discover(tmp_path)

    assert problems == []
    ids = [case.case_id for case in cases]
    # Edits first, categories and cases in order (case folders by their number: 2 before 10).
    assert ids == ["edit/concrete_object/1", "edit/local_attribute/2", "edit/local_attribute/10",
                   "generate/global_attribute/a", "generate/global_attribute/b"]  # fmt: skip
    names = {case.case_id: [path.name for path in case.images] for case in cases}
    assert names["edit/local_attribute/2"] == ["src.jpg", "ref_0.png", "ref_1.png"]  # res.jpg is a result
    assert names["edit/local_attribute/10"] == ["ref_0.jpg", "ref_1.jpg"]
    assert names["edit/concrete_object/1"] == ["src.png", "ref.png"]
    assert names["generate/global_attribute/a"] == ["img1.png", "img2.png"]
    assert names["generate/global_attribute/b"] == []
    by_id = {case.case_id: case for case in cases}
    assert by_id["edit/local_attribute/2"].instruction == "make it rattan"
    assert by_id["edit/local_attribute/2"].task is Task.EDIT
    assert [by_id[i].scope for i in ("edit/concrete_object/1", "edit/local_attribute/2",
                                     "generate/global_attribute/a")] == ["object", "local_attribute",
                                                                         "global_attribute"]  # fmt: skip
    assert len(set(by_id["edit/local_attribute/2"].digests)) == 3


@pytest.mark.parametrize(
    ("category", "scope"),
    [("Concrete_Object", "object"), ("abstract-local", "local_attribute"), ("global", "global_attribute"),
     ("abstract_attribute", "abstract_attribute"), ("misc", "unknown")],
)  # fmt: skip
def test_scope_comes_from_the_category_name(category: str, scope: str):
    assert scope_of(category) == scope


def test_cases_that_cannot_run_are_named_and_the_others_still_found(tmp_path: Path):
    case_folder(tmp_path, "editing_benchmark/object/ok", "add the hat", ["src.png", "ref.png"])
    case_folder(tmp_path, "editing_benchmark/object/two_refs", "mix them", ["src.png", "a.png", "b.png"])
    case_folder(tmp_path, "editing_benchmark/object/same_number", "x", ["ref1.png", "img1.png"])
    case_folder(tmp_path, "editing_benchmark/object/no_image", "add a hat", [])
    case_folder(tmp_path, "editing_benchmark/object/empty", "   ", ["src.png"])
    case_folder(tmp_path, "editing_benchmark/object/loose", None, ["src.png"])

    cases, problems = discover(tmp_path)

    assert [case.case_id for case in cases] == ["edit/object/ok"]
    messages = {problem.where: problem.message for problem in problems}
    assert "a.png, b.png carry no number" in messages["editing_benchmark/object/two_refs"]
    assert "cases.jsonl" in messages["editing_benchmark/object/two_refs"]
    assert "share numbers" in messages["editing_benchmark/object/same_number"]
    assert "needs the image to edit" in messages["editing_benchmark/object/no_image"]
    assert messages["editing_benchmark/object/empty"] == "instruction.txt is empty"
    assert "no instruction.txt" in messages["editing_benchmark/object/loose"]


def test_a_download_folder_above_the_layout_is_found_and_no_layout_is_an_error(tmp_path: Path):
    case_folder(tmp_path, "DreamOmni2Bench/generation_benchmark/style/1", "a cat like this", ["img1.png"])
    cases, _ = discover(tmp_path)
    assert [case.case_id for case in cases] == ["generate/style/1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchLayoutError, match="editing_benchmark and generation_benchmark"):
        discover(tmp_path / "empty")
    with pytest.raises(BenchLayoutError, match="no such folder"):
        discover(tmp_path / "missing")


def test_cases_jsonl_overrides_the_folders_and_names_its_bad_lines(tmp_path: Path):
    case_folder(tmp_path, "editing_benchmark/object/1", "ignored: cases.jsonl wins", ["src.png"])
    image(tmp_path / "pics" / "b.png")
    image(tmp_path / "pics" / "a.png")
    lines = [
        {"id": "e/1", "task": "edit", "category": "pose", "instruction": "pose like image 2",
         "images": ["pics/b.png", "pics/a.png"]},
        "# a comment",
        {"id": "g/1", "task": "generate", "category": "objects", "instruction": "a dog", "images": [],
         "scope": "object"},
        '{"id": "broken"',
        {"id": "x", "task": "feature_mixing", "category": "c", "instruction": "i", "images": []},
        {"id": "../up", "task": "generate", "category": "c", "instruction": "i"},
        {"id": "y", "task": "edit", "category": "c", "instruction": "i", "images": ["pics/none.png"]},
        {"id": "e/1", "task": "generate", "category": "c", "instruction": "again"},
        {"id": "z", "task": "generate", "category": "c", "instruction": "i", "colour": "red"},
        {"id": "w", "task": "edit", "category": "c", "instruction": " ", "images": ["pics/a.png"]},
    ]  # fmt: skip
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (tmp_path / "cases.jsonl").write_text(text + "\n\n")

    cases, problems = discover(tmp_path)

    assert [case.case_id for case in cases] == ["e/1", "g/1"]
    assert [path.name for path in cases[0].images] == ["b.png", "a.png"]  # as listed, not by name
    assert (cases[0].scope, cases[1].scope) == ("unknown", "object")
    messages = [(problem.where, problem.message) for problem in problems]
    assert [where for where, _ in messages] == [f"cases.jsonl line {n}" for n in (4, 5, 6, 7, 8, 9, 10)]
    assert messages[0][1].startswith("not JSON")
    assert messages[1][1] == "task must be edit or generate; got 'feature_mixing'"
    assert messages[2][1].startswith("id must be")
    assert messages[3][1] == "no such image file(s): pics/none.png"
    assert messages[4][1] == "id e/1 is also line 1's"
    assert messages[5][1].startswith("unknown field(s) colour")
    assert messages[6][1] == "instruction is missing or empty"


def test_only_and_limit_select_cases(tmp_path: Path):
    for number in range(3):
        case_folder(tmp_path, f"generation_benchmark/style/{number}", "a cat", [])
        case_folder(tmp_path, f"generation_benchmark/object/{number}", "a dog", [])
    cases, _ = discover(tmp_path)
    assert [c.case_id for c in select_cases(cases, ["style"], 2)] == ["generate/style/0", "generate/style/1"]
    assert len(select_cases(cases, None, None)) == 6
    with pytest.raises(ValueError, match="no category hats in the benchmark; it has object, style"):
        select_cases(cases, ["hats"], None)


def test_a_case_key_follows_what_the_case_sends(tmp_path: Path):
    case_folder(tmp_path, "editing_benchmark/object/1", "add the hat", ["src.png"])
    case_folder(tmp_path, "generation_benchmark/object/1", "a hat", [])
    (edit, generate), _ = discover(tmp_path)
    plain = SamplingOptions(steps=2)
    assert case_key(edit, plain) == case_key(edit, SamplingOptions(steps=2))
    assert case_key(edit, plain) != case_key(edit, SamplingOptions(steps=3))
    # A size changes a generation only (an edit keeps image 1's), and 3 is the guidance 3.0.
    assert case_key(edit, plain) == case_key(edit, SamplingOptions(steps=2, size=(512, 512)))
    assert case_key(generate, plain) != case_key(generate, SamplingOptions(steps=2, size=(512, 512)))
    assert case_key(generate, SamplingOptions(guidance=3)) == case_key(
        generate, SamplingOptions(guidance=3.0)
    )
    assert SamplingOptions(size=(512, 512)).submit_arguments(edit)["size"] is None
    # A LoRA stacked on every case (`--lora`) is another run of the benchmark.
    styled = SamplingOptions(steps=2, loras=(("style", 0.5),))
    assert case_key(edit, styled) != case_key(edit, plain)
    assert case_key(edit, styled) != case_key(edit, SamplingOptions(steps=2, loras=(("style", None),)))
    assert styled.submit_arguments(edit)["loras"] == [{"name": "style", "scale": 0.5}]
    options = sampling_options(
        cli.build_parser().parse_args(["bench", "in", "out", "--lora", "style:0.5", "--lora", "kohya"])
    )
    assert options.loras == (("style", 0.5), ("kohya", None))
    image(tmp_path / "editing_benchmark/object/1/src.png", (255, 255, 255))  # a changed input
    (changed, _), _ = discover(tmp_path)
    assert case_key(changed, plain) != case_key(edit, plain)


def test_results_keep_the_latest_line_per_case_in_the_benchmarks_order(tmp_path: Path):
    folder = BenchFolder(tmp_path / "out")
    folder.add({"case_id": "b", "case_key": "k", "status": "failed"})
    folder.add({"case_id": "a", "case_key": "k", "status": "succeeded", "output": "outputs/a.png"})
    folder.add({"case_id": "b", "case_key": "k", "status": "succeeded", "output": "outputs/b.png"})
    with open(folder.results, "a") as file:
        file.write('{"case_id": "c", "trunc')  # a line cut short by an interruption

    records = folder.compact(["b", "a"])

    assert [(r["case_id"], r["status"]) for r in records] == [("b", "succeeded"), ("a", "succeeded")]
    assert len(folder.results.read_text().splitlines()) == 2
    assert folder.idempotency_key("k") == folder.idempotency_key("k")
    assert folder.idempotency_key("k", 1).endswith("-k-retry1")
    assert BenchFolder(tmp_path / "other").idempotency_key("k") != folder.idempotency_key("k")
