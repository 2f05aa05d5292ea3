"""Chat templates: a model's Hugging Face `chat_template` (Jinja), rendered exactly as transformers'
`apply_chat_template` renders it, and the loss mask taken from the template itself.

`--chat-template NAME|FILE|model` names a built-in (BUILTIN), a Jinja file, or the model folder's own
template (tokenizer_config.json's `chat_template`, else chat_template.jinja). The environment is
transformers': jinja2's ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks, loopcontrols,
`tojson` (no HTML escaping), `raise_exception`, `strftime_now`, and bos_token / eos_token from the
tokenizer. jinja2 is imported only when a template is used (pip install 'minisft[chat]').

Masks (`--mask-prompt assistant`, the default for templates) come from renderings, never from searching
the text for a response marker:
  - a template with TRL's `{% generation %}...{% endgeneration %}` trains what those blocks render;
  - any other template: for each assistant turn k, messages[:k] rendered with add_generation_prompt
    ends where the turn starts, messages[:k+1] rendered without it ends where it ends; the trained span
    is that turn's text up to its last non-space character, so its end-of-turn token is trained and the
    newline after it is not.
A template whose rendering of a conversation's prefix is not a prefix of the whole (it rewrites history:
drops earlier reasoning, moves a system message) cannot be masked by prefixes, nor served turn by turn as
it was trained; check_masks refuses such data, and the other silent failures, before training.

Alpaca records' inputs: a template sees {"role", "content"} only, so an input is appended to the user's
content after a blank line.

Licences of the built-ins: chatml is the generic ChatML template of transformers' chat-templating
documentation (Apache-2.0); smollm2 is HuggingFaceTB/SmolLM2-*-Instruct's tokenizer_config.json
(Apache-2.0); qwen2.5 is Qwen/Qwen2.5-*-Instruct's tokenizer_config.json (Apache-2.0), verbatim. Also
verbatim:
  - llama3: Meta's Llama 3.2 Instruct template (its date / tools preamble included; strftime_now gives
    today's date), as llama.cpp's models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja holds it (the
    1B and 3B Instruct models ship one template); the Llama 3.2 Community License (Meta's), the licence
    of the model repositories the template comes from.
  - mistral: mistralai/Mistral-7B-Instruct-v0.2's tokenizer_config.json chat_template (the v0.1/v0.2
    "[INST]" template with its optional system message prepended to the first user turn; it refuses
    roles that do not alternate), as guidance-ai/guidance's guidance/chat.py copies it from the hub
    ("[05/08/24] .../Mistral-7B-Instruct-v0.2/blob/main/tokenizer_config.json#L42"); Apache-2.0.
  - phi3: microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json chat_template, as guidance's
    guidance/chat.py copies it ("[05/08/24] .../Phi-3-mini-4k-instruct/blob/main/tokenizer_config.json
    #L119"; llama.cpp's microsoft-Phi-3.5-mini-instruct.jinja is the same but for skipping an empty
    system message); MIT. It closes every conversation rendered without the generation prompt with
    eos_token; masks and the end marker take that closing as the conversation's, not a turn's
    (ChatTemplate.closing).
  - gemma: Gemma 2 instruct's template (role "model", no system role: raise_exception), as llama.cpp's
    models/templates/google-gemma-2-2b-it.jinja holds it; the Gemma Terms of Use (Google's), the terms
    of the model repositories it comes from.
The template files and copies themselves carry no licence text; the licences named are those of the
models' repositories.
"""
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from .errors import MinisftError
from .prompts import get_style

MODEL = "model"  # --chat-template model: the model folder's own template
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided \
with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n\
</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" \
and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function\
 call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim +\
 '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate\
 user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional\
 system message!') }}
    {%- endif %}
{%- endfor %}
"""
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] +"
        " '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{%"
        " elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif"
        " %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported')"
         " }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0)"
         " %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif"
         " %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role ="
         " message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim +"
         " '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
BUILTIN = {"chatml": CHATML, "smollm2": SMOLLM2, "qwen2.5": QWEN25, "llama3": LLAMA3, "mistral": MISTRAL,
           "phi3": PHI3, "gemma": GEMMA}
CHAT_TEMPLATE_HELP = (f"a Jinja chat template, rendered as transformers' apply_chat_template does: a built-in "
                      f"({', '.join(BUILTIN)}), a file, or {MODEL} (the model folder's own; the default for a folder "
                      "that has one and no --prompt-style)")
# Private-use characters that frame what a {% generation %} block renders; data holding them is refused.
MARK_START, MARK_END = "\ue000", "\ue001"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def _compile(source: str, where: str):
    """The template compiled in transformers' environment (AssistantTracker's tag as our marker)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise MinisftError("chat templates need jinja2: pip install 'minisft[chat]'") from None

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return MARK_START + caller() + MARK_END

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source), jinja2.exceptions.TemplateError
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise MinisftError(f"chat template {where}: not a valid Jinja template (line {e.lineno}: "
                           f"{e.message})") from None


def _unmark(marked: str) -> tuple[str, list]:
    """Text with generation marks -> (the text without them, [(start, end)] of each marked span)."""
    text, spans, start = [], [], None
    length = 0
    for piece in re.split(f"([{MARK_START}{MARK_END}])", marked):
        if piece == MARK_START:
            start = length
        elif piece == MARK_END:
            spans.append((start, length))
        else:
            text.append(piece)
            length += len(piece)
    return "".join(text), spans


@dataclass(frozen=True)
class Rendered:
    text: str      # the whole conversation, as apply_chat_template renders it
    spans: list    # [(start, end)] characters trained, one per assistant turn it could place
    stable: bool   # every prefix ending after a turn renders as a prefix of text


class ChatTemplate:
    """A Jinja chat template, used where a PromptStyle is (segments, prompt, format_input,
    training_text), with the tokenizer's control-token strings (refused inside messages) and
    bos/eos strings."""

    def __init__(self, name: str, source: str, tok):
        self.name, self.source = name, source
        self.template, self.error = _compile(source, name)
        self.markers = GENERATION_TAG.search(source) is not None
        self.bos_token, self.eos_token = tok.bos_token, tok.eos_token
        self.specials = tuple(s for s in tok.specials() if s)
        self.closing = self._closing()
        self.end = self._end_marker()

    def _render(self, messages, add_generation_prompt=False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except self.error as e:
            raise MinisftError(f"chat template {self.name}: {e}") from None
        except (TypeError, ValueError, LookupError, AttributeError) as e:  # the template's own code failing
            raise MinisftError(f"chat template {self.name}: rendering failed ({type(e).__name__}: {e})") from None

    def _messages(self, messages) -> list:
        """Internal messages -> what a template sees, refusing text a template would turn into control tokens."""
        out = []
        for j, m in enumerate(messages):
            content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
            for s in (*self.specials, MARK_START, MARK_END):
                if s in content:
                    raise MinisftError(f"message {j} holds {s!r}: rendered by a chat template it would be a control "
                                       "token, not text")
            out.append({"role": m["role"], "content": content})
        return out

    def render(self, messages, add_generation_prompt=False) -> str:
        return _unmark(self._render(self._messages(messages), add_generation_prompt))[0]

    def _closing(self) -> str:
        """The control token a template appends to a conversation rendered without the generation prompt
        and not to one that goes on (Phi-3's eos_token), or "": the rendering of the probe's first turn
        ends with it, and the generation prompt's rendering goes on from what comes before it."""
        plain, prompt = self.render(PROBE[:1]), self.render(PROBE[:1], add_generation_prompt=True)
        if prompt.startswith(plain):
            return ""
        return next((s for s in (self.eos_token, *self.specials)
                     if s and plain.endswith(s) and prompt.startswith(plain[:-len(s)])), "")

    def _end_marker(self) -> str:
        """What closes an assistant turn ('<|im_end|>'), from rendering a probe conversation."""
        before = self.render(PROBE[:1], add_generation_prompt=True)
        turn = self.render(PROBE)[len(before):]
        turn = turn[:-len(self.closing)] if self.closing and turn.endswith(self.closing) else turn
        content = PROBE[1]["content"]
        return turn.split(content, 1)[1].strip() if content in turn else ""

    def rendered(self, messages) -> Rendered:
        msgs = self._messages(messages)
        marked = self._render(msgs)
        text, marked_spans = _unmark(marked)
        spans, stable = [], True
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = _unmark(self._render(msgs[:k], add_generation_prompt=True))[0]
            after = _unmark(self._render(msgs[:k + 1]))[0]
            if self.closing and after.endswith(self.closing) and text.endswith(self.closing):
                after = after[:-len(self.closing)]  # the conversation's closing, not the turn's
            start, end = len(before), len(after.rstrip())
            aligned = text.startswith(before) and text.startswith(after)
            stable &= aligned
            if aligned and end > start:
                spans.append((start, end))
        return Rendered(text, marked_spans if self.markers else spans, stable)

    def segments(self, messages) -> list:
        """[(text, kind)]: assistant spans are "response", the rest "prompt". A conversation ending with a
        user turn renders with the generation prompt (a prompt for generation)."""
        if messages[-1]["role"] != "assistant":
            return [(self.prompt(messages), "prompt")]
        r = self.rendered(messages)
        segs, at = [], 0
        for start, end in r.spans:
            segs += [(r.text[at:start], "prompt"), (r.text[start:end], "response")]
            at = end
        return segs + [(r.text[at:], "prompt")]

    def training_text(self, messages) -> str:
        return self.render(messages)

    def prompt(self, messages) -> str:
        """The inference prompt: the conversation before its final answer, with the generation prompt."""
        history = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        return self.render(history, add_generation_prompt=True)

    def format_input(self, messages) -> str:
        history = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        return self.render(history)

    def end_ids(self, tok) -> tuple:
        """The end-of-turn token id generation stops at, when the end marker is one token."""
        ids = tok.encode(self.end) if self.end else []
        return tuple(ids) if len(ids) == 1 else ()


def folder_template(folder) -> str | None:
    """A model folder's own template: tokenizer_config.json's chat_template, else chat_template.jinja."""
    if folder is None:
        return None
    folder = Path(folder)
    config = folder / "tokenizer_config.json"
    try:
        source = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise MinisftError(f"{config}: cannot read the tokenizer config ({e})") from None
    if isinstance(source, list):  # several named templates: the one named "default"
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(source, str):
        return source
    jinja = folder / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def load_template(spec: str, tok, folder=None) -> ChatTemplate:
    """--chat-template NAME|FILE|model -> the template, for the tokenizer `tok` of the model in `folder`."""
    if spec == MODEL:
        source = folder_template(folder)
        if source is None:
            raise MinisftError(f"--chat-template model: {folder or 'the model'} has no chat template "
                               "(tokenizer_config.json's chat_template or chat_template.jinja)")
        return ChatTemplate(f"{folder}'s", source, tok)
    if spec in BUILTIN:
        return ChatTemplate(spec, BUILTIN[spec], tok)
    path = Path(spec)
    if not path.is_file():
        raise MinisftError(f"--chat-template {spec!r}: neither a built-in ({', '.join(BUILTIN)}, {MODEL}) nor a file")
    try:
        return ChatTemplate(str(path), path.read_text(encoding="utf-8"), tok)
    except (OSError, UnicodeDecodeError) as e:
        raise MinisftError(f"--chat-template {spec}: cannot read the file ({e})") from None


# ---- the mask checks ---------------------------------------------------------------------------------

# kind -> (what the records do, the setting that allows it)
PROBLEMS = {
    "untrained": ("train no token at all", "allow_untrained_records"),
    "empty_turn": ("have an assistant turn that trains no token", "allow_empty_turns"),
    "end": ("leave an assistant turn's end token {end!r} untrained (the model would not learn to stop)",
            "allow_untrained_end"),
    "unstable": ("render differently when cut after a turn: the template is not prefix-stable (prompts at "
                 "inference differ from training)", "allow_unstable_template"),
}


def record_problems(template: ChatTemplate, messages, tokens, trained, tok) -> set:
    """The PROBLEMS kinds of one encoded record (tokens (L,), trained (L,) from template.segments)."""
    r = template.rendered(messages)
    problems = set() if r.stable else {"unstable"}
    if not trained[1:].any():
        problems.add("untrained")
    n_turns = sum(m["role"] == "assistant" for m in messages)
    starts = tok.byte_starts(tokens)                                               # (L,) byte offsets
    token_at = lambda char: int(np.searchsorted(starts, len(r.text[:char].encode("utf-8")), side="right")) - 1  # noqa: E731
    if len(r.spans) < n_turns:
        problems.add("empty_turn")
    for start, end in r.spans:
        first, last = token_at(start), token_at(end - 1)
        if not trained[first:last + 1].any():
            problems.add("empty_turn")
        if not template.end or not r.text[start:end].endswith(template.end) or not trained[last]:
            problems.add("end")
    return problems


def check_masks(template: ChatTemplate, splits, tok, settings, log) -> None:
    """Refuse (MinisftError) records whose masks are silently wrong, one line per kind with its count and
    first record, unless the kind's --allow-... setting is on (then the line is a warning).
    splits: [(name, records, examples)]."""
    refused = []
    for name, records, examples in splits:
        found: dict = {}
        for i, (rec, ex) in enumerate(zip(records, examples)):
            for kind in record_problems(template, rec["messages"], ex.tokens, ex.trained, tok):
                found.setdefault(kind, []).append(i)
        for kind, (what, flag) in PROBLEMS.items():
            if kind in found:
                allowed = getattr(settings, flag)
                log(f"{'warning' if allowed else 'error'}: {len(found[kind])} of {len(records)} {name} records "
                    f"{what.format(end=template.end)} (first: {name} record {found[kind][0]})"
                    + ("" if allowed else f"; --{flag.replace('_', '-')} trains anyway"))
                refused += [] if allowed else [flag]
    if refused:
        flags = ", ".join("--" + f.replace("_", "-") for f in dict.fromkeys(refused))
        raise MinisftError(f"the loss masks of the data under the chat template {template.name} are wrong (above); "
                           f"fix the data or the template, or pass {flags}")


def prompt_format(prompt_style, chat_template, tok, folder=None) -> tuple:
    """(the PromptStyle or ChatTemplate that renders prompts, the tokenizer that encodes its text): a
    template's control-token strings are tokens, and generation also stops at its end-of-turn token."""
    if chat_template is None:
        return get_style(prompt_style or "alpaca"), tok
    template = load_template(chat_template, tok, folder if folder is not None else getattr(tok, "folder", None))
    return template, tok.for_template(template.end_ids(tok.for_template()))
