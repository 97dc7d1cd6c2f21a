"""Spec errors: one SpecError listing every problem as `<yaml.path>: <message> (got <value>)`."""

import difflib
from collections.abc import Sequence
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

_NO_VALUE: Any = object()


def show_value(value: Any) -> str:
    """Render a user value the way they would have written it in YAML, kept short."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, BaseModel):
        text = repr(value.model_dump(mode="json", by_alias=True, exclude_none=True))
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_problem(path: str, message: str, value: Any = _NO_VALUE) -> str:
    head = f"{path}: {message}" if path else message
    return head if value is _NO_VALUE else f"{head} (got {show_value(value)})"


def join_path(base: str, field: str) -> str:
    if not field:
        return base
    if not base or field.startswith("["):
        return base + field
    return f"{base}.{field}"


class FieldError(ValueError):
    """A broken rule found by a validator, naming the field relative to where it was raised.

    Validators only know their own model, not where it sits in the document; the converter
    below prefixes `field` with the location pydantic reports, giving the full YAML path.
    """

    def __init__(self, field: str, message: str, value: Any = _NO_VALUE) -> None:
        self.field = field
        self.message = message
        self.value = value
        super().__init__(format_problem(field, message, value))


class FieldErrors(ValueError):
    """Several FieldErrors from one validator, so a user sees them all in one round."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(err) for err in self.errors))


def raise_all(errors: Sequence[FieldError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise FieldErrors(errors)


class SpecError(ValueError):
    """An R1Deployment document that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str], origin: str | None = None) -> None:
        self.problems = list(problems)
        self.origin = origin
        where = f"{origin}: " if origin else ""
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{where}invalid R1Deployment:\n{lines}")


def _lookup_field(model: type[BaseModel], key: str) -> tuple[str, Any] | None:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info.alias or name, info.annotation
    return None


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def alias_path(root: type[BaseModel], loc: Sequence[int | str]) -> tuple[str, type[BaseModel] | None]:
    """Turn a pydantic location into the camelCase YAML path; also return the model holding
    the last key (for "did you mean" hints). Python names are mapped to aliases because
    `populate_by_name` makes pydantic report whichever spelling the input used."""
    path = ""
    current: type[BaseModel] | None = root
    holder: type[BaseModel] | None = root
    for key in loc:
        if isinstance(key, int):
            path += f"[{key}]"
            continue
        holder = current
        found = _lookup_field(current, key) if current is not None else None
        if found is None:
            path, current = join_path(path, str(key)), None
            continue
        alias, annotation = found
        path = join_path(path, alias)
        current = _nested_model(annotation)
    return path, holder


def _unknown_field_message(key: Any, holder: type[BaseModel] | None) -> str:
    message = "unknown field"
    if holder is not None and isinstance(key, str):
        known = [info.alias or name for name, info in holder.model_fields.items()]
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            message += f" (did you mean {close[0]!r}?)"
        else:
            message += f"; allowed: {', '.join(sorted(known))}"
    return message


def _problems_from_error(root: type[BaseModel], error: Any) -> list[str]:
    path, holder = alias_path(root, error["loc"])
    kind = error["type"]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldErrors):
        return [format_problem(join_path(path, e.field), e.message, e.value) for e in cause.errors]
    if isinstance(cause, FieldError):
        return [format_problem(join_path(path, cause.field), cause.message, cause.value)]
    if kind == "missing":
        return [format_problem(path, "required field is missing")]
    if kind == "extra_forbidden":
        key = error["loc"][-1] if error["loc"] else None
        return [format_problem(path, _unknown_field_message(key, holder), error["input"])]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return [format_problem(path, "must be a mapping", error["input"])]
    message = str(cause) if cause is not None else error["msg"]
    message = message[:1].lower() + message[1:]
    return [format_problem(path or "<document>", message, error["input"])]


def validation_problems(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """Every problem in a pydantic ValidationError, as full camelCase YAML paths."""
    problems: list[str] = []
    for error in err.errors():
        for problem in _problems_from_error(root, error):
            if problem not in problems:
                problems.append(problem)
    return problems
