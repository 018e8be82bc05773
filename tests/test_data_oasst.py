"""Open-Assistant rows in every layout -> conversations (finetune_trainer.data.oasst).

Pure: rows are written here, no files, no tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer.data import oasst
from finetune_trainer.data.errors import DataError, RowProblem
from finetune_trainer.data.oasst import OASST_PATHS, OasstResult, oasst_conversations, oasst_text_turns


def run(rows: list, paths: str = "best", numbers: list[int] | None = None) -> OasstResult:
    numbers = numbers if numbers is not None else list(range(1, len(rows) + 1))
    return oasst_conversations(rows, numbers, source="data/t.jsonl", paths=paths)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


def msg(mid: str | None, parent: str | None, role: str, text: str, **extra) -> dict:
    row = {"message_id": mid, "parent_id": parent, "role": role, "text": text, **extra}
    if mid is None:
        del row["message_id"]
    return row


def node(role: str, text: str, *replies: dict, **extra) -> dict:
    """A nested message as *.trees.jsonl writes them."""
    return {"role": role, "text": text, **extra, "replies": list(replies)}


def tree(prompt: dict, tree_id: str = "t1") -> dict:
    return {"message_tree_id": tree_id, "tree_state": "ready_for_export", "prompt": prompt}


# A tree with three answers to the prompt; the middle one has a follow-up.
THREE_BRANCHES = tree(
    node(
        "prompter", "Q",
        node("assistant", "A-rank2", rank=2),
        node("assistant", "A-rank0", node("prompter", "more?", node("assistant", "B")), rank=0),
        node("assistant", "A-rank1", rank=1),
    )
)


# --- layouts ----------------------------------------------------------------------------------


def test_flat_rows_follow_the_best_reply_down_to_a_leaf():
    rows = [
        msg("p", None, "prompter", "Boiling point of water?", lang="en"),
        msg("a1", "p", "assistant", "90 °C", rank=1),
        msg("a0", "p", "assistant", "100 °C", rank=0),
        msg("f", "a0", "prompter", "In Fahrenheit?"),
        msg("b", "f", "assistant", "212 °F"),
    ]
    result = run(rows)
    assert result.conversations == [
        (1, [user("Boiling point of water?"), bot("100 °C"), user("In Fahrenheit?"), bot("212 °F")])
    ]
    assert result.problems == []
    assert (result.trees, result.paths, result.replies_used, result.replies_total) == (1, 1, 2, 3)


def test_flat_user_role_and_missing_parent_id_mean_a_root():
    rows = [
        {"message_id": "p", "role": "user", "text": "Hi"},  # no parent_id column: a root
        msg("a", "p", "assistant", "Hello"),
    ]
    assert run(rows).conversations == [(1, [user("Hi"), bot("Hello")])]


def test_nested_tree_with_message_tree_id_and_prompt():
    rows = [
        tree(
            node(
                "prompter", "Name a prime.",
                node("assistant", "7", node("prompter", "Another?", node("assistant", "11"))),
                message_id="r",
            )
        )
    ]
    result = run(rows)
    assert result.conversations == [(1, [user("Name a prime."), bot("7"), user("Another?"), bot("11")])]
    assert result.problems == []
    assert (result.trees, result.paths, result.replies_used, result.replies_total) == (1, 1, 2, 2)


def test_nested_bare_root_message_with_replies():
    rows = [node("prompter", "Q", node("assistant", "A", message_id="a"), message_id="q", lang="de")]
    assert run(rows).conversations == [(1, [user("Q"), bot("A")])]


def test_nested_leaves_may_omit_replies_and_replies_may_be_null():
    rows = [
        tree({"role": "prompter", "text": "Q", "replies": [{"role": "assistant", "text": "A"}]}),
        tree({"role": "prompter", "text": "Q2", "replies": None}),
        {"role": "prompter", "text": "a lone prompt, as trees exports write a tree nobody answered"},
    ]
    result = run(rows)
    assert result.conversations == [(1, [user("Q"), bot("A")])]
    assert result.problems == []
    assert (result.trees, result.unanswered) == (3, 2)


def test_text_column_form_splits_turns():
    rows = [
        {"text": "### Human: What is 5 + 3? ### Assistant: 8"},
        {"text": "### System: Be brief. ### Human: Colour? ### Assistant: red ### Human: Another?"},
    ]
    result = run(rows)
    assert result.conversations == [
        (1, [user("What is 5 + 3?"), bot("8")]),
        (2, [{"role": "system", "content": "Be brief."}, user("Colour?"), bot("red")]),  # trailing turn dropped
    ]
    assert result.text_rows == 2
    assert result.trees == 0


def test_oasst_text_turns_raises_row_problems():
    assert oasst_text_turns({"text": "### Human: q ### Assistant: a"}) == [user("q"), bot("a")]
    with pytest.raises(RowProblem, match="has no assistant turn"):
        oasst_text_turns({"text": "### Human: only a question"})


def test_layouts_mixed_in_one_file_come_out_in_file_order():
    rows = [
        {"text": "### Human: t1 ### Assistant: t1a"},
        msg("p", None, "prompter", "flat Q"),
        tree(node("prompter", "nested Q", node("assistant", "nested A"))),
        node("prompter", "bare Q", node("assistant", "bare A")),
        msg("a", "p", "assistant", "flat A"),  # the flat tree stays where its root is
        {"text": "### Human: t2 ### Assistant: t2a"},
    ]
    result = run(rows, numbers=[1, 2, 4, 5, 7, 9])  # line numbers, blank lines skipped
    assert result.conversations == [
        (1, [user("t1"), bot("t1a")]),
        (2, [user("flat Q"), bot("flat A")]),
        (4, [user("nested Q"), bot("nested A")]),
        (5, [user("bare Q"), bot("bare A")]),
        (9, [user("t2"), bot("t2a")]),
    ]
    assert result.problems == []
    assert (result.trees, result.paths, result.text_rows) == (3, 3, 2)


def test_nested_rows_mixed_into_a_flat_file_are_used_and_flat_rows_may_reply_to_them():
    rows = [
        msg("p", None, "prompter", "flat Q"),
        msg("a", "p", "assistant", "flat A"),
        tree(node("prompter", "nested Q", node("assistant", "nested A", message_id="na"), message_id="nq")),
        msg("f", "na", "prompter", "flat follow-up to a nested answer"),
        msg("g", "f", "assistant", "flat answer"),
    ]
    result = run(rows)
    assert result.conversations == [
        (1, [user("flat Q"), bot("flat A")]),
        (3, [user("nested Q"), bot("nested A"), user("flat follow-up to a nested answer"), bot("flat answer")]),
    ]
    assert result.problems == []


# --- best vs all ------------------------------------------------------------------------------


def test_three_branches_best_gives_one_path_all_gives_three():
    best = run([THREE_BRANCHES], paths="best")
    assert best.conversations == [(1, [user("Q"), bot("A-rank0"), user("more?"), bot("B")])]
    assert (best.trees, best.paths, best.replies_used, best.replies_total) == (1, 1, 2, 4)
    assert best.summary() == "oasst: 1 tree -> 1 path, 2 of 4 assistant replies used"

    every = run([THREE_BRANCHES], paths="all")
    assert every.conversations == [  # best first, then by rank
        (1, [user("Q"), bot("A-rank0"), user("more?"), bot("B")]),
        (1, [user("Q"), bot("A-rank1")]),
        (1, [user("Q"), bot("A-rank2")]),
    ]
    assert (every.trees, every.paths, every.replies_used, every.replies_total) == (1, 3, 4, 4)
    assert every.summary() == "oasst: 1 tree -> 3 paths, 4 of 4 assistant replies used"


def test_all_paths_cut_trailing_prompters_and_do_not_repeat_a_prefix():
    rows = [
        tree(
            node(
                "prompter", "Q",
                node(
                    "assistant", "A",
                    node("prompter", "unanswered follow-up"),  # cut to [Q, A]: already in the next path
                    node("prompter", "F1", node("assistant", "B1"), node("assistant", "B2", rank=0)),
                    node("prompter", "F2 unanswered"),
                ),
                node("assistant", "C", node("prompter", "dangling")),  # cut to [Q, C]
            )
        )
    ]
    every = run(rows, paths="all")
    assert every.conversations == [
        (1, [user("Q"), bot("A"), user("F1"), bot("B2")]),  # ranked before unranked
        (1, [user("Q"), bot("A"), user("F1"), bot("B1")]),
        (1, [user("Q"), bot("C")]),
    ]
    assert (every.paths, every.replies_used, every.replies_total) == (3, 4, 4)
    best = run(rows, paths="best")
    # the first reply at each branch: A, then its first prompter reply (a leaf), cut after A
    assert best.conversations == [(1, [user("Q"), bot("A")])]
    assert (best.paths, best.replies_used, best.replies_total) == (1, 1, 4)


def test_best_and_all_on_flat_rows_with_several_trees():
    rows = [
        msg("p1", None, "prompter", "Q1"),
        msg("a1", "p1", "assistant", "A1"),
        msg("a2", "p1", "assistant", "A2"),
        msg("p2", None, "prompter", "Q2 nobody answered"),
        msg("p3", None, "prompter", "Q3"),
        msg("a3", "p3", "assistant", "A3"),
    ]
    best = run(rows, paths="best")
    assert best.conversations == [(1, [user("Q1"), bot("A1")]), (5, [user("Q3"), bot("A3")])]
    assert best.summary() == (
        "oasst: 3 trees -> 2 paths, 2 of 3 assistant replies used; 1 tree without an assistant reply"
    )
    every = run(rows, paths="all")
    assert every.conversations == [
        (1, [user("Q1"), bot("A1")]),
        (1, [user("Q1"), bot("A2")]),
        (5, [user("Q3"), bot("A3")]),
    ]
    assert (every.trees, every.paths, every.replies_used, every.replies_total, every.unanswered) == (3, 3, 3, 3, 1)


def test_paths_must_be_best_or_all():
    assert OASST_PATHS == ("best", "all")
    with pytest.raises(DataError, match=r"^dataset\.oasst_paths is 'every'; use 'best' or 'all'"):
        run([THREE_BRANCHES], paths="every")


# --- ranks and ties ---------------------------------------------------------------------------


def test_lowest_rank_wins_unranked_come_after_ranked_file_order_breaks_ties():
    rows = [
        msg("p", None, "prompter", "Q"),
        msg("u", "p", "assistant", "unranked, first in the file"),
        msg("r2", "p", "assistant", "rank 2", rank=2),
        msg("r1a", "p", "assistant", "rank 1, first", rank=1),
        msg("r1b", "p", "assistant", "rank 1, second", rank=1.0),
    ]
    assert run(rows).conversations == [(1, [user("Q"), bot("rank 1, first")])]
    assert [conv[-1]["content"] for _, conv in run(rows, paths="all").conversations] == [
        "rank 1, first",
        "rank 1, second",
        "rank 2",
        "unranked, first in the file",
    ]


def test_without_ranks_the_first_reply_wins_in_file_and_list_order():
    flat = [msg("p", None, "prompter", "Q"), msg("x", "p", "assistant", "first"), msg("y", "p", "assistant", "second")]
    assert run(flat).conversations == [(1, [user("Q"), bot("first")])]
    nested = [tree(node("prompter", "Q", node("assistant", "first"), node("assistant", "second")))]
    assert run(nested).conversations == [(1, [user("Q"), bot("first")])]


def test_a_flat_reply_before_its_parent_in_the_file_is_still_linked():
    rows = [msg("a", "p", "assistant", "A"), msg("p", None, "prompter", "Q")]
    assert run(rows).conversations == [(2, [user("Q"), bot("A")])]


# --- deleted ----------------------------------------------------------------------------------


def test_deleted_flat_messages_and_their_subtrees_are_skipped():
    rows = [
        msg("p", None, "prompter", "Q"),
        msg("a", "p", "assistant", "best but deleted", rank=0, deleted=True),
        msg("f", "a", "prompter", "under a deleted reply"),
        msg("g", "f", "assistant", "two levels under"),
        msg("b", "p", "assistant", "kept", rank=1, deleted=False),
        {"message_id": "d", "parent_id": "p", "deleted": True},  # a deleted row needs nothing else
    ]
    for paths in OASST_PATHS:
        result = run(rows, paths=paths)
        assert result.conversations == [(1, [user("Q"), bot("kept")])]
        assert result.problems == []
        assert (result.replies_used, result.replies_total, result.deleted) == (1, 1, 4)
    assert result.summary() == "oasst: 1 tree -> 1 path, 1 of 1 assistant reply used; 4 deleted messages skipped"


def test_deleted_nested_messages_and_their_subtrees_are_skipped():
    rows = [
        tree(
            node(
                "prompter", "Q",
                node("assistant", "deleted", node("prompter", "below", node("assistant", "deeper")), rank=0, deleted=True),
                node("assistant", "kept", rank=1),
            )
        ),
        tree(node("prompter", "deleted root", node("assistant", "A"), deleted=True)),
    ]
    result = run(rows, paths="all")
    assert result.conversations == [(1, [user("Q"), bot("kept")])]
    assert result.problems == []
    assert (result.trees, result.replies_total, result.deleted) == (1, 1, 5)


def test_flat_reply_to_a_deleted_nested_message_is_skipped_too():
    rows = [
        tree(node("prompter", "Q", node("assistant", "gone", message_id="x", deleted=True), node("assistant", "A"))),
        msg("f", "x", "prompter", "reply to the deleted one"),
    ]
    result = run(rows)
    assert result.conversations == [(1, [user("Q"), bot("A")])]
    assert result.problems == []
    assert result.deleted == 2


def test_deleted_messages_need_no_other_fields_and_are_never_problems():
    rows = [
        {"deleted": True, "parent_id": "p"},  # no message_id
        {"message_id": "d", "parent_id": 3, "deleted": True},  # odd parent_id: not read
        tree(node("prompter", "Q", {"deleted": True, "replies": "garbage"}, node("assistant", "A"))),
        msg("r", "d", "assistant", "reply to a deleted row"),
    ]
    result = run(rows)
    assert result.problems == []
    assert result.conversations == [(3, [user("Q"), bot("A")])]
    assert result.deleted == 4


def test_numbers_must_match_rows():
    with pytest.raises(ValueError, match="2 rows but 1 row numbers"):
        oasst_conversations([{"text": "x"}, {"text": "y"}], [1], source="t")


# --- problems ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (msg("m", None, "bot", "x"), "field 'role' is 'bot'; expected 'prompter' or 'assistant'"),
        ({"message_id": "m", "parent_id": None, "text": "x"}, "missing field 'role' (oasst rows need"),
        ({"message_id": "m", "parent_id": None, "role": "prompter"}, "missing field 'text' (oasst rows need"),
        (msg("m", None, "prompter", "   "), "field 'text' is empty"),
        (msg("m", None, "prompter", 5), "field 'text' must be a string, got a number"),
        ({"message_id": 7, "parent_id": None, "role": "prompter", "text": "x"},
         "field 'message_id' must be a non-empty string, got a number"),
        ({"parent_id": "p", "role": "assistant", "text": "x"}, "missing field 'message_id' (oasst rows need"),
        (msg("m", ["p"], "prompter", "x"), "field 'parent_id' must be a string or null, got a list"),
        (msg("m", None, "prompter", "x", rank=True), "field 'rank' must be a number or null, got a boolean"),
        (msg("m", None, "prompter", "x", deleted="yes"), "field 'deleted' must be true, false or null, got a string"),
        (msg("m", "nope", "assistant", "x"),
         "field 'parent_id' is 'nope', which matches no message_id in the file; include the message it replies to"),
        (msg("m", "m", "prompter", "x"), "field 'parent_id' is 'm', the message's own message_id"),
        (msg("m", None, "assistant", "x"),
         "a conversation must start with a prompter message, but root message 'm' has role 'assistant'"),
        (["not", "an", "object"], "expected a JSON object, got a list"),
        ({"title": "x"}, "missing field 'text' (oasst rows need"),
        ({"text": "Hello ### Assistant: hi"}, "field 'text' must start with '### Human:'"),
        ({"text": "### Human: q ### Assistant:   "}, "field 'text': turn 2 ('### Assistant:') is empty"),
        ({"text": "### Human: q"}, "field 'text' has no assistant turn to learn from"),
        ({"prompt": "What is 2+2?", "response": "4"}, "field 'prompt' must be a message object with role, text and replies"),
        (tree(node("prompter", "Q", node("assistant", "A"), {"role": "assistant"})),
         "prompt.replies[1].text: missing (every message in a tree needs role and text)"),
        (tree(node("prompter", "Q", node("assistant", "A", node("bot", "x")))),
         "prompt.replies[0].replies[0].role is 'bot'; expected 'prompter' or 'assistant'"),
        (tree(node("prompter", "Q", "just a string")),
         "prompt.replies[0] must be a message object with role and text, got a string"),
        (tree({"role": "prompter", "text": "Q", "replies": {"role": "assistant", "text": "A"}}),
         "prompt.replies must be a list of messages, got an object"),
        (tree(node("prompter", "Q", node("assistant", "A", rank="1"))),
         "prompt.replies[0].rank must be a number or null, got a string"),
        (tree(node("prompter", "Q", node("assistant", "A", message_id=""))),
         "prompt.replies[0].message_id must be a non-empty string, got a string"),
        (tree(node("assistant", "A", node("prompter", "Q"))),
         "a conversation must start with a prompter message, but 'prompt' has role 'assistant'"),
        (node("assistant", "A"), "a conversation must start with a prompter message, but the root message has role"),
        (node("prompter", "Q", {"role": "assistant", "text": None}), "replies[0].text: missing"),
        (tree(node("prompter", "Q", node("prompter", "Q again"))),
         "prompt.replies[0].role is 'prompter' like the message it replies to ('prompt'); "
         "replies must alternate between prompter and assistant"),
    ],
)
def test_each_bad_row_is_a_problem_naming_the_field(row, message):
    good = msg("ok", None, "prompter", "fine")
    result = run([good, msg("oka", "ok", "assistant", "fine too"), row])
    assert [number for number, _ in result.problems] == [3], result.problems
    assert result.problems[0][1].startswith(message), result.problems[0][1]
    assert result.conversations[0] == (1, [user("fine"), bot("fine too")])  # good rows still count


def test_problems_are_collected_not_raised_and_good_rows_are_kept():
    rows = [
        msg("p", None, "prompter", "Q"),
        msg("a", "p", "assistant", "A"),
        msg("x", None, "bot", "bad role"),
        {"text": "### Human: q ### Assistant: a"},
        msg("y", "missing", "assistant", "orphan"),
    ]
    result = run(rows, numbers=[10, 11, 12, 13, 14])
    assert result.conversations == [(10, [user("Q"), bot("A")]), (13, [user("q"), bot("a")])]
    assert [number for number, _ in result.problems] == [12, 14]
    assert result.summary().endswith("; 1 text row; 2 rows with problems")


def test_duplicate_message_id_names_both_rows_and_the_first_copy_is_used():
    rows = [
        msg("m", None, "prompter", "Q"),
        msg("m", None, "prompter", "Q copy"),
        msg("a", "m", "assistant", "A"),
    ]
    result = run(rows)
    assert result.problems == [
        (2, "message_id 'm' appears twice (also row 1); every message needs its own message_id, so remove the copy")
    ]
    assert result.conversations == [(1, [user("Q"), bot("A")])]


def test_duplicate_message_id_inside_and_across_nested_trees():
    rows = [
        msg("m", None, "prompter", "flat Q"),
        tree(node("prompter", "Q", node("assistant", "A", message_id="m"), node("assistant", "B"))),
    ]
    result = run(rows)
    assert len(result.problems) == 1
    number, message = result.problems[0]
    assert number == 2
    assert message.startswith("prompt.replies[0].message_id 'm' appears twice (also row 1)")
    assert result.conversations == [(2, [user("Q"), bot("B")])]


def test_replies_below_a_bad_message_are_reported_not_dropped():
    rows = [
        msg("p", None, "prompter", "Q"),
        msg("a", "p", "assistant", ""),  # empty text: row 2 is bad
        msg("f", "a", "prompter", "follow-up"),
        msg("g", "f", "assistant", "answer"),
        msg("b", "p", "assistant", "other answer"),
    ]
    result = run(rows)
    assert result.conversations == [(1, [user("Q"), bot("other answer")])]
    assert result.problems == [
        (2, "field 'text' is empty; give every message its text"),
        (3, "field 'parent_id' is 'a', a message skipped because of the problem on row 2; fix row 2 to use this one"),
        (4, "field 'parent_id' is 'f', a message skipped because of the problem on row 2; fix row 2 to use this one"),
    ]


def test_replies_below_an_orphan_are_reported():
    rows = [msg("a", "gone", "assistant", "A"), msg("f", "a", "prompter", "F")]
    result = run(rows)
    assert [n for n, _ in result.problems] == [1, 2]
    assert result.problems[0][1].startswith("field 'parent_id' is 'gone', which matches no message_id")
    assert "problem on row 1" in result.problems[1][1]
    assert result.conversations == []


def test_a_parent_id_cycle_is_reported_for_every_message_in_it():
    rows = [
        msg("p", None, "prompter", "Q"),
        msg("a", "p", "assistant", "A"),
        msg("c1", "c2", "prompter", "x"),
        msg("c2", "c1", "assistant", "y"),
    ]
    result = run(rows)
    assert result.conversations == [(1, [user("Q"), bot("A")])]
    assert [n for n, _ in result.problems] == [3, 4]
    for _, message in result.problems:
        assert message.startswith("field 'parent_id' is 'c")
        assert "never reaches a root message" in message and "cycle" in message


def test_a_bad_nested_reply_skips_its_subtree_and_keeps_the_rest_of_the_tree():
    rows = [
        tree(
            node(
                "prompter", "Q",
                node("assistant", "A", rank=1),
                node("assistant", 5, node("prompter", "F", node("assistant", "B")), rank=0),
            )
        )
    ]
    result = run(rows, paths="all")
    assert result.problems == [(1, "prompt.replies[1].text must be a string, got a number (skipped with the 2 replies below it)")]
    assert result.conversations == [(1, [user("Q"), bot("A")])]
    assert (result.trees, result.replies_total) == (1, 1)


def test_flat_alternation_problem_names_the_parent_row():
    rows = [msg("p", None, "prompter", "Q"), msg("q", "p", "prompter", "Q2"), msg("a", "p", "assistant", "A")]
    result = run(rows)
    assert result.problems == [
        (2, "field 'role' is 'prompter' like the message it replies to (message 'p', row 1); "
            "replies must alternate between prompter and assistant")
    ]
    assert result.conversations == [(1, [user("Q"), bot("A")])]


def test_no_row_is_dropped_silently():
    """Every row is in a conversation, reported as a problem, deleted, or an unanswered tree."""
    rows = [
        THREE_BRANCHES,
        tree(node("prompter", "nobody answered")),
        msg("p", None, "prompter", "flat Q"),
        msg("a", "p", "assistant", "flat A"),
        msg("x", "p", "assistant", "deleted", deleted=True),
        {"text": "### Human: h ### Assistant: a"},
        {"something": "else"},
        tree(node("prompter", "Q", {"role": "assistant"})),
    ]
    result = run(rows, paths="all")
    assert sorted({n for n, _ in result.conversations}) == [1, 3, 6]
    assert [n for n, _ in result.problems] == [7, 8]
    assert (result.trees, result.unanswered, result.deleted, result.text_rows) == (4, 2, 1, 1)
    assert result.summary() == (
        "oasst: 4 trees -> 4 paths, 5 of 5 assistant replies used; 2 trees without an assistant reply; "
        "1 text row; 1 deleted message skipped; 2 rows with problems"
    )


def test_empty_input():
    result = run([])
    assert result == OasstResult(conversations=[], problems=[], trees=0, paths=0, replies_used=0, replies_total=0)
    assert result.summary() == "oasst: 0 trees -> 0 paths, 0 of 0 assistant replies used"


def test_no_message_here_tells_users_to_raise_max_seq_length():
    assert "max_seq_length" not in Path(oasst.__file__).read_text()
