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
        "{%- if add_generation_prompt and not ns.is_tool -%}{{ '" + generation_prompt + "' }}{%- endif -%}")


V3_TEMPLATE = _template(ASSISTANT, strip_reasoning=False)
R1_TEMPLATE = _template(ASSISTANT + THINK + "\\n", strip_reasoning=True)


def template_for(name: str) -> str:
    templates = {"v3": V3_TEMPLATE, "r1": R1_TEMPLATE}
    if name not in templates:
        raise ValueError(f"chat_template {name!r} is not one of {', '.join(templates)}")
    return templates[name]


def opens_reasoning(chat_template: str | None) -> bool:
    """Whether a template's generation prompt opens a <think> block (an R1-style reasoning model)."""
    return bool(chat_template) and THINK in chat_template and END_THINK in chat_template
