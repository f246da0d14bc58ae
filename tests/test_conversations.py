"""Issue 22: conversations in, conversations out (``messages`` as OpenAI and TRL write them, ShareGPT's
``conversations``), one conversation one row, system prompts kept and respected, bad conversations counted."""

from __future__ import annotations

import json

import pytest

from mergeit_hf import load_rows
from mergeit_hf.errors import InputError
from mergeit_hf.output.folder import OutputFolder
from tests.helpers.pairs import cli_run, real_rows, restating_scripts
from tests.helpers.scripted import ScriptedServer

SYSTEMS = ("You are a patient tutor. Answer in plain words.", "You are a terse assistant.")
CONFIG = "n_clusters: 6\nselection_budget: 0.9\ntau: 0.45\nscorer_check_rows: 0\n"


def _user(row: dict) -> str:
    return f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]


@pytest.fixture(scope="module")
def source_rows():
    return real_rows("gpteacher_roleplay.json", list(range(330)))


@pytest.fixture(scope="module")
def conversations(source_rows):
    """300 real exchanges as conversations: a quarter under one of two system prompts, a tenth of two turns
    (the second turn another row's request and answer), contents with their own spacing kept."""
    rows, extra = source_rows[:300], source_rows[300:]
    made = []
    for i, row in enumerate(rows):
        turns = [{"role": "user", "content": _user(row)}, {"role": "assistant", "content": row["output"]}]
        if i % 4 == 0:
            turns.insert(0, {"role": "system", "content": SYSTEMS[(i // 4) % 2]})
        if i % 10 == 3:
            follow = extra[i // 10]
            turns += [{"role": "user", "content": _user(follow)}, {"role": "assistant", "content": follow["output"]}]
        made.append({"id": f"conv-{i}", "messages": turns})
    return made


def _as_sharegpt(conversation: dict) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": names[t["role"]], "value": t["content"]} for t in conversation["messages"]]
    return {"id": conversation["id"], "conversations": turns}


@pytest.fixture(scope="module", params=["messages", "sharegpt"])
def conversation_run(request, conversations, source_rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"conversations-{request.param}")
    # messages as JSON lines, ShareGPT as a JSON array: the shapes each is found in; no --format flag
    if request.param == "messages":
        data = folder / "conversations.jsonl"
        data.write_text("\n".join(json.dumps(c) for c in conversations) + "\n")
    else:
        data = folder / "sharegpt.json"
        data.write_text(json.dumps([_as_sharegpt(c) for c in conversations]))
    merge, score = restating_scripts(source_rows)
    server = ScriptedServer(merge, score).start()
    try:
        out = cli_run(folder, [], server.url, CONFIG, input_path=data)
    finally:
        server.stop()
    yield request.param, out, server, folder


def test_every_conversation_is_accounted_for_and_kept_as_it_came(conversation_run, conversations):
    _, out, _, _ = conversation_run
    result = OutputFolder.open(out)
    assert sorted(result.accounting["source_index"]) == list(range(300))
    by_id = {c["id"]: c["messages"] for c in conversations}
    originals = [row for row in result.final.to_list() if row["origin"] == "original"]
    assert originals
    for row in originals:
        assert row["messages"] == by_id[row["id"]], row["id"]  # every turn, in order, contents untouched
    assert result.record.counts["rows with a system prompt"] == 75
    assert result.record.counts["multi-turn conversations"] == 30
    card = (out / "README.md").read_text()
    assert "rows with a system prompt" in card and "multi-turn kept (not merged)" in card


def test_no_multi_turn_conversation_is_merged_and_merges_keep_their_system_prompt(conversation_run, conversations):
    _, out, server, _ = conversation_run
    result = OutputFolder.open(out)
    multi = {c["id"] for c in conversations if sum(t["role"] == "user" for t in c["messages"]) > 1}
    system_of = {
        c["id"]: c["messages"][0]["content"] if c["messages"][0]["role"] == "system" else "" for c in conversations
    }
    pairs = result.pairs.to_list()
    assert pairs and not {p["a_id"] for p in pairs} & multi and not {p["b_id"] for p in pairs} & multi
    assert all(system_of[p["a_id"]] == system_of[p["b_id"]] == p["system"] for p in pairs)
    fates = dict(zip(result.accounting["id"], result.accounting["fate"], strict=True))
    assert {fates[i] for i in multi} <= {"kept: multi-turn (not merged)", "not selected"}
    merged = [row for row in result.final.to_list() if row["origin"] == "merged"]
    assert merged
    for row in merged:
        system = system_of[row["source_ids"][0]]
        assert row["system"] == system
        head = [{"role": "system", "content": system}] if system else []
        assert row["messages"][: len(head)] == head and [t["role"] for t in row["messages"][len(head) :]] == [
            "user",
            "assistant",
        ]
    with_system = [p for p in pairs if p["system"]]
    assert with_system, "no pair under a system prompt: the test data should make some"
    assert any(
        f"keeps (do not restate it in the merged instruction):\n{with_system[0]['system']}" in prompt
        for prompt in server.prompts
    )


def test_the_output_folder_is_the_next_runs_input(conversation_run, source_rows):
    shape, out, _, folder = conversation_run
    if shape != "messages":
        pytest.skip("one round trip is enough")
    rows, report = load_rows(out)
    final = OutputFolder.open(out).final
    assert report.input_format == "messages" and len(rows) == len(final) and not report.dropped
    assert rows["id"] == final["id"]
    merge, score = restating_scripts(source_rows)
    server = ScriptedServer(merge, score).start()
    try:
        again = cli_run(folder, [], server.url, CONFIG, output="again", input_path=out)
    finally:
        server.stop()
    assert sorted(OutputFolder.open(again).accounting["source_index"]) == list(range(len(final)))


def _turns(*turns: tuple) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


ANSWER = ("assistant", "y")
BAD = [
    ({"messages": "hello"}, "not a list of turns"),
    ({"messages": [{"text": "hi"}, {"role": "assistant", "content": "x"}]}, "turn not a {role, content} object"),
    (_turns(("tool", "x"), ANSWER), "unknown role"),
    (_turns(("user", "  "), ANSWER), "empty content"),
    (_turns(("user", 3), ANSWER), "content not text"),
    (_turns(("user", "q")), "does not end with an assistant turn"),
    (_turns(("user", "a"), ("user", "b"), ANSWER), "two user turns in a row"),
    (_turns(("user", "a"), ("system", "s"), ANSWER), "system turn not first"),
]


def test_each_bad_conversation_is_dropped_with_its_counted_reason(tmp_path, conversations):
    records = [*conversations[:5], *(bad for bad, _ in BAD)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows, report = load_rows(path)
    assert len(rows) == 5 and report.records_read == 5 + len(BAD)
    assert report.drop_counts == {f"bad conversation: {reason}": 1 for _, reason in BAD}
    assert [d.source_index for d in report.dropped] == list(range(5, 5 + len(BAD)))


def test_a_file_of_bad_conversations_says_what_was_wrong_with_the_first(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(bad) for bad, _ in BAD[5:]))
    with pytest.raises(
        InputError,
        match=r"none of the 3 conversations can be used; the first, record 0: bad "
        r"conversation: does not end with an assistant turn",
    ):
        load_rows(path)


def test_a_messages_column_of_another_name_and_a_dataset(conversations):
    from datasets import Dataset

    renamed = Dataset.from_list([{"id": c["id"], "chat": c["messages"]} for c in conversations[:20]])
    rows, report = load_rows(renamed, column_map={"messages": "chat"})
    assert report.input_format == "messages" and len(rows) == 20
    assert rows["messages"][0] == conversations[0]["messages"]
    rows, report = load_rows(Dataset.from_list(conversations[:20]))  # detected by its column
    assert report.input_format == "messages" and rows["system"][0] == SYSTEMS[0]


def test_alpaca_rows_work_as_before(source_rows):
    from datasets import Dataset

    rows, report = load_rows(Dataset.from_list(source_rows[:10]))
    assert report.input_format == "alpaca" and rows["messages"][0] == [] and rows["system"][0] == ""
    assert rows["multi_turn"] == [False] * 10
