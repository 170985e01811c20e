"""Talk to a chat model: the conversation is kept, each reply ends at the end-of-turn token.

``lumorik-sft chat --model DIR`` runs `chat_loop` in a terminal; ``--message`` answers one turn
and exits (for scripts and tests); notebook 09's widget drives a `ChatSession` too. Every reply
is generated from the whole conversation so far, rendered by the model's chat template
(`encoding.chat_prompt_ids`), exactly as in training; a history that outgrows the context loses
its oldest exchanges whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lumorik_sft import encoding, generation

QUIT_WORDS = ("/quit", "/exit")


@dataclass
class ChatSession:
    """A conversation with a model: `say` adds the user's turn and returns the model's reply."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    system: str | None = None
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)  # per reply: ended by <|end|> (not the limit)

    def __post_init__(self) -> None:
        encoding.chat_template(self.tokenizer)  # refuse a model without a usable chat template now
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def say(self, text: str) -> str:
        """Add the user's message, generate the assistant's reply, keep both, return the reply."""
        history = [*self.messages, {"role": "user", "content": text}]
        encoding.check_chat_text(self.tokenizer, history)  # a typed "<|end|>" is refused, not obeyed
        (reply,) = generation.generate_replies(
            self.model,
            self.tokenizer,
            [history],
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            seed=self.seed + len(self.stopped),
        )
        self.messages = [*history, {"role": "assistant", "content": reply.text}]
        self.stopped.append(reply.stopped)
        return reply.text

    def reset(self) -> None:
        """Start again (the system message stays)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.stopped = []


def chat_loop(
    session: ChatSession,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = print,
) -> int:
    """Read a line, print the reply, until /quit, /exit or end of input; returns the turns taken."""
    write("Chat with the model. /reset starts again, /quit ends.")
    turns = 0
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            return turns
        if text in QUIT_WORDS:
            return turns
        if text == "/reset":
            session.reset()
            write("(new conversation)")
            continue
        if not text:
            continue
        try:
            reply = session.say(text)
        except ValueError as err:  # e.g. special-token text typed by the user
            write(f"(refused: {err})")
            continue
        turns += 1
        limit = "" if session.stopped[-1] else f"  [cut at {session.max_new_tokens} tokens]"
        write(f"model> {reply}{limit}")
