"""Chat templates: choosing one, and rendering a prompt and its completion so the boundary is exact.

The prompt is rendered with the generation prompt; prompt + completion is rendered whole. The
completion is what follows the prompt, so the rendered prompt must be an exact prefix of the whole
rendering (in text and in tokens). Templates that inject a system prompt only in one of the two,
rewrite earlier turns, or strip reasoning from them break that; such a template is refused with the
row and the template named, since training on a shifted boundary silently teaches the wrong tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dpo.data.validate import DataError


def resolve_chat_template(setting: str | None, tokenizer: Any) -> tuple[str | None, str]:
    """The chat template to use and how to name it in messages.

    Args:
        setting: ``data.chat_template``: a Jinja template, a path to a file holding one, or ``None`` for
            the tokenizer's own template.
        tokenizer: the model's tokenizer.

    Returns:
        ``(template, label)``; ``template`` is ``None`` when neither the recipe nor the tokenizer has one.
    """
    if setting is None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # some tokenizers ship several named templates
            template = template.get("default")
        return template, "the tokenizer's chat template"
    if "{{" in setting or "{%" in setting:
        return setting, "data.chat_template (inline)"
    path = Path(setting).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.chat_template: '{setting}' is neither a Jinja template (no '{{{{' or '{{%') nor an existing file"
        )
    try:
        return path.read_text(encoding="utf-8"), f"data.chat_template ({setting})"
    except UnicodeDecodeError:
        raise DataError(f"data.chat_template: {setting} is not UTF-8 text") from None


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    """The template's text for ``messages``."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def prefix_mismatch(prompt: str | list[int], whole: str | list[int]) -> int | None:
    """The first position where ``whole`` stops starting with ``prompt``; ``None`` if it does."""
    if whole[: len(prompt)] == prompt:
        return None
    for i, (a, b) in enumerate(zip(prompt, whole)):
        if a != b:
            return i
    return min(len(prompt), len(whole))


def prefix_error(
    where: str, label: str, side: str, prompt: str | list[str], whole: str | list[str], at: int
) -> DataError:
    """The error for a prompt that is not a prefix of prompt + completion.

    Args:
        where: the row (``file, line N``).
        label: the template's name (see :func:`resolve_chat_template`).
        side: ``chosen``, ``rejected`` or ``completion``.
        prompt: the rendered prompt, as text or as token strings.
        whole: the rendered prompt + completion, in the same form.
        at: the first differing position (a character or a token).
    """
    unit, context = ("character", 40) if isinstance(prompt, str) else ("token", 6)
    start = max(0, at - context)
    return DataError(
        f"{where}: {label} breaks the prompt/completion boundary: prompt + {side} does not start with the "
        f"prompt rendered with the generation prompt (first difference at {unit} {at}).\n"
        f"  prompt renders as      ...{prompt[start:at + context]!r}\n"
        f"  prompt + {side} renders as ...{whole[start:at + context]!r}\n"
        "The template changes earlier turns once a completion follows (an injected system prompt, rewritten "
        "or stripped turns). Use a template that renders earlier turns identically, via data.chat_template."
    )
