"""DeepSeek-V3's special tokens and chat templates, as its release tokenizer_config.json carries them.

The V3 template is DeepSeek's own (system prompts first, the tool-call format with its special
tokens, tool outputs, assistant turns ending in EOS), with the tools of a request described in the
system prompt as vLLM's DeepSeek-V3 tool template does (the release template ignores `tools`).
The R1 variant differs in two places, as DeepSeek-R1's does: the generation prompt opens a
`<think>` block, and earlier assistant turns drop their reasoning (everything up to `</think>`).

A tool call, as the model writes it (one or more calls between the outer pair):
  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
  ```json
  {"city": "Paris"}
  ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
V3.1 writes calls without the type and the fence (NAME<｜tool▁sep｜>ARGS) and takes a `thinking`
argument: its generation prompt opens <think> or closes it at once (</think>), and earlier
assistant turns carry only their answer. R1-0528 keeps V3's calls and drops reasoning from earlier
turns, but its generation prompt does not open <think> (the model does). Kimi K2 has its own
roles (<|im_user|>user<|im_middle|>...<|im_end|>), declares tools as JSON in a tool_declare turn
and writes calls as <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0
<|tool_call_argument_begin|>ARGS<|tool_call_end|><|tool_calls_section_end|>, the call id being its head.
model/chat_formats.py names these formats; the templates here are written for epserve from the
formats the models' cards and tokenizer_config.json files describe.
Never: tokenizes or renders (model/tokenizer.py does).
"""
from __future__ import annotations

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
THINK, END_THINK = "<think>", "</think>"
# Kimi K2's special tokens (offsets from its first special id, 163584 in the release)
K2_SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
               6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
               11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
               14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
               22: THINK, 23: END_THINK, 254: "[UNK]", 255: "[PAD]"}
K2_BOS, K2_EOS, K2_IM_END, K2_USER, K2_ASSISTANT = (K2_SPECIALS[i] for i in (0, 1, 2, 3, 4))
K2_SYSTEM, K2_MIDDLE = K2_SPECIALS[10], K2_SPECIALS[17]
K2_CALLS_BEGIN, K2_CALLS_END, K2_CALL_BEGIN, K2_ARGS_BEGIN, K2_CALL_END = (K2_SPECIALS[i] for i in range(11, 16))
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
# added, not special: they decode to their text (the parsers read them)
PLAIN_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP, OUTPUTS_BEGIN, OUTPUTS_END, OUTPUT_BEGIN,
                OUTPUT_END, THINK, END_THINK, FIM_HOLE, FIM_BEGIN, FIM_END, PAD)

_CALL = ("'" + CALL_BEGIN + "' + tool['type'] + '" + TOOL_SEP + "' + tool['function']['name'] + '\\n```json\\n' + "
         "tool['function']['arguments'] + '\\n```" + CALL_END + "'")

_TOOLS_PREAMBLE = (
    "{%- if tools is not none and tools -%}"
    "{%- set ns.system_prompt = ns.system_prompt + ('\\n\\n' if ns.system_prompt else '') + '## Tools\\n"
    "You have access to the following functions. To call functions, answer in this format:\\n"
    + CALLS_BEGIN + CALL_BEGIN + "function" + TOOL_SEP + "NAME\\n```json\\nARGUMENTS\\n```" + CALL_END + CALLS_END
    + "\\n' -%}"
    "{%- for tool in tools -%}"
    "{%- set ns.system_prompt = ns.system_prompt + '\\n### ' + tool['function']['name'] + '\\n' + "
    "(tool['function']['description'] or '') + '\\nParameters: ' + (tool['function']['parameters'] | tojson) + '\\n' -%}"
    "{%- endfor -%}{%- endif -%}")


def _template(generation_prompt: str, strip_reasoning: bool) -> str:
    """DeepSeek-V3's template and its R1 / R1-0528 variants; generation_prompt: a Jinja expression."""
    content = ("{%- set content = message['content'] or '' -%}"
               + ("{%- if '" + END_THINK + "' in content -%}{%- set content = content.split('" + END_THINK
                  + "')[-1] -%}{%- endif -%}" if strip_reasoning else ""))
    return (
        "{%- set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', "
        "is_first_sp=true) -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
        "{%- if ns.is_first_sp -%}{%- set ns.system_prompt = ns.system_prompt + message['content'] -%}"
        "{%- set ns.is_first_sp = false -%}"
        "{%- else -%}{%- set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] -%}{%- endif -%}"
        "{%- endif -%}{%- endfor -%}"
        + _TOOLS_PREAMBLE +
        "{{ bos_token }}{{ ns.system_prompt }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{%- set ns.is_tool = false -%}{{ '" + USER + "' + message['content'] }}"
        "{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}{%- set ns.is_tool = false -%}"
        "{%- set ns.is_first = false -%}" + content +
        "{%- for tool in message['tool_calls'] -%}"
        "{%- if not ns.is_first -%}{{ '" + ASSISTANT + "' + content + '" + CALLS_BEGIN + "' + " + _CALL + " }}"
        "{%- set ns.is_first = true -%}"
        "{%- else -%}{{ '\\n' + " + _CALL + " }}{%- endif -%}"
        "{%- endfor -%}{{ '" + CALLS_END + EOS + "' }}"
        "{%- elif message['role'] == 'assistant' -%}" + content +
        "{%- if ns.is_tool -%}{{ '" + OUTPUTS_END + "' + content + '" + EOS + "' }}{%- set ns.is_tool = false -%}"
        "{%- else -%}{{ '" + ASSISTANT + "' + content + '" + EOS + "' }}{%- endif -%}"
        "{%- elif message['role'] == 'tool' -%}{%- set ns.is_tool = true -%}"
        "{%- if ns.is_output_first -%}{{ '" + OUTPUTS_BEGIN + OUTPUT_BEGIN + "' + message['content'] + '"
        + OUTPUT_END + "' }}{%- set ns.is_output_first = false -%}"
        "{%- else -%}{{ '\\n" + OUTPUT_BEGIN + "' + message['content'] + '" + OUTPUT_END + "' }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.is_tool -%}{{ '" + OUTPUTS_END + "' }}{%- endif -%}"
        "{%- if add_generation_prompt and not ns.is_tool -%}{{ " + generation_prompt + " }}{%- endif -%}")


V3_TEMPLATE = _template("'" + ASSISTANT + "'", strip_reasoning=False)
R1_TEMPLATE = _template("'" + ASSISTANT + THINK + "\\n'", strip_reasoning=True)
# R1-0528: system prompts and V3's tool calls; the model opens <think> itself
R1_0528_TEMPLATE = _template("'" + ASSISTANT + "'", strip_reasoning=True)

_V31_CALL = ("'" + CALL_BEGIN + "' + tool['function']['name'] + '" + TOOL_SEP + "' + tool['function']['arguments'] + '"
             + CALL_END + "'")
# V3.1's tool instructions, in the system prompt (the format its model card gives)
_V31_PREAMBLE = (
    "{%- if tools is not none and tools -%}"
    "{%- set ns.system_prompt = ns.system_prompt + ('\\n\\n' if ns.system_prompt else '') + '## Tools\\n"
    "You have access to the following tools:\\n' -%}"
    "{%- for tool in tools -%}"
    "{%- set ns.system_prompt = ns.system_prompt + '\\n### ' + tool['function']['name'] + '\\nDescription: ' + "
    "(tool['function']['description'] or '') + '\\n\\nParameters: ' + (tool['function']['parameters'] | tojson) "
    "+ '\\n' -%}{%- endfor -%}"
    "{%- set ns.system_prompt = ns.system_prompt + '\\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\\n"
    + CALLS_BEGIN + CALL_BEGIN + "tool_call_name" + TOOL_SEP + "tool_call_arguments" + CALL_END
    + "{{additional_tool_calls}}" + CALLS_END + "\\n\\nWhere `tool_call_name` is one of the tools above, "
    "`tool_call_arguments` is JSON following its Parameters, and several calls follow each other with nothing "
    "between them.' -%}{%- endif -%}")
# V3.1: an answer to a user opens with <｜Assistant｜> and, in the history, </think> (reasoning is not kept);
# tool outputs are bare <｜tool▁output▁begin｜>...<｜tool▁output▁end｜> pieces the model answers after
# directly, so no generation prompt follows them; calls are NAME<｜tool▁sep｜>ARGS back to back
V31_TEMPLATE = (
    "{%- if thinking is not defined -%}{%- set thinking = enable_thinking is defined and enable_thinking -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(system_prompt='', is_first_sp=true, is_last_user=false, is_tool=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.system_prompt = ns.system_prompt + ('' if ns.is_first_sp else '\\n\\n') + message['content'] -%}"
    "{%- set ns.is_first_sp = false -%}{%- endif -%}{%- endfor -%}"
    + _V31_PREAMBLE +
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.is_tool = false -%}{%- set ns.is_last_user = true -%}"
    "{{ '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if ns.is_last_user -%}{{ '" + ASSISTANT + END_THINK + "' }}{%- endif -%}"
    "{%- set ns.is_last_user = false -%}"
    "{%- if message.get('tool_calls') -%}{{ (message['content'] or '') + '" + CALLS_BEGIN + "' }}"
    "{%- for tool in message['tool_calls'] -%}{{ " + _V31_CALL + " }}{%- endfor -%}"
    "{{ '" + CALLS_END + EOS + "' }}"
    "{%- elif ns.is_tool -%}{{ message['content'] + '" + EOS + "' }}"
    "{%- else -%}{{ (message['content'] or '').split('" + END_THINK + "')[-1] + '" + EOS + "' }}{%- endif -%}"
    "{%- set ns.is_tool = false -%}"
    "{%- elif message['role'] == 'tool' -%}{%- set ns.is_last_user = false -%}{%- set ns.is_tool = true -%}"
    "{{ '" + OUTPUT_BEGIN + "' + message['content'] + '" + OUTPUT_END + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and ns.is_last_user -%}"
    "{{ '" + ASSISTANT + "' + ('" + THINK + "' if thinking else '" + END_THINK + "') }}{%- endif -%}")


def _k2_turn(role_token: str, role: str) -> str:
    return "'" + role_token + role + K2_MIDDLE + "'"


# Kimi K2: a default system turn, tools declared as JSON, calls named by their id, tool results by the id
K2_TEMPLATE = (
    "{%- if tools -%}{{ " + _k2_turn(K2_SYSTEM, "tool_declare") + " + (tools | tojson) + '" + K2_IM_END + "' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{ " + _k2_turn(K2_SYSTEM, "system")
    + " + 'You are a helpful assistant" + K2_IM_END + "' }}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ " + _k2_turn(K2_SYSTEM, "system") + " }}"
    "{%- elif message['role'] == 'user' -%}{{ " + _k2_turn(K2_USER, "user") + " }}"
    "{%- elif message['role'] == 'assistant' -%}{{ " + _k2_turn(K2_ASSISTANT, "assistant") + " }}"
    "{%- else -%}{{ " + _k2_turn(K2_SYSTEM, "tool") + " }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}{{ message['content'] or '' }}"
    "{{ '" + K2_CALLS_BEGIN + "' }}{%- for call in message['tool_calls'] -%}"
    "{{ '" + K2_CALL_BEGIN + "' + call['id'] + '" + K2_ARGS_BEGIN + "' + call['function']['arguments'] + '"
    + K2_CALL_END + "' }}{%- endfor -%}{{ '" + K2_CALLS_END + "' }}"
    "{%- elif message['role'] == 'tool' -%}{{ '## Return of ' + message['tool_call_id'] + '\\n' + message['content'] }}"
    "{%- else -%}{{ message['content'] }}{%- endif -%}{{ '" + K2_IM_END + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ " + _k2_turn(K2_ASSISTANT, "assistant") + " }}{%- endif -%}")


def template_for(name: str) -> str:
    templates = {"v3": V3_TEMPLATE, "r1": R1_TEMPLATE, "v3.1": V31_TEMPLATE, "r1-0528": R1_0528_TEMPLATE,
                 "kimi-k2": K2_TEMPLATE}
    if name not in templates:
        raise ValueError(f"chat_template {name!r} is not one of {', '.join(templates)}")
    return templates[name]


def opens_reasoning(chat_template: str | None) -> bool:
    """Whether a template's generation prompt opens a <think> block (an R1-style reasoning model)."""
    return bool(chat_template) and THINK in chat_template and END_THINK in chat_template
