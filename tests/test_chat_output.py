"""Pure parts of the chat API: DeepSeek's templates, the tool-call/reasoning parser and its stream."""
from __future__ import annotations

import pytest

from epserve.model import chat_templates as ct
from epserve.serve.chat_output import ChatStream, message, parse

CALL = ct.CALL_BEGIN + "function" + ct.TOOL_SEP + "{name}\n```json\n{args}\n```" + ct.CALL_END
TWO = ("Let me check." + ct.CALLS_BEGIN + CALL.format(name="get_weather", args='{"city":"Paris"}') + "\n"
       + CALL.format(name="add", args='{"a":1,"b":2}') + ct.CALLS_END)


@pytest.mark.parametrize("text,reasoning,tools,want", [
    ("plain answer", False, True, ("", "plain answer", [])),
    (TWO, False, True, ("", "Let me check.", [["get_weather", '{"city":"Paris"}'], ["add", '{"a":1,"b":2}']])),
    (TWO, False, False, ("", TWO, [])),                                 # tools not asked for: text stays text
    ("hmm, think" + ct.END_THINK + "\n\nThe answer.", True, False, ("hmm, think", "The answer.", [])),
    ("still thinking", True, False, ("still thinking", "", [])),
    ("r" + ct.END_THINK + TWO, True, True, ("r", "Let me check.", [["get_weather", '{"city":"Paris"}'],
                                                                   ["add", '{"a":1,"b":2}']])),
])
def test_parse_splits_reasoning_content_and_calls(text, reasoning, tools, want):
    p = parse(text, reasoning, tools)
    assert (p.reasoning, p.content, p.calls) == want


def test_message_has_openai_tool_calls_and_null_content():
    m = message(ct.CALLS_BEGIN + CALL.format(name="add", args="{}") + ct.CALLS_END, False, True)
    assert m["content"] is None and m["tool_calls"][0]["function"] == {"name": "add", "arguments": "{}"}
    assert m["tool_calls"][0]["id"].startswith("call_") and m["tool_calls"][0]["type"] == "function"


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_stream_deltas_reassemble_to_the_parse_whatever_the_chunking(step):
    text = "why" + ct.END_THINK + TWO
    s, got = ChatStream(True, True), {"reasoning_content": "", "content": "", "calls": {}}
    cuts = list(range(step, len(text), step)) + [len(text)]
    for i, cut in enumerate(cuts):
        d = s.push(text[:cut], final=i == len(cuts) - 1)
        got["reasoning_content"] += d.get("reasoning_content", "")
        got["content"] += d.get("content", "")
        for c in d.get("tool_calls", []):
            if "id" in c:
                got["calls"][c["index"]] = [c["function"]["name"], c["function"]["arguments"]]
            else:
                assert "name" not in c["function"]
                got["calls"][c["index"]][1] += c["function"]["arguments"]
    want = parse(text, True, True)
    assert got["reasoning_content"] == want.reasoning and got["content"] == want.content
    assert [got["calls"][i] for i in sorted(got["calls"])] == want.calls


def test_a_stream_holds_back_what_may_be_the_closing_fence():
    s = ChatStream(False, True)
    head = ct.CALLS_BEGIN + ct.CALL_BEGIN + "function" + ct.TOOL_SEP + 'add\n```json\n{"a":1}'
    assert s.push(head + "\n`", final=False)["tool_calls"][0]["function"]["arguments"] == '{"a":1}'
    assert s.push(head + "\n``", final=False) == {}


def test_templates_render_tools_and_r1_opens_think(tiny_dir, tmp_path):
    from epserve.model.tiny import make_tiny_model
    from epserve.model.tokenizer import Tokenizer
    v3 = Tokenizer(tiny_dir)
    r1 = Tokenizer(make_tiny_model(tmp_path / "r1", chat_template="r1"))
    assert not v3.opens_reasoning and r1.opens_reasoning
    tools = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object"}}}]
    text = v3.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)
    assert text.startswith(ct.BOS) and "### add" in text and '{"type": "object"}' in text
    assert text.endswith(ct.USER + "hi" + ct.ASSISTANT)
    hist = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "thought" + ct.END_THINK + "A"},
            {"role": "user", "content": "q2"}]
    assert r1.apply_chat_template(hist).endswith(ct.ASSISTANT + "A" + ct.EOS + ct.USER + "q2" + ct.ASSISTANT
                                                 + ct.THINK + "\n")
    for t in ct.PLAIN_TOKENS + (ct.BOS, ct.EOS, ct.USER, ct.ASSISTANT):
        assert v3.token_id(t) is not None                   # every DeepSeek special token is one token
    assert v3.decode([v3.token_id(ct.CALLS_BEGIN), v3.bos_id]) == ct.CALLS_BEGIN   # tool tokens survive decode
