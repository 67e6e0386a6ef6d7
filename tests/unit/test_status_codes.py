"""The one table of reasons and status codes (`rpc_errors.STATUS_CODES`) against what the
service sends and what its contract documents.

Documented reasons are read from the comments of protos/: every upper-case name with an
underscore, but the proto's own enum values and UMBRA_* environment variables. A code
followed by a reason ("NOT_FOUND USER_NOT_FOUND", "ALREADY_EXISTS with reason HANDLE_TAKEN",
"NOT_FOUND (USER_NOT_FOUND)") documents that reason's code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc

from umbra_grpc import rpc_errors
from umbra_grpc.domain import errors
from umbra_grpc.rpc_errors import STATUS_CODES

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))
SERVICE = ROOT / "umbra_grpc"
# Names in proto comments that are not reasons.
_ENUM_VALUE = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=\s*\d+\s*;", re.MULTILINE)
_NAME = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
_CODE_NAMES = "|".join(code.name for code in grpc.StatusCode)
_CODE_THEN_REASON = re.compile(
    rf"\b({_CODE_NAMES})\s+(?:with reason\s+|\()?([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b"
)


def _comments(path: Path) -> str:
    text = path.read_text()
    lines = (line.split("//", 1)[1] for line in text.splitlines() if "//" in line)
    return " ".join(line.strip() for line in lines)


def _enum_values() -> set[str]:
    return {name for path in PROTOS for name in _ENUM_VALUE.findall(path.read_text())}


def documented_reasons() -> set[str]:
    names = {name for path in PROTOS for name in _NAME.findall(_comments(path))}
    return {name for name in names - _enum_values() if not name.startswith("UMBRA_")}


def domain_errors() -> list[type[errors.DomainError]]:
    found: list[type[errors.DomainError]] = [errors.DomainError]
    for kind in found:
        found.extend(kind.__subclasses__())
    return found


def service_strings() -> set[str]:
    """Every string literal in the service's code, but the table's own and the client's."""
    strings: set[str] = set()
    for path in SERVICE.rglob("*.py"):
        if path == Path(rpc_errors.__file__) or "client" in path.relative_to(SERVICE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return strings


def test_every_domain_error_has_the_code_of_its_branch() -> None:
    for kind in domain_errors():
        assert kind.reason in STATUS_CODES, kind
        # The branch: the class right below DomainError that this one descends from.
        branch = next(
            (
                base
                for base in kind.__mro__
                if issubclass(base, errors.DomainError) and errors.DomainError in base.__bases__
            ),
            kind,
        )
        assert STATUS_CODES[kind.reason] == STATUS_CODES[branch.reason], kind


def test_every_documented_reason_is_in_the_table() -> None:
    documented = documented_reasons()
    assert {"USER_NOT_FOUND", "RATE_LIMITED", "STORAGE_BUSY"} <= documented  # the reader works
    assert documented - STATUS_CODES.keys() == set()


def test_documented_codes_are_the_table_codes() -> None:
    pairs = {
        (code, reason)
        for path in PROTOS
        for code, reason in _CODE_THEN_REASON.findall(_comments(path))
    }
    assert ("RESOURCE_EXHAUSTED", "RATE_LIMITED") in pairs  # the reader works
    assert {(code, reason) for code, reason in pairs if STATUS_CODES[reason].name != code} == set()


def test_every_reason_in_the_table_is_sent_or_documented() -> None:
    sent = {kind.reason for kind in domain_errors()} | service_strings()
    assert STATUS_CODES.keys() - sent - documented_reasons() == set()


def test_a_status_carries_the_code_of_its_reason() -> None:
    status = rpc_errors.error_status("RATE_LIMITED", "slow down", retry_after=1.5)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.details == "slow down"


def test_no_reason_has_two_codes() -> None:
    listed = [reason for reasons in rpc_errors._REASONS.values() for reason in reasons]
    assert len(listed) == len(STATUS_CODES)
