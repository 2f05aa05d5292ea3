"""Prompt styles: how a conversation becomes text, and which of its tokens are trained on.

A style renders a conversation (a list of {"role", "content"} messages, see minisft.data) as a list
of segments, each (text, kind):

    prompt    system text, user turns and the glue between turns
    header    the response header that opens an assistant turn ("\\n\\n### Response:\\n" in alpaca)
    response  an assistant turn's content (plus the style's end-of-turn marker, if any)

The training text is all segments joined; the inference prompt is the same segments up to and
including the last response header. Both come from one rendering, so they cannot drift apart.

Masking (which tokens the loss sees) is decided per segment kind:

    "none"    every token is trained (the book's chapter 7 default)
    "input"   prompt tokens are masked; header and response are trained (the book's exercise 7.2,
              which masks len(tokenize(format_input(entry))) tokens and so trains the header)
    "header"  prompt and header are masked; only responses are trained (TRL/Axolotl's convention)
    "assistant"  the same as "header": only assistant turns (the default for a chat template, whose
              segments are only prompt and response, see minisft.chat_template)

In a multi-turn conversation every user turn is prompt, so with "input" or "header" only the
assistant turns are trained.
"""
from dataclasses import dataclass

import numpy as np

from . import tokenizer
from .errors import MinisftError

TRAINED_KINDS = {
    "none": {"prompt", "header", "response"},
    "input": {"header", "response"},
    "header": {"response"},
    "assistant": {"response"},
}
MASKS = tuple(TRAINED_KINDS)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    system: str          # wraps the system text: "{content}"
    default_system: str  # the system text when a record has none ("" = no system part)
    user: str            # wraps a user turn: "{content}"
    input: str           # appends Alpaca's optional input to the instruction: "{input}"
    header: str          # opens an assistant turn; the inference prompt ends with it
    response_end: str    # closes an assistant turn (trained on, so the model learns to close)
    turn_sep: str        # between an assistant turn and the next user turn

    def segments(self, messages) -> list:
        """[(text, kind)] for a conversation. If it ends with a user turn, the segments end with the
        response header, ready for generation."""
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        segs = []
        prompt = self.system.format(content=system) if system else ""
        for i, m in enumerate(messages):
            if m["role"] == "user":
                content = m["content"] + (self.input.format(input=m["input"]) if m.get("input") else "")
                prompt += (self.turn_sep if i else "") + self.user.format(content=content)
            else:
                segs += [(prompt, "prompt"), (self.header, "header"), (m["content"] + self.response_end, "response")]
                prompt = ""
        if prompt:
            segs += [(prompt, "prompt"), (self.header, "header")]
        return segs

    def training_text(self, messages) -> str:
        return "".join(text for text, _ in self.segments(messages))

    def prompt_segments(self, messages) -> list:
        """The segments up to and including the last response header (a final assistant turn, if
        there is one, is the answer and is left out)."""
        segs = self.segments(messages)
        return segs[:-1] if segs[-1][1] == "response" else segs

    def prompt(self, messages) -> str:
        """The inference prompt: it ends with the response header."""
        return "".join(text for text, _ in self.prompt_segments(messages))

    def format_input(self, messages) -> str:
        """The inference prompt without its response header (the book's `format_input`)."""
        return "".join(text for text, _ in self.prompt_segments(messages)[:-1])


STYLES = {
    # The book's chapter 7 format, byte-exact.
    "alpaca": PromptStyle(
        name="alpaca", system="{content}", default_system=ALPACA_PREAMBLE,
        user="\n\n### Instruction:\n{content}", input="\n\n### Input:\n{input}",
        header="\n\n### Response:\n", response_end="", turn_sep=""),
    # The book's exercise 7.1 as printed: "<|user|>\n{instruction}\n<|assistant|>\n{output}" (the
    # solution notebook writes "<|assistant|>:" with a colon; we follow the printed format).
    # To GPT-2 these markers are ordinary text.
    "phi3": PromptStyle(
        name="phi3", system="<|system|>\n{content}\n", default_system="",
        user="<|user|>\n{content}", input="\n{input}",
        header="\n<|assistant|>\n", response_end="", turn_sep="\n"),
    "chatml": PromptStyle(
        name="chatml", system="<|im_start|>system\n{content}<|im_end|>\n", default_system="",
        user="<|im_start|>user\n{content}<|im_end|>\n", input="\n{input}",
        header="<|im_start|>assistant\n", response_end="<|im_end|>", turn_sep="\n"),
}


def get_style(style):
    """A style name -> its PromptStyle; a PromptStyle or a ChatTemplate (minisft.chat_template) as is."""
    if not isinstance(style, str):
        return style
    if style not in STYLES:
        raise MinisftError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    return STYLES[style]


def check_mask(mask: str) -> str:
    if mask not in TRAINED_KINDS:
        raise MinisftError(f"unknown mask {mask!r}; choose one of {', '.join(MASKS)}")
    return mask


def tokenize_segments(segments, mask: str = "none", tok: tokenizer.Tokenizer = tokenizer.GPT2):
    """Tokenize the joined text in one piece (so the ids are exactly those of the whole training
    text) and mark each token trained or not by where it starts.

    Returns tokens (L,) int64 and trained (L,) bool: trained[i] says whether the target that
    predicts token i is kept (trained[0] is never a target). A token that straddles a segment
    boundary belongs to the segment its first byte is in; on text where the prompt tokenizes the
    same alone as inside the whole, this equals the book's rule of masking
    len(tokenize(prompt)) tokens.
    """
    trained_kinds = TRAINED_KINDS[check_mask(mask)]
    text = "".join(t for t, _ in segments)
    tokens = np.asarray(tok.encode(text), dtype=np.int64)                           # (L,)
    seg_ends = np.cumsum([len(t.encode("utf-8")) for t, _ in segments])            # (S,) byte offsets
    seg_trained = np.array([kind in trained_kinds for _, kind in segments])        # (S,)
    seg_of_token = np.searchsorted(seg_ends, tok.byte_starts(tokens), side="right")  # (L,)
    trained = seg_trained[seg_of_token]                                            # (L,)
    if len(trained):
        trained[0] = False
    return tokens, trained
