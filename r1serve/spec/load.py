"""Reading R1Deployment manifests (YAML files, YAML text or dicts) into the typed spec model."""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from r1serve.spec.errors import SpecError, format_problem, validation_problems
from r1serve.spec.model import API_VERSION, KIND, R1Deployment

Source = str | os.PathLike | Mapping[str, Any]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML silently resolves to the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable keys are reported by the base constructor below
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    detail = f"{what} ({context})" if context else what
    if mark is None:
        return f"invalid YAML: {detail}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {detail}"


def _parse_documents(text: str, origin: str) -> list[Any]:
    try:
        documents = list(yaml.load_all(text, Loader=_StrictLoader))
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_problem(exc)], origin) from None
    return [doc for doc in documents if doc is not None]


def _pick_document(documents: list[Any], origin: str) -> Any:
    """The single document, or the first R1Deployment of a multi-document file."""
    if not documents:
        raise SpecError(["the file holds no document"], origin)
    if len(documents) == 1:
        return documents[0]
    for doc in documents:
        if isinstance(doc, Mapping) and doc.get("kind") == KIND:
            return doc
    kinds = ", ".join(
        str(doc.get("kind")) if isinstance(doc, Mapping) else type(doc).__name__
        for doc in documents
    )
    raise SpecError([f"no document has kind: {KIND} (found: {kinds})"], origin)


def _header_problems(doc: Mapping[str, Any]) -> list[str]:
    problems = []
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if key not in doc:
            problems.append(format_problem(key, f"required field is missing (expected {expected!r})"))
        elif doc[key] != expected:
            problems.append(format_problem(key, f"must be {expected!r}", doc[key]))
    return problems


def parse_r1deployment(doc: Any, origin: str | None = None) -> R1Deployment:
    """Validate one already-parsed document; raise SpecError listing every problem."""
    if not isinstance(doc, Mapping):
        raise SpecError([format_problem("", "the document must be a mapping", doc)], origin)
    problems = _header_problems(doc)
    if problems:
        # A wrong kind means some other resource: its fields would only add noise.
        raise SpecError(problems, origin)
    try:
        return R1Deployment.model_validate(dict(doc))
    except ValidationError as exc:
        raise SpecError(validation_problems(exc, R1Deployment), origin) from None


def loads_r1deployment(text: str, origin: str = "<string>") -> R1Deployment:
    """Parse YAML text (one document, or the first R1Deployment of several)."""
    return parse_r1deployment(_pick_document(_parse_documents(text, origin), origin), origin)


def load_r1deployment(source: Source) -> R1Deployment:
    """Load an R1Deployment from a YAML file path or an already-parsed dict.

    A str containing a newline is taken as YAML text (no file path has one). Raises
    SpecError (a ValueError) whose message lists each problem as
    `<yaml.path>: <message> (got <value>)`; unreadable files and YAML syntax errors too.
    """
    if isinstance(source, Mapping):
        return parse_r1deployment(source)
    if isinstance(source, str) and "\n" in source:
        return loads_r1deployment(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError([f"cannot read the file: {reason}"], str(path)) from None
    return loads_r1deployment(text, origin=str(path))
