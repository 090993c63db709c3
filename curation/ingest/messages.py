"""Chat messages as TRL takes them: checked, canonicalised, split into prompt and completions.

What a conversation may hold is what TRL's `DPOTrainer` passes to a chat template: `role`
(system, user, assistant, tool), `content`, an assistant's `tool_calls`, a tool message's
`name` and `tool_call_id`, and, per row, a `tools` list of function schemas. Other message
keys stay in the catalog's JSON but do not reach the shards.

Tool-call `arguments` are stored as JSON text (the OpenAI wire format): parquet needs one type
per column, and the arguments of different functions have different keys. Chat templates take
either form.
"""

from __future__ import annotations

import json
from typing import Any

from curation.ingest.candidates import Reject
from curation.schema import Reason

KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool"})


def check_messages(name: str, messages: Any) -> list[dict[str, Any]]:
    """The message list, validated; tool calls canonicalised (a new dict only where one changes)."""
    if not isinstance(messages, list):
        raise Reject(Reason.WRONG_TYPE, f"expected a message list: {name} is {type(messages).__name__}")
    out = messages
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise Reject(Reason.WRONG_TYPE, f"{name}[{i}] is not a {{role, content}} message")
        role = message.get("role")
        if not isinstance(role, str):
            raise Reject(Reason.MISSING_FIELD, f"{name}[{i}] has no role")
        if role not in KNOWN_ROLES:
            raise Reject(Reason.UNKNOWN_ROLE, f"{name}[{i}] has role {role[:30]!r}; expected one of "
                                              f"{', '.join(sorted(KNOWN_ROLES))}")
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise Reject(Reason.WRONG_TYPE, f"{name}[{i}] is a {role} message with tool_calls")
            canonical = _tool_calls(f"{name}[{i}]", calls)
            if canonical is not calls:
                if out is messages:
                    out = list(messages)
                out[i] = {**message, "tool_calls": canonical}
        if not isinstance(content, str) and not (content is None and calls):
            raise Reject(Reason.WRONG_TYPE, f"{name}[{i}] is not a {{role, content}} message")
        for key in ("name", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise Reject(Reason.WRONG_TYPE, f"{name}[{i}].{key} is {type(message[key]).__name__}, not a string")
    return out


def _tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list) or not calls:
        raise Reject(Reason.WRONG_TYPE, f"{where}.tool_calls is not a non-empty list")
    out, changed = [], False
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Reject(Reason.WRONG_TYPE, f"{where}.tool_calls[{k}] has no function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, dict):
            arguments, changed = json.dumps(arguments, ensure_ascii=False), True
        elif not isinstance(arguments, str):
            raise Reject(Reason.WRONG_TYPE, f"{where}.tool_calls[{k}].function.arguments is "
                                            f"{type(arguments).__name__}")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise Reject(Reason.WRONG_TYPE, f"{where}.tool_calls[{k}].id is not a string")
        if "type" not in call or "arguments" not in function:
            changed = True
        out.append({**call, "type": call.get("type") or "function",
                    "function": {**function, "arguments": arguments}})
    return out if changed else calls


def check_tools(value: Any) -> str | None:
    """The row's `tools` column as JSON text (a list of function schemas), or None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Reject(Reason.WRONG_TYPE, "tools is not a JSON list of function schemas") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise Reject(Reason.WRONG_TYPE, "tools is not a list of function schemas")
    return json.dumps(value, ensure_ascii=False) if value else None


def split_prompt(chosen: list, rejected: list) -> tuple[list, list, list] | None:
    """TRL's `extract_prompt`: the shared leading messages are the prompt; None when they share none.

    Each side keeps at least one message, so a pair whose lists are equal reaches the
    identical-sides check instead of losing its completion.
    """
    shared, limit = 0, min(len(chosen), len(rejected)) - 1
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        return None
    return chosen[:shared], chosen[shared:], rejected[shared:]


def with_system(system: Any, prompt: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A system column becomes the first message (once: an identical system turn is not repeated)."""
    if system is None or system == "":
        return prompt
    if not isinstance(system, str):
        raise Reject(Reason.WRONG_TYPE, f"expected a string: system is {type(system).__name__}")
    if prompt and prompt[0].get("role") == "system":
        if prompt[0].get("content") == system:
            return prompt
        raise Reject(Reason.CONFLICTING_SYSTEM, "the system column differs from the prompt's own system turn")
    return [{"role": "system", "content": system}, *prompt]


def _text(message: dict[str, Any]) -> str:
    text = message.get("content") or ""
    calls = message.get("tool_calls")
    if calls:
        rendered = "\n".join(f"{c['function']['name']}({c['function']['arguments']})" for c in calls)
        text = f"{text}\n{rendered}" if text else rendered
    return text


def render_messages(messages: list[dict[str, Any]]) -> str:
    """A plain-text view of a conversation for text statistics (the shards keep the messages)."""
    return "".join(f"\n\n{m['role'].capitalize()}: {_text(m)}" for m in messages)


def contents(messages: list[dict[str, Any]]) -> str:
    """The text of a completion: its messages' contents (and tool calls), one after another."""
    if len(messages) == 1 and not messages[0].get("tool_calls"):
        return messages[0]["content"]
    return "\n\n".join(_text(m) for m in messages)
