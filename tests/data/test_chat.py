"""Chat conversations: the rendered text, and a loss mask that is 1 exactly on the learnt turns.

The oracle works on characters: the conversation is written out by hand in RWKV World's form, the
spans of the assistant turns (content and ending blank line) are found in that string, and each
token's mask must be 1 exactly when the token's characters lie inside such a span.
"""

from __future__ import annotations

import pytest

from rwkv_infctx.cli import main
from rwkv_infctx.data import DataConfig
from rwkv_infctx.data.config import RESULT_OPTIONS
from rwkv_infctx.errors import UserError
from rwkv_infctx.tokenizer import load_tokenizer
from rwkv_infctx.training.segments import plan_segments
from tests.data.conftest import build, rows, write_jsonl
from tests.data.test_bad_input import fails

CHATS = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi!\n\nCan you help me?"},
        {"role": "assistant", "content": "Of course.\n\n\nWhat do you need?  "},
        {"role": "user", "content": "Write a haiku about rain."},
        {
            "role": "assistant",
            "content": "Soft rain on the roof\r\nwhispers to the sleeping town\nmorning smells of earth",
        },
        {"role": "user", "content": "Thanks, one more about the sea please."},
        {
            "role": "assistant",
            "content": "Grey waves fold and break\nsalt wind writes on the sand\nthe tide takes it back",
        },
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
]
# The same conversations as RWKV World models read them, and the text each one learns.
RENDERED = [
    "System: You are a helpful assistant.\n\n"
    "User: Hi!\nCan you help me?\n\n"
    "Assistant: Of course.\nWhat do you need?\n\n"
    "User: Write a haiku about rain.\n\n"
    "Assistant: Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth\n\n"
    "User: Thanks, one more about the sea please.\n\n"
    "Assistant: Grey waves fold and break\nsalt wind writes on the sand\nthe tide takes it back\n\n",
    "User: 2+2?\n\nAssistant: 4\n\n",
]
LEARNT = [
    [
        " Of course.\nWhat do you need?\n\n",
        " Soft rain on the roof\nwhispers to the sleeping town\nmorning smells of earth\n\n",
        " Grey waves fold and break\nsalt wind writes on the sand\nthe tide takes it back\n\n",
    ],
    [" 4\n\n"],
]


def chats_jsonl(tmp_path, chats=CHATS):
    return write_jsonl(tmp_path / "chats.jsonl", [{"messages": m, "id": i} for i, m in enumerate(chats)])


def learnt_chars(text: str, learnt: list[str]) -> list[bool]:
    """Per character of `text`: inside one of the `learnt` spans (found in order after 'Assistant:')."""
    inside = [False] * len(text)
    at = 0
    for span in learnt:
        at = text.index("Assistant:" + span, at) + len("Assistant:")
        inside[at : at + len(span)] = [True] * len(span)
        at += len(span)
    return inside


def expected_mask(ids: list[int], text: str, learnt: list[str], tokenizer: str) -> list[int]:
    """1 for a token whose characters are all learnt; fails if a token straddles a span's edge."""
    tok = load_tokenizer(tokenizer)
    inside = learnt_chars(text, learnt)
    mask, start = [], 0
    for j in range(len(ids)):
        end = len(tok.decode(ids[: j + 1]))
        covered = set(inside[start:end])
        assert len(covered) == 1, f"token {j} {tok.decode([ids[j]])!r} straddles a learnt span's edge"
        mask.append(int(covered.pop()))
        start = end
    assert start == len(text)
    return mask


def test_world_template_text_and_mask_token_by_token(tmp_path):
    done, splits = build(
        tmp_path, source=str(chats_jsonl(tmp_path)), tokenizer="world", messages_column="messages"
    )
    world = load_tokenizer("world")
    got = rows(splits["train"])
    assert len(got) == 2
    for (ids, mask), text, learnt in zip(got, RENDERED, LEARNT, strict=True):
        assert world.decode(ids) == text
        assert mask == expected_mask(ids, text, learnt, "world")
        # the pieces give the tokens the runtime gets from encoding the whole text
        assert ids == world.encode(text)
    assert done.metadata["dropped"]["bad_chat_rows"] == 0


def test_turns_split_across_ctx_len_segments(tmp_path):
    from rwkv_infctx.data import RWKVDataModule

    dm = RWKVDataModule(
        source=str(chats_jsonl(tmp_path)),
        tokenizer="world",
        messages_column="messages",
        data_path=str(tmp_path / "p"),
        batch_size=2,
        shuffle=False,
    )
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    ctx_len, T = 8, batch["target_ids"].shape[1]
    crossings = 0
    for row, (text, learnt) in enumerate(zip(RENDERED, LEARNT, strict=True)):
        ids = load_tokenizer("world").encode(text)
        mask = expected_mask(ids, text, learnt, "world")
        n = len(ids) - 1
        for seg in plan_segments(T, ctx_len):
            s, e = seg.start, seg.end
            assert batch["target_ids"][row, s:e].tolist() == (ids[1:] + [0] * T)[s:e]
            assert batch["loss_mask"][row, s:e].tolist() == (mask[1:] + [0] * T)[s:e]
            # an assistant turn runs on across this segment's end into the next one
            crossings += e < n and mask[1:][e - 1] == 1 and mask[1:][e] == 1
    assert crossings >= 3


def test_custom_template_and_learnt_roles(tmp_path):
    chats = [
        [
            {"role": "user", "content": "Hello\n\nthere"},
            {"role": "bot", "content": "General Kenobi"},
            {"role": "user", "content": "You are a bold one."},
            {"role": "bot", "content": "Kill him!\n\n"},
        ]
    ]
    text = "<u>Hello\n\nthere</s>\n<b>General Kenobi</s>\n<u>You are a bold one.</s>\n<b>Kill him!\n\n</s>\n"
    _, splits = build(
        tmp_path,
        source=str(chats_jsonl(tmp_path, chats)),
        messages_column="messages",
        chat_roles={"user": "<u>", "bot": "<b>"},
        chat_content_prefix="",
        chat_separator="</s>\n",
        chat_learnt_roles=["bot", "user"],
        chat_collapse_newlines=False,
    )
    [(ids, mask)] = rows(splits["train"])
    assert load_tokenizer("neox").decode(ids) == text
    spans = [
        "Hello\n\nthere</s>\n",
        "General Kenobi</s>\n",
        "You are a bold one.</s>\n",
        "Kill him!\n\n</s>\n",
    ]
    inside = [False] * len(text)
    at = 0
    for span in spans:
        at = text.index(span, at)
        inside[at : at + len(span)] = [True] * len(span)
        at += len(span)
    tok, start = load_tokenizer("neox"), 0
    for j, m in enumerate(mask):
        end = len(tok.decode(ids[: j + 1]))
        assert {int(x) for x in inside[start:end]} == {m}
        start = end


BAD = [
    (
        [{"role": "tool", "content": "x"}],
        r"row 1: turn 0 has unknown role 'tool' \(known: system, user, assistant\)",
    ),
    (
        [{"role": "user", "content": "x"}, {"role": "assistant"}],
        r"row 1: turn 1 \(assistant\) has no content",
    ),
    ([{"content": "x"}], r"row 1: turn 0 has no role"),
    ([{"role": "user", "content": "x"}], r"row 1: has no assistant turn with content"),
    (
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \n"}],
        r"row 1: has no assistant turn",
    ),
    ([], r"row 1: has no turns"),
]


@pytest.mark.parametrize(("messages", "match"), BAD)
def test_bad_row_stops_the_build_in_one_line(tmp_path, messages, match):
    path = chats_jsonl(tmp_path, [CHATS[1], messages, CHATS[0]])
    fails(
        tmp_path,
        match + r".*\(or set data.chat_bad_rows: drop\)$",
        source=str(path),
        messages_column="messages",
    )


def test_bad_rows_dropped_and_counted(tmp_path, capsys):
    path = chats_jsonl(tmp_path, [CHATS[1]] + [m for m, _ in BAD] + [CHATS[0]])
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  source: {path}\n  tokenizer: world\n  data_path: {tmp_path / 'p'}\n"
        "  messages_column: messages\n  chat_bad_rows: drop\n"
    )
    with pytest.warns(UserWarning, match=r"dropped 6 chat rows .*\(first: .*row 1: turn 0 has unknown role"):
        assert main(["preload", "-c", str(config)]) == 0
    assert "dropped: 6 bad chat rows" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="dropped 6 chat rows"):
        _, splits = build(
            tmp_path, source=str(path), messages_column="messages", chat_bad_rows="drop", tokenizer="world"
        )
    world = load_tokenizer("world")
    assert [world.decode(ids) for ids, _ in rows(splits["train"])] == [RENDERED[1], RENDERED[0]]


def test_all_rows_bad_is_one_line_even_when_dropping(tmp_path):
    path = chats_jsonl(tmp_path, [m for m, _ in BAD])
    fails(
        tmp_path,
        r"every row \(6\) is a bad chat row, nothing to learn \(first: .*row 0: turn 0 has unknown role",
        source=str(path),
        messages_column="messages",
        chat_bad_rows="drop",
    )


def test_messages_column_missing_or_not_turns(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "messages": "User: hi"}])
    fails(
        tmp_path,
        r"data.messages_column: column 'turns' not in .* \(columns: text, messages\)",
        source=str(path),
        messages_column="turns",
    )
    fails(
        tmp_path,
        r"column 'messages' in .* holds string, expected a list of \{role, content\} turns",
        source=str(path),
        messages_column="messages",
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"text_column": "text"}, "data.text_column: set together with data.messages_column"),
        (
            {"chat_learnt_roles": ["bot"]},
            r"data.chat_learnt_roles: \['bot'\] \(expected some of system, user",
        ),
        ({"chat_learnt_roles": []}, r"data.chat_learnt_roles: \[\]"),
        ({"chat_bad_rows": "skip"}, r"data.chat_bad_rows: 'skip' \(expected stop or drop\)"),
        ({"chat_roles": {"user": 1}}, r"data.chat_roles: \{'user': 1\} \(expected a mapping"),
    ],
)
def test_bad_chat_options(options, match):
    with pytest.raises(UserError, match=match):
        DataConfig(source="x.jsonl", data_path="p", messages_column="messages", **options)


def test_chat_option_without_messages_column():
    with pytest.raises(UserError, match=r"data\.chat_separator: set without data\.messages_column"):
        DataConfig(source="x.jsonl", data_path="p", chat_separator="\n")


def test_chat_options_in_the_fingerprint_only_for_chat_data(tmp_path):
    assert list(DataConfig(source="x.jsonl", data_path="p").result_options()) == list(RESULT_OPTIONS)
    path = str(chats_jsonl(tmp_path))
    assert build(tmp_path, source=path, tokenizer="world", messages_column="messages")[0].action == "built"
    done, splits = build(
        tmp_path, source=path, tokenizer="world", messages_column="messages", chat_separator="\n"
    )
    assert done.action == "built" and done.reason == "changed: chat_separator"
    assert load_tokenizer("world").decode(rows(splits["train"])[1][0]) == "User: 2+2?\nAssistant: 4\n"
