"""A checkpoint's chat template (Jinja, as Hugging Face tokenizers ship it), rendered as
transformers' `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`
renders it, without transformers.

The template comes from the tokenizer directory's `chat_template.jinja`, else the
`chat_template` of its tokenizer_config.json (a string, or a list of named templates: the one
named "default"). It is rendered in Jinja's immutable sandbox with transformers' settings
(trim_blocks, lstrip_blocks, loop controls), globals (`raise_exception`, `strftime_now`), its
`tojson` filter, and the tokenizer's special tokens as variables (`bos_token`, `eos_token`,
...). A final assistant message is continued, not closed (transformers'
`continue_final_message`): the prompt ends where its content ends.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Mapping, Sequence

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
  """A conversation the template refuses (its raise_exception) or cannot render."""


def read_chat_template(directory: str, tokenizer_config: Mapping | None = None) -> str | None:
  """The template source of a tokenizer directory, or None when it ships none."""
  path = os.path.join(directory, CHAT_TEMPLATE_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = (tokenizer_config or {}).get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) and template else None


class ChatTemplate:
  """`ChatTemplate(source, special_tokens)(messages)` -> the prompt text."""

  def __init__(self, source: str, special_tokens: Mapping[str, object] | None = None):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
      """`{% generation %}...{% endgeneration %}` (assistant-token masks): its body as is."""

      tags = {"generation"}

      def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

      def _body(self, caller):
        return caller()

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
      )

    env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self.template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
      raise ChatTemplateError(f"the tokenizer's chat template does not compile: {e}") from None
    self.source = source
    self.special_tokens = dict(special_tokens or {})

  def __call__(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
    """The prompt for `messages` ({"role", "content"} dicts): with a generation prompt after
    them when the last one is not the assistant's, else ending inside the assistant's message,
    to be continued."""
    import jinja2

    chat = [dict(m) for m in messages]
    cont = bool(chat) and chat[-1].get("role") == "assistant"
    if cont:
      final = chat[-1].get("content") or ""
      chat[-1]["content"] = final + _CONTINUE_TAG
    try:
      text = self.template.render(
        messages=chat,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt and not cont,
        **self.special_tokens,
      )
    except jinja2.exceptions.TemplateError as e:
      raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
    if cont:
      tag = text.rfind(_CONTINUE_TAG.strip())
      if tag < 0:
        raise ChatTemplateError("the chat template drops the final assistant message's content")
      if text[tag : tag + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        text = text[:tag]
      else:  # the template trimmed the content's trailing space
        text = text[:tag].rstrip()
    return text
