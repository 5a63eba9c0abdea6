"""Validation errors in the words of someone writing YAML: `relays[isp].tls: reason`."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from etrnd.config.model import key_path
from etrnd.config.yamlsource import Document, Loc, Place

_BOOLEAN_WORDS = "unquoted yes/no/on/off/true/false are booleans"
# What a list holds, for "the list is empty; give at least one ...".
_ITEM = {"relays": "relay", "etrn": "argument", "hosts": "host", "interfaces": "interface"}


def relay_names(data: object) -> dict[int, str]:
    """Each relay's position -> the name problems call it by (its label: name, else host,
    else first of hosts). A relay without one, or sharing it, keeps its position."""
    items = data.get("relays") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        return {}
    names: dict[int, str] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue
        hosts = item.get("hosts")
        for name in (item.get("name"), item.get("host"),
                     hosts[0] if isinstance(hosts, list) and hosts else hosts):
            if isinstance(name, str) and name:
                names[i] = name
                break
    counts = list(names.values())
    return {i: n for i, n in names.items() if counts.count(n) == 1}


def _data_loc(loc: tuple[int | str, ...]) -> Loc:
    # Pydantic puts validator names (e.g. "function-after[...]") into some locations.
    return tuple(p for p in loc if not (isinstance(p, str) and "[" in p))


def problems(exc: ValidationError, doc: Document | None, data: object,
             model: type[BaseModel] | None = None) -> Iterator[str]:
    """One `key.path: reason` line per error, relays named by name, the value echoed; an
    unknown key gets the nearest key of `model` (the schema) at that place, if any."""
    names = relay_names(data)
    errors = exc.errors(include_url=False)
    locs = [_data_loc(err["loc"]) for err in errors]
    for err, loc in zip(errors, locs, strict=True):
        # A list whose items failed also reports "too short": only the items' reasons help.
        if err["type"] == "too_short" and any(o[:len(loc)] == loc and o != loc for o in locs):
            continue
        place = doc.place(loc) if doc is not None else None
        reason = _reason(err, loc, place)
        if err["type"] == "extra_forbidden" and model is not None and loc:
            near = nearest_key(model, loc)
            reason += f"; did you mean {near}?" if near else ""
        if err.get("input") is None and place is not None and doc is not None:
            word = doc.comment_on(place.line)
            if word is not None:
                reason += (f" ('#' starts a comment, so YAML read nothing here; "
                           f"quote it: \"{word}\")")
        yield f"{key_path(loc, names)}: {reason}"


def nearest_key(model: type[BaseModel], loc: Loc) -> str | None:
    """The key meant by the unknown last key of `loc`: a close spelling at that place
    (`relay` -> `relays`), or the same key one level down (`username` -> `auth.username`)."""
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return None
    wrong = str(loc[-1])
    close = difflib.get_close_matches(wrong, list(parent.model_fields), n=1, cutoff=0.75)
    if close:
        return close[0]
    for name, info in parent.model_fields.items():
        for child in _models_in(info.annotation):
            if wrong in child.model_fields:
                return f"{name}.{wrong}"
    return None


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    current = model
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: the list's model
        info = current.model_fields.get(part)
        found = _models_in(info.annotation) if info is not None else []
        if not found:
            return None
        current = found[0]
    return current


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _shown(value: object, place: Place | None) -> str:
    """The value as the user wrote it, quoted when it was text, cut when long."""
    if place is not None and place.text is not None:
        text = place.text if place.tag != "str" else repr(place.text)
    elif isinstance(value, list | tuple):
        return "a list"
    elif isinstance(value, dict):
        return "a mapping"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: object, place: Place | None) -> str | None:
    """What YAML made of a plain word that was meant as text, or None."""
    if isinstance(value, bool):
        word = place.text if place is not None and place.text else str(value).lower()
        return f"YAML read {word} as {str(value).lower()} ({_BOOLEAN_WORDS})"
    if isinstance(value, int | float):
        word = place.text if place is not None and place.text else repr(value)
        return f"YAML read {word} as a number"
    return None


def _reason(err: Any, loc: Loc, place: Place | None) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    shown = _shown(value, place)
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if value is None and kind in ("tuple_type", "list_type"):
        return "is empty: write a list, e.g. [a, b]"
    if value is None and kind in ("dict_type", "model_type"):
        return "is empty: give its keys (key: value), or leave it out for the defaults"
    if value is None and kind not in ("value_error", "assertion_error"):
        return "is empty"
    if kind in ("tuple_type", "list_type"):
        if isinstance(value, dict):
            return "should be a list, e.g. [a, b], not a mapping"
        written = place.text if place is not None and place.plain and place.text else shown
        return f"should be a list: write [{written}]"
    if kind in ("dict_type", "model_type"):
        return f"should be a mapping of keys (key: value), not {shown}"
    if kind == "too_short":
        noun = _ITEM.get(str(loc[-1]) if loc else "", "item")
        return f"the list is empty; give at least one {noun}"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        yaml_kind = _kind(value, place)
        if yaml_kind is not None:
            return f"{yaml_kind}; write one of {expected}"
        return f"must be {expected}, not {shown}"
    if kind == "string_type":
        yaml_kind = _kind(value, place)
        if yaml_kind is not None:
            word = place.text if place is not None and place.text else str(value)
            return f"{yaml_kind}; quote it: '{word}'"
        return f"should be a single value, not {shown}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"should be a whole number, not {shown}"
    if kind in ("float_parsing", "float_type"):
        return f"should be a number, not {shown}"
    if kind in ("bool_parsing", "bool_type"):
        return f"should be true or false, not {shown}"
    if kind == "greater_than_equal":
        return f"should be {ctx['ge']:g} or more, not {shown}"
    if kind == "greater_than":
        return f"should be more than {ctx['gt']:g}, not {shown}"
    if kind == "less_than_equal":
        return f"should be {ctx['le']:g} or less, not {shown}"
    if kind == "less_than":
        return f"should be less than {ctx['lt']:g}, not {shown}"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


__all__ = ["key_path", "problems", "relay_names"]
