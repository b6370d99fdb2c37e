"""The V3 family by configuration, without Ray: each member's random checkpoint against transformers,
its chat format read from its own files, its tool-call syntax parsed and forced by grammar, V3.1's
thinking switch by model name and chat_template_kwargs, and Kimi K2's tiktoken tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import hf_greedy, hf_model, prompts_of
from epserve.config import ServeConfig
from epserve.errors import InvalidRequest, ModelNotFound
from epserve.model import chat_templates as ct
from epserve.model.chat_formats import TOOL_SYNTAXES, detect_thinking, detect_tools
from epserve.model.grammar import GrammarCache, GrammarSpec, load_lltokenizer
from epserve.model.sampling import SamplingParams
from epserve.model.tiktoken_bpe import byte_chars, read_ranks
from epserve.model.tiny import make_tiny_model
from epserve.model.tokenizer import Tokenizer, tokenizer_json
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence
from epserve.serve.chat_mode import ChatModes
from epserve.serve.chat_output import ChatStream, message, parse
from epserve.serve.structured import tools_grammar

MEMBERS = {"v31-tiny": ("deepseek-v3.1", "switch"), "r1-0528-tiny": ("deepseek-v3", "model"),
           "kimi-k2-tiny": ("kimi-k2", "never")}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {p: str(make_tiny_model(root / p, preset=p, seed=5)) for p in MEMBERS}


@pytest.mark.parametrize("preset", list(MEMBERS))
def test_each_members_random_checkpoint_gives_transformers_greedy_tokens(family, preset):
    hf = hf_model(family[preset])
    prompts = prompts_of([6, 23], vocab=hf.config.vocab_size, seed=3)
    engine = make_local_engine(family[preset])
    seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    for p, s in zip(prompts, seqs):
        assert s.output_ids == hf_greedy(hf, p, 6)[0]


@pytest.mark.parametrize("preset", list(MEMBERS))
def test_each_member_brings_its_format_as_data(family, preset):
    tok = Tokenizer(family[preset])
    assert (detect_tools(tok.apply_chat_template, tok.token_id).name,
            detect_thinking(tok.apply_chat_template, tok.token_id)) == MEMBERS[preset]


def test_v3_and_r1_templates_keep_their_formats(tiny_dir, tmp_path):
    tok = Tokenizer(tiny_dir)
    assert detect_tools(tok.apply_chat_template, tok.token_id).name == "deepseek-v3"
    assert detect_thinking(tok.apply_chat_template, tok.token_id) == "never"
    r1 = Tokenizer(make_tiny_model(tmp_path / "r1", chat_template="r1"))
    assert detect_thinking(r1.apply_chat_template, r1.token_id) == "always"


def test_v31_template_switches_thinking_and_drops_old_reasoning(family):
    tok = Tokenizer(family["v31-tiny"])
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(ask, thinking=True).endswith(ct.ASSISTANT + ct.THINK)
    assert tok.apply_chat_template(ask).endswith(ct.ASSISTANT + ct.END_THINK)      # off by default
    assert tok.apply_chat_template(ask, enable_thinking=True).endswith(ct.THINK)
    past = tok.apply_chat_template(ask + [{"role": "assistant", "content": "why" + ct.END_THINK + "Hello"},
                                          {"role": "user", "content": "Again"}], thinking=True)
    assert past.startswith(ct.BOS + "Be brief.") and "why" not in past
    assert ct.ASSISTANT + ct.END_THINK + "Hello" + ct.EOS in past


def test_r1_0528_leaves_think_to_the_model_and_renders_tools(family):
    tok = Tokenizer(family["r1-0528-tiny"])
    tools = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {}}}]
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}],
                                   tools=tools)
    assert text.startswith(ct.BOS + "S\n\n## Tools") and "### add" in text and text.endswith(ct.ASSISTANT)


def _calls():
    return [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]


@pytest.mark.parametrize("name", list(TOOL_SYNTAXES))
def test_each_syntax_parses_whole_and_streamed_to_the_same_calls(name):
    syn = TOOL_SYNTAXES[name]
    text = "why" + ct.END_THINK + "Let me check." + syn.section_text(_calls())
    whole = parse(text, True, True, syn=syn)
    assert (whole.reasoning, whole.content, whole.calls) == ("why", "Let me check.", [list(c) for c in _calls()])
    ids = [c["id"] for c in message(text, True, True, syn)["tool_calls"]]
    assert ids == (["functions.get_weather:0", "functions.add:1"] if syn.head_is_id else ids)
    for step in (1, 3):
        s, got = ChatStream(True, True, syn), {"r": "", "c": "", "calls": {}}
        cuts = list(range(step, len(text), step)) + [len(text)]
        for i, cut in enumerate(cuts):
            d = s.push(text[:cut], final=i == len(cuts) - 1)
            got["r"] += d.get("reasoning_content", "")
            got["c"] += d.get("content", "")
            for c in d.get("tool_calls", []):
                if "id" in c:
                    got["calls"][c["index"]] = [c["function"]["name"], c["function"]["arguments"]]
                else:
                    got["calls"][c["index"]][1] += c["function"]["arguments"]
        assert (got["r"], got["c"], [got["calls"][i] for i in sorted(got["calls"])]) == \
            (whole.reasoning, whole.content, whole.calls)


def test_r1_0528_reasoning_opened_by_the_model_is_split_off():
    p = parse("<think>\nhmm" + ct.END_THINK + "\n\n4", True, False)
    assert (p.reasoning, p.content) == ("\nhmm", "4")


@pytest.mark.parametrize("preset", list(MEMBERS))
def test_forced_call_grammar_accepts_exactly_the_members_syntax(family, preset):
    tok = Tokenizer(family[preset])
    syn = detect_tools(tok.apply_chat_template, tok.token_id)
    cfg = json.loads(open(f"{family[preset]}/config.json").read())
    cache = GrammarCache(load_lltokenizer(tokenizer_json(family[preset]), cfg["vocab_size"], (cfg["eos_token_id"],)))
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}}]
    ids = {m: tok.token_id(m) for m in syn.markers}
    spec = GrammarSpec("lark", tools_grammar(tools, ids, False, False, syn), "tools")
    right = cache.matcher(spec)
    assert right.consume_tokens(tok.encode(syn.section_text([("add", '{"a":7}')]), add_special=False))
    assert right.is_accepting()
    other = next(s for s in TOOL_SYNTAXES.values() if s.name != syn.name)
    wrong = cache.matcher(spec)
    assert not (wrong.consume_tokens(tok.encode(other.section_text([("add", '{"a":7}')]), add_special=False))
                and wrong.is_accepting())


def _modes(tokenizer, **serve):
    return ChatModes(ServeConfig(model_name="m", **serve), tokenizer)


@pytest.mark.parametrize("model,kwargs,want", [
    ("m", None, (False, False)), ("m", {"thinking": True}, (True, True)), ("m", {"enable_thinking": True}, (True, True)),
    ("deepseek-chat", None, (False, False)), ("deepseek-reasoner", None, (True, True)),
    ("deepseek-reasoner", {"thinking": True}, (True, True)),
])
def test_v31_model_name_and_kwargs_select_thinking(family, model, kwargs, want):
    mode = _modes(Tokenizer(family["v31-tiny"])).resolve(model, kwargs)
    assert (mode.reasoning, mode.template_kwargs["thinking"]) == want


@pytest.mark.parametrize("model,kwargs,err,param", [
    ("deepseek-chat", {"thinking": True}, InvalidRequest, "chat_template_kwargs.thinking"),
    ("m", {"thinking": "yes"}, InvalidRequest, "chat_template_kwargs.thinking"),
    ("m", {"messages": []}, InvalidRequest, "chat_template_kwargs"),
    ("gpt-4", None, ModelNotFound, "model"),
])
def test_bad_modes_are_4xx_naming_the_param(family, model, kwargs, err, param):
    with pytest.raises(err) as exc:
        _modes(Tokenizer(family["v31-tiny"])).resolve(model, kwargs)
    assert exc.value.param == param


def test_mode_names_are_served_only_for_a_thinking_switch(family):
    assert _modes(Tokenizer(family["v31-tiny"])).names == ["m", "deepseek-chat", "deepseek-reasoner"]
    assert _modes(Tokenizer(family["v31-tiny"]), reasoner_model_name="").names == ["m", "deepseek-chat"]
    r1 = _modes(Tokenizer(family["r1-0528-tiny"]))
    assert r1.names == ["m"] and r1.resolve("m", None).reasoning
    with pytest.raises(ModelNotFound):
        r1.resolve("deepseek-reasoner", None)


def _tiktoken_encode(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """tiktoken's rule, the oracle: merge the adjacent pair whose concatenation ranks lowest."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 62))
        if parts[best] + parts[best + 1] not in ranks:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


def test_kimi_tiktoken_ranks_encode_as_tiktoken_would(family):
    d = family["kimi-k2-tiny"]
    tok, ranks = Tokenizer(d), read_ranks(f"{d}/tiktoken.model")
    back = {c: b for b, c in byte_chars().items()}
    for text in ["Hello, world! The sea is wide.", "def main(): return 3.14159", "你好，世界 12345 don't",
                 "  spaces\n\nand\ttabs!!", "Ünïcödé ✓ emoji 🙂"]:
        pieces = tok.tok.pre_tokenizer.pre_tokenize_str(text)
        want = [i for s, _ in pieces for i in _tiktoken_encode(ranks, bytes(back[c] for c in s))]
        assert tok.encode(text, add_special=False) == want
        assert tok.decode(want) == text
    assert [p for p, _ in tok.tok.pre_tokenizer.pre_tokenize_str("你好world's 12345")] == \
        ["ä½łå¥½", "world's", "Ġ", "123", "45"]      # Han run, word with contraction, numbers of 1-3 digits


def test_kimi_specials_sit_after_the_ranks_and_markers_decode_to_text(family):
    tok = Tokenizer(family["kimi-k2-tiny"])
    assert tok.token_id(ct.K2_BOS) == 384 and tok.token_id(ct.K2_IM_END) == 386 and tok.vocab_size == 640
    assert tok.decode([tok.token_id(ct.K2_CALLS_BEGIN), tok.token_id(ct.K2_IM_END)]) == ct.K2_CALLS_BEGIN


def test_a_bad_tiktoken_line_is_named(tmp_path):
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nnot-a-rank\n")
    with pytest.raises(ValueError, match="tiktoken.model:2"):
        read_ranks(tmp_path / "tiktoken.model")


def test_make_tiny_model_cli_writes_each_members_files(tmp_path):
    for preset, files in [("kimi-k2-tiny", {"tiktoken.model", "generation_config.json"}),
                          ("v31-tiny", {"tokenizer.json"})]:
        out = subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", str(tmp_path / preset),
                              "--preset", preset], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert files <= {p.name for p in (tmp_path / preset).iterdir()}
    bad = subprocess.run([sys.executable, "-m", "epserve", "make-tiny-model", str(tmp_path / "x"),
                          "--preset", "kimi-k3"], capture_output=True, text=True)
    assert bad.returncode != 0 and "kimi-k3" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_kimi_k2_reads_im_end_as_end_of_turn(family):
    from epserve.model.checkpoint import read_config
    assert read_config(family["kimi-k2-tiny"]).eos_token_ids == (385, 386)


def test_kimi_k2_prod_plans_with_more_than_two_slots_per_gpu():
    from epserve.config import load_config
    from epserve.plan import plan_units
    plan = plan_units(load_config("configs/kimi_k2_prod.yaml"), "kimi-k2")
    for role, slots in (("prefill", 13), ("decode", 5)):
        r = plan["roles"][role]
        assert r["routed_slots_per_rank"] == slots and r["slots_per_layer"] == 384 + r["redundant_experts"]
        assert sorted({e for rk in r["ranks"] for e in rk["experts_layer0"]}) == list(range(384))
        assert r["memory_per_rank_total_gib"] < 78          # fits an H100
    with pytest.raises(ValueError, match="kimi-k3"):
        plan_units(load_config("configs/kimi_k2_prod.yaml"), "kimi-k3")
