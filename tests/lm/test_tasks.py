import json

import pytest

from embodied_distill.lm.tasks import (
    TASKS,
    Example,
    exact_match,
    extract_answer,
    load_prompt_file,
    make_task,
    split_examples,
    task_examples,
    unlabeled_prompts,
    vocabulary_words,
)


@pytest.mark.parametrize("name", TASKS)
def test_builtin_split_is_disjoint_deterministic_and_held_out(name):
    a, b = make_task(name, seed=3), make_task(name, seed=3)
    assert [e.prompt for e in a.test] == [e.prompt for e in b.test]
    train, test = {e.prompt for e in a.train}, {e.prompt for e in a.test}
    assert train and test and not train & test
    assert len(train) + len(test) == len(task_examples(name))
    assert make_task(name, seed=4).test != a.test
    for e in a.test:
        assert exact_match(e.completion, e.answer, e.kind), (e.completion, e.answer)


@pytest.mark.parametrize(
    "response,answer,kind,ok",
    [
        ("The plural of mouse is mice.", "mice", "word", True),
        ("The plural of mouse is mouses. Mice is also used.", "mice", "word", False),
        ("The opposite of wet is dry. In chemistry, dry refers to ...", "dry", "word", True),
        ("The capital of Argentina is Buenos Aires.", "Buenos Aires", "word", True),
        ("The capital of Argentina is Aires.", "Buenos Aires", "word", False),
        ("MICE", "mice", "word", True),
        ("To add 7 and 5: 7 + 5 = 12.", "12", "number", True),
        ("7 + 5 = 1,200", "1200", "number", True),
        ("7 + 5 = 13", "12", "number", False),
        ("", "12", "number", False),
        ("", "mice", "word", False),
    ],
)
def test_exact_match(response, answer, kind, ok):
    assert exact_match(response, answer, kind) is ok


def test_extract_answer():
    assert extract_answer("The plural of ox is oxen.\nMore text", "word") == "oxen"
    assert extract_answer("no digits here", "number") is None


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nWhat is 2 + 2?\n\nLine one\\nline two\n")
    ex = load_prompt_file(txt)
    assert [e.prompt for e in ex] == ["What is 2 + 2?", "Line one\nline two"]
    assert ex[0].answer is None and ex[0].messages[-1]["role"] == "user"

    rows = [
        {"prompt": "What is 2 + 2?", "answer": "4", "kind": "number", "context": "2 + 2 = 4"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "plural of cat?"},
            ],
            "system": "Be brief.",
            "answer": "cats",
        },
    ]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex = load_prompt_file(jl)
    assert ex[0].kind == "number" and ex[0].context == "2 + 2 = 4"
    assert ex[1].messages[0] == {"role": "system", "content": "Be brief."} and len(ex[1].messages) == 4
    assert "Reference" in ex[0].teacher_messages("{prompt} Reference: {context}")[-1]["content"]
    split = split_examples(ex, 1)
    assert len(split.train) == 1 and len(split.test) == 1


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"answer": "4"}', "needs a 'prompt'"),
        ('{"prompt": "x", "bogus": 1}', "unknown field"),
        ("not json", "not valid JSON"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "user turn"),
    ],
)
def test_bad_prompt_files_fail_with_the_line(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content + "\n")
    with pytest.raises(ValueError, match=match):
        load_prompt_file(f)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    with pytest.raises(ValueError, match="digits"):
        make_task("addition", digits=5)
    with pytest.raises(ValueError, match="n_test"):
        make_task("plural", n_test=10_000)
    with pytest.raises(ValueError, match="user turn"):
        Example(({"role": "system", "content": "x"},))


def test_unlabeled_prompts_come_from_whole_word_tokens_and_skip_held_out_prompts():
    class Vocab:
        def get_vocab(self):
            return {
                "Ġgoose": 0,
                "Ġtable": 1,
                "Ġcats": 2,
                "Ġwalked": 3,
                "table": 4,
                "Ġab": 5,
                "ĠHouse": 6,
                "Ġriver": 7,
            }

    words = vocabulary_words(Vocab())
    assert words == ["goose", "river", "table"]
    split = make_task("plural", seed=0)
    test_words = [w for w in words if f"What is the plural of {w}?" in {e.prompt for e in split.test}]
    extra = unlabeled_prompts("plural", words, 3 - len(test_words), exclude={e.prompt for e in split.test})
    assert all(e.answer is None and e.completion is None for e in extra)
    assert not {e.prompt for e in extra} & {e.prompt for e in split.test}
    with pytest.raises(ValueError, match="only"):
        unlabeled_prompts("plural", words, 10)
    with pytest.raises(ValueError, match="word tasks"):
        unlabeled_prompts("addition", words, 1)
