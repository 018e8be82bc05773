"""Open-Assistant rows -> conversations, for every layout the Open-Assistant exports come in.

Pure: no I/O, no tokenizer. `oasst_conversations` never raises for a bad row: it collects
`(row number, message)` problems and still returns the conversations of the good rows, so
the caller decides (skip_bad_rows) what to do with them. Every row is either used or
reported; a tree with no assistant reply is counted in `OasstResult.unanswered`.

Layouts (mixed freely in one file):

1. Flat messages, one per row (`*.messages.jsonl`, the Hugging Face oasst1/oasst2 datasets):
   {message_id, parent_id (null or absent: a root), role "prompter"/"assistant" ("user"
   accepted), text, rank?, deleted?, lang?, ...}.
2. Nested trees, one per row (`*.trees.jsonl`): {message_tree_id, tree_state, prompt:
   {message ... replies: [message, ...]}}, or a bare root message with "replies". Nested
   messages need role and text; message_id is optional (flat rows may reply to it).
3. One text column: {text: "### Human: ... ### Assistant: ..."} (any number of turns,
   optional leading "### System:"), as in timdettmers/openassistant-guanaco.

In a tree, deleted messages (deleted: true) and everything below them are skipped. Replies
must alternate between prompter and assistant. Paths (`dataset.oasst_paths`):

- "best": from the root follow the best reply at every branch (lowest rank; unranked after
  ranked; file / list order breaks ties) down to a leaf: one conversation per tree.
- "all": every root-to-leaf path. A path is cut after its last assistant message, and a cut
  path that is only the beginning of a longer one (it ends at an assistant message that has
  assistant replies below it) is not repeated: the loss is on every assistant turn, so the
  longer path already teaches it. Paths come best first, then depth-first, best reply first.

Trailing prompter messages are dropped everywhere; a tree without any assistant reply is
not a conversation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError, RowProblem
from .errors import json_kind as _kind

Turn = dict[str, str]
Conversation = list[Turn]

OASST_PATHS = ("best", "all")
OASST_NEEDS = (
    "oasst rows need message_id, parent_id, role and text, a message tree with replies, or a "
    "single text column in the '### Human: ... ### Assistant: ...' form"
)
TREE_NEEDS = "every message in a tree needs role and text"
OASST_ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}
TEXT_TURN_MARKER = re.compile(r"###\s*(Human|Assistant|System)\s*:", re.IGNORECASE)
TEXT_ROLES = {"human": "user", "assistant": "assistant", "system": "system"}


@dataclass
class OasstResult:
    """Conversations (with the row of the tree's root, or of the text row), the problems
    of bad rows, and the counts for the log line."""

    conversations: list[tuple[int, Conversation]]
    problems: list[tuple[int, str]]
    trees: int  # message trees with a usable prompter root, answered or not
    paths: int  # conversations made from those trees
    replies_used: int  # assistant messages in at least one conversation
    replies_total: int  # assistant messages in those trees (not counting deleted or bad ones)
    unanswered: int = 0  # trees without any assistant reply (no conversation)
    text_rows: int = 0  # conversations from one-column '### Human:' rows
    deleted: int = 0  # messages skipped as deleted, or as replies below a deleted one

    def summary(self) -> str:
        line = (
            f"oasst: {_count(self.trees, 'tree')} -> {_count(self.paths, 'path')}, "
            f"{self.replies_used} of {_count(self.replies_total, 'assistant reply', 'assistant replies')} used"
        )
        extra = []
        if self.unanswered:
            extra.append(f"{_count(self.unanswered, 'tree')} without an assistant reply")
        if self.text_rows:
            extra.append(f"{_count(self.text_rows, 'text row')}")
        if self.deleted:
            extra.append(f"{_count(self.deleted, 'deleted message')} skipped")
        if self.problems:
            extra.append(f"{_count(len({row for row, _ in self.problems}), 'row')} with problems")
        return "; ".join([line, *extra])


def oasst_conversations(rows: Sequence[Any], numbers: Sequence[int], *, source: str, paths: str = "best") -> OasstResult:
    """Rows of any oasst layout -> conversations in file order (a tree where its root is).

    `numbers` are the 1-based row numbers users see (one per row). `source` names the file;
    problems carry only the row number, so the caller can prefix `source row N:`."""
    if paths not in OASST_PATHS:
        raise DataError(f"dataset.oasst_paths is {paths!r}; use 'best' or 'all'")
    del source  # problems are (row, message); the caller adds the file
    if len(numbers) != len(rows):
        raise ValueError(f"oasst_conversations: {len(rows)} rows but {len(numbers)} row numbers")
    reader = _Reader()
    for index, (number, row) in enumerate(zip(numbers, rows)):
        reader.read(row, number, index)
    return reader.finish(paths)


def oasst_text_turns(row: dict[str, Any]) -> Conversation:
    """'### Human: ... ### Assistant: ...' (as in timdettmers/openassistant-guanaco)."""
    text = _text(row, "text", "", needs=OASST_NEEDS)
    parts = TEXT_TURN_MARKER.split(text)
    if parts[0].strip():
        raise RowProblem("field 'text' must start with '### Human:' (or '### System:')")
    turns = []
    for n, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), start=1):
        if not content.strip():
            raise RowProblem(f"field 'text': turn {n} ('### {speaker}:') is empty")
        turns.append({"role": TEXT_ROLES[speaker.lower()], "content": content.strip()})
    for i, turn in enumerate(turns):
        if turn["role"] == "system" and i != 0:
            raise RowProblem(f"field 'text': turn {i + 1}: a system turn must come first")
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    if not turns:
        raise RowProblem("field 'text' has no assistant turn to learn from")
    return turns


# --- messages -------------------------------------------------------------------------------

OK, DELETED, BAD = "ok", "deleted", "bad"


@dataclass(eq=False)
class _Node:
    id: str | None
    row: int  # 1-based row number
    index: int  # row position, for output order
    order: int  # file / list order, breaks rank ties
    where: str  # "" for a row's own fields, "prompt.replies[1]" inside a nested tree
    flat: bool  # one message per row (linked by parent_id) rather than nested
    state: str = OK
    parent_id: str | None = None  # flat rows only
    role: str = ""  # "user" or "assistant"
    raw_role: str = ""
    text: str = ""
    rank: float | None = None
    origin: int = 0  # for BAD: the row whose problem this is
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)
    live: list[_Node] = field(default_factory=list)  # children that are used

    def label(self) -> str:
        return f"message {self.id!r}" if self.id else (f"'{self.where}'" if self.where else "the row's message")

    def root_label(self) -> str:
        return f"root message {self.id!r}" if self.id else (f"'{self.where}'" if self.where else "the root message")


def _best_reply(m: _Node) -> tuple[bool, float, int]:
    return (m.rank is None, m.rank if m.rank is not None else 0.0, m.order)


class _Reader:
    def __init__(self) -> None:
        self.problems: list[tuple[int, str]] = []
        self.by_id: dict[str, _Node] = {}
        self.flat: list[_Node] = []  # flat rows, in file order (messages and stubs)
        self.tops: list[_Node] = []  # where walks start: roots, and messages no root reaches
        self.nodes: list[_Node] = []  # every node, to find the unreachable ones
        self.texts: list[tuple[int, int, Conversation]] = []
        self.order = 0
        self.deleted = 0

    # --- rows -----------------------------------------------------------------------------

    def read(self, row: Any, number: int, index: int) -> None:
        if not isinstance(row, dict):
            self.problem(number, f"expected a JSON object, got {_kind(row)}")
        elif "prompt" in row:
            prompt = row["prompt"]
            if not isinstance(prompt, dict):
                self.problem(
                    number,
                    f"field 'prompt' must be a message object with role, text and replies (an Open-Assistant "
                    f"*.trees.jsonl tree), got {_kind(prompt)}",
                )
            else:
                self.nested(prompt, number, index, "prompt")
        elif "replies" in row:
            self.nested(row, number, index, "")
        elif "message_id" in row or "parent_id" in row:
            self.flat_row(row, number, index)
        elif "role" in row:  # a root message with no replies, as trees exports write leaves
            self.nested(row, number, index, "")
        elif "text" in row:
            try:
                self.texts.append((index, number, oasst_text_turns(row)))
            except RowProblem as problem:
                self.problem(number, str(problem))
        else:
            self.problem(number, f"missing field 'text' ({OASST_NEEDS})")

    def flat_row(self, row: dict[str, Any], number: int, index: int) -> None:
        node = _Node(None, number, index, self.next_order(), "", flat=True)
        try:
            if _deleted(row, ""):  # only its id is read, for the replies below it: nothing to fix
                self.deleted += 1
                node.state, node.id = DELETED, _valid_id(row.get("message_id"))
                node.parent_id = _parent_id(row, lenient=True)
                if node.id is None:
                    return
            else:
                node.id = _message_id(row, "", required=True)
                node.parent_id = _parent_id(row)
                _fill(node, row, "", needs=OASST_NEEDS)
        except RowProblem as problem:
            self.problem(number, str(problem))
            node.state, node.origin = BAD, number
            node.id = _valid_id(row.get("message_id"))
            node.parent_id = None
        if not self.register(node, "field 'message_id'"):
            return
        self.flat.append(node)
        self.nodes.append(node)

    def nested(self, root: dict[str, Any], number: int, index: int, where: str) -> None:
        stack: list[tuple[Any, str, _Node | None]] = [(root, where, None)]
        while stack:
            message, where, parent = stack.pop()
            if not isinstance(message, dict):
                self.problem(number, f"{where} must be a message object with role and text, got {_kind(message)}")
                continue
            node = _Node(None, number, index, self.next_order(), where, flat=False)
            try:
                if _deleted(message, where):  # nothing else of it is read: nothing to fix
                    self.deleted += _count_messages(message)
                    node.state, node.id = DELETED, _valid_id(message.get("message_id"))
                else:
                    node.id = _message_id(message, where, required=False)
                    _fill(node, message, where, needs=TREE_NEEDS)
            except RowProblem as problem:
                below = _count_messages(message) - 1
                text = str(problem) + (f" (skipped with the {_count(below, 'reply', 'replies')} below it)" if below else "")
                self.problem(number, text)
                node.state, node.origin = BAD, number
                node.id = _valid_id(message.get("message_id"))
            if not self.register(node, f"{_name(where, 'message_id')}"):
                continue
            self.nodes.append(node)
            if parent is None:
                self.tops.append(node)
            else:
                node.parent = parent
                parent.children.append(node)
            if node.state != OK:
                continue
            replies = message.get("replies")
            if replies is None:
                continue
            if not isinstance(replies, list):
                self.problem(number, f"{_name(where, 'replies')} must be a list of messages, got {_kind(replies)}")
                continue
            prefix = f"{where}.replies" if where else "replies"
            for i in reversed(range(len(replies))):
                stack.append((replies[i], f"{prefix}[{i}]", node))
            # the order counter is taken when a message is popped: list order within replies

    def register(self, node: _Node, name: str) -> bool:
        if node.id is None:
            return True
        first = self.by_id.get(node.id)
        if first is None:
            self.by_id[node.id] = node
            return True
        if node.state != DELETED:
            where = f"{name} {node.id!r}" if node.where else f"message_id {node.id!r}"
            if node.state == BAD:
                return False  # already reported; the first copy is the one replies link to
            self.problem(
                node.row,
                f"{where} appears twice (also row {first.row}); every message needs its own message_id, "
                "so remove the copy" + (" (skipped, with any replies below it)" if not node.flat else ""),
            )
        return False

    def next_order(self) -> int:
        self.order += 1
        return self.order

    def problem(self, row: int, message: str) -> None:
        self.problems.append((row, message))

    # --- trees ----------------------------------------------------------------------------

    def finish(self, paths: str) -> OasstResult:
        for node in self.flat:
            if node.state == BAD or node.parent_id is None:
                self.tops.append(node)
            elif node.parent_id in self.by_id and self.by_id[node.parent_id] is not node:
                node.parent = self.by_id[node.parent_id]
                node.parent.children.append(node)
            elif node.state == DELETED:
                self.tops.append(node)  # a deleted reply to nothing: nothing to fix either
            elif node.parent_id == node.id:
                self.problem(node.row, f"field 'parent_id' is {node.parent_id!r}, the message's own message_id; "
                                       "set it to the message this one replies to, or null for a root")
                node.state, node.origin = BAD, node.row
                self.tops.append(node)
            else:
                self.problem(
                    node.row,
                    f"field 'parent_id' is {node.parent_id!r}, which matches no message_id in the file; "
                    "include the message it replies to, or set parent_id to null to start a new tree",
                )
                node.state, node.origin = BAD, node.row
                self.tops.append(node)
        for siblings in [n.children for n in self.nodes]:
            siblings.sort(key=lambda n: n.order)
        self.tops.sort(key=lambda n: (n.index, n.order))

        seen: set[int] = set()
        roots: list[_Node] = []
        for top in self.tops:
            if top.state == OK:
                if top.role != "user":
                    self.problem(
                        top.row,
                        f"a conversation must start with a prompter message, but {top.root_label()} has role "
                        f"{top.raw_role!r}; start the tree with the prompter's message",
                    )
                    top.state, top.origin = BAD, top.row
                else:
                    roots.append(top)
            self.walk(top, seen)
        for node in self.nodes:
            if id(node) not in seen and node.flat and node.state == OK:
                self.problem(
                    node.row,
                    f"field 'parent_id' is {node.parent_id!r}, but following parent_id from this message never "
                    "reaches a root message (one with parent_id null): the messages form a cycle; "
                    "point one of them at the message it replies to, or set its parent_id to null",
                )

        items: list[tuple[int, int, int, Conversation]] = [(i, 0, n, c) for i, n, c in self.texts]
        used: set[int] = set()
        total = answered = made = 0
        for root in roots:
            convs = _best_path(root) if paths == "best" else _all_paths(root)
            for seq, path in enumerate(convs):
                items.append((root.index, seq, root.row, [{"role": m.role, "content": m.text} for m in path]))
                used.update(id(m) for m in path if m.role == "assistant")
            total += _assistants(root)
            made += len(convs)
            answered += bool(convs)
        items.sort(key=lambda item: (item[0], item[1]))
        problems = sorted(self.problems, key=lambda p: p[0])
        return OasstResult(
            conversations=[(number, conv) for _, _, number, conv in items],
            problems=problems,
            trees=len(roots),
            paths=made,
            replies_used=len(used),
            replies_total=total,
            unanswered=len(roots) - answered,
            text_rows=len(self.texts),
            deleted=self.deleted,
        )

    def walk(self, top: _Node, seen: set[int]) -> None:
        """Marks what a top node reaches: live messages get `live` children; replies below a
        deleted message are counted as deleted, replies below a bad one are reported."""
        reported: set[int] = set()
        stack: list[tuple[_Node, str, int]] = [(top, top.state, top.origin)]
        while stack:
            node, mode, origin = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if mode == DELETED and node.flat and node.state != DELETED and node is not top:
                self.deleted += 1
            if mode == BAD and node.flat and node.state == OK and node.row not in reported:
                reported.add(node.row)
                self.problem(
                    node.row,
                    f"field 'parent_id' is {node.parent_id!r}, a message skipped because of the problem on row "
                    f"{origin}; fix row {origin} to use this one",
                )
            for child in node.children:
                if child.state == DELETED or mode == DELETED:  # deleted: nothing to fix below it
                    stack.append((child, DELETED, 0))
                elif mode == BAD:
                    stack.append((child, BAD, origin))
                elif child.state == BAD:
                    stack.append((child, BAD, child.origin))
                elif child.role == node.role:
                    self.problem(
                        child.row,
                        f"{_name(child.where, 'role')} is {child.raw_role!r} like the message it replies to "
                        f"({node.label()}{'' if node.row == child.row else f', row {node.row}'}); "
                        "replies must alternate between prompter and assistant"
                        + (" (skipped with its replies)" if not child.flat and child.children else ""),
                    )
                    child.state, child.origin = BAD, child.row
                    stack.append((child, BAD, child.row))
                else:
                    node.live.append(child)
                    stack.append((child, OK, 0))


def _cut(path: list[_Node]) -> list[_Node]:
    while path and path[-1].role != "assistant":
        path = path[:-1]
    return path


def _best_path(root: _Node) -> list[list[_Node]]:
    path = [root]
    while path[-1].live:
        path.append(min(path[-1].live, key=_best_reply))
    path = _cut(path)
    return [path] if path else []


def _all_paths(root: _Node) -> list[list[_Node]]:
    """One path per assistant message with no assistant message below it."""
    order: list[_Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.live)
    below: dict[int, bool] = {}  # an assistant message somewhere below
    for node in reversed(order):
        below[id(node)] = any(c.role == "assistant" or below[id(c)] for c in node.live)
    out = []
    walk: list[list[_Node]] = [[root]]
    while walk:
        path = walk.pop()
        node = path[-1]
        if node.role == "assistant" and not below[id(node)]:
            out.append(path)
        for child in sorted(node.live, key=_best_reply, reverse=True):
            walk.append([*path, child])
    return out


def _assistants(root: _Node) -> int:
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += node.role == "assistant"
        stack.extend(node.live)
    return count


# --- fields ---------------------------------------------------------------------------------


def _name(where: str, name: str) -> str:
    """How a problem names a field: "field 'role'" on a row, "prompt.replies[1].role" nested."""
    return f"{where}.{name}" if where else f"field '{name}'"


def _missing(where: str, name: str, needs: str) -> RowProblem:
    if where:
        return RowProblem(f"{where}.{name}: missing ({needs})")
    return RowProblem(f"missing field '{name}' ({needs})")


def _text(row: dict[str, Any], name: str, where: str, *, needs: str) -> str:
    if row.get(name) is None:
        raise _missing(where, name, needs)
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem(f"{_name(where, name)} must be a string, got {_kind(value)}")
    if not value.strip():
        raise RowProblem(f"{_name(where, name)} is empty; give every message its text")
    return value


def _deleted(row: dict[str, Any], where: str) -> bool:
    value = row.get("deleted")
    if value is not None and not isinstance(value, bool):
        raise RowProblem(f"{_name(where, 'deleted')} must be true, false or null, got {_kind(value)}")
    return value is True


def _valid_id(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _message_id(row: dict[str, Any], where: str, *, required: bool) -> str | None:
    if "message_id" not in row or row["message_id"] is None:
        if required:
            raise _missing(where, "message_id", OASST_NEEDS)
        return None
    value = row["message_id"]
    if not isinstance(value, str) or not value:
        raise RowProblem(f"{_name(where, 'message_id')} must be a non-empty string, got {_kind(value)}")
    return value


def _parent_id(row: dict[str, Any], *, lenient: bool = False) -> str | None:
    value = row.get("parent_id")
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        if lenient:
            return None
        raise RowProblem(f"field 'parent_id' must be a string or null, got {_kind(value)}")
    return value


def _fill(node: _Node, row: dict[str, Any], where: str, *, needs: str) -> None:
    if row.get("role") is None:
        raise _missing(where, "role", needs)
    raw = row["role"]
    role = OASST_ROLES.get(raw) if isinstance(raw, str) else None
    if role is None:
        raise RowProblem(f"{_name(where, 'role')} is {raw!r}; expected 'prompter' or 'assistant'")
    node.raw_role, node.role = raw, role
    node.text = _text(row, "text", where, needs=needs)
    rank = row.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int | float)):
        raise RowProblem(f"{_name(where, 'rank')} must be a number or null, got {_kind(rank)}")
    node.rank = rank


def _count_messages(message: Any) -> int:
    count, stack = 0, [message]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict):
            continue
        count += 1
        replies = item.get("replies")
        if isinstance(replies, list):
            stack.extend(replies)
    return count


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"
