"""Requests built from descriptors alone: a new RPC or field is fuzzed without touching this.

`methods` lists every method of the given service descriptors. `Known` keeps the values that
responses carried (ids, handles, page tokens), per caller and for everyone. `RequestMaker`
fills any message: each field by its type, with boundaries, odd strings, near misses of known
values and values its name hints at. The only naming conventions it relies on are the API's
own (AIP): a field `x_id` (or `x_ids`) holds ids of the message type `...X`, or of any field
named `..._x_id`; a `google.protobuf.FieldMask` holds paths of the message fields beside it.

Two modes: `valid` builds plausible calls between existing users (a caller's own request ids,
real handles, valid enum values and masks), so the mutating paths run concurrently against
real rows; `hostile` builds everything else.
"""

from __future__ import annotations

import collections
import functools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from google.protobuf import message_factory
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FieldDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message

from tests.fuzz import values

if TYPE_CHECKING:
    from google._upb import _message as upb

# Descriptors at run time are upb's (the default backend); the stubs type the pure-Python
# classes apart from them, and Message.DESCRIPTOR as either.
MessageDescriptor: TypeAlias = "Descriptor | upb.Descriptor"
Field: TypeAlias = "FieldDescriptor | upb.FieldDescriptor"

FIELD_MASK = "google.protobuf.FieldMask"
MAX_DEPTH = 4
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: values.INT32,
    FieldDescriptor.TYPE_SINT32: values.INT32,
    FieldDescriptor.TYPE_SFIXED32: values.INT32,
    FieldDescriptor.TYPE_INT64: values.INT64,
    FieldDescriptor.TYPE_SINT64: values.INT64,
    FieldDescriptor.TYPE_SFIXED64: values.INT64,
    FieldDescriptor.TYPE_UINT32: values.UINT32,
    FieldDescriptor.TYPE_FIXED32: values.UINT32,
    FieldDescriptor.TYPE_UINT64: values.UINT64,
    FieldDescriptor.TYPE_FIXED64: values.UINT64,
}
_STRING = (FieldDescriptor.TYPE_STRING,)


@dataclass(frozen=True)
class Method:
    """One RPC, as its descriptor tells it."""

    service: str
    name: str
    input: type[Message]
    output: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


def methods(*services: ServiceDescriptor) -> list[Method]:
    """Every method of these services."""
    return [
        Method(
            service=service.full_name,
            name=method.name,
            input=message_factory.GetMessageClass(method.input_type),
            output=message_factory.GetMessageClass(method.output_type),
            client_streaming=method.client_streaming,
            server_streaming=method.server_streaming,
        )
        for service in services
        for method in service.methods
    ]


@functools.cache
def snake(name: str) -> str:
    """ConnectionRequest -> connection_request."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Known:
    """Values seen in responses, keyed by (message name, field name), per caller and shared.

    Shared pools keep a random sample (reservoir) so old and new values both stay in play.
    """

    SHARED = 2000
    OWN = 64

    def __init__(self) -> None:
        self._shared: dict[tuple[str, str], list[object]] = collections.defaultdict(list)
        self._seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._own: dict[tuple[str, str], dict[str, collections.deque[object]]] = (
            collections.defaultdict(dict)
        )
        self._rng = random.Random(0)
        # keys_for's answers, by request field, with the number of pools they were made from.
        self._keys: dict[str, tuple[int, list[tuple[str, str]]]] = {}

    def harvest(self, owner: str, message: Message) -> None:
        """Records every non-default scalar of `message` (recursively) for `owner`."""
        for key, value in _scalars(message):
            self._add(owner, key, value)

    def _add(self, owner: str, key: tuple[str, str], value: object) -> None:
        self._seen[key] += 1
        shared = self._shared[key]
        if len(shared) < self.SHARED:
            shared.append(value)
        else:
            slot = self._rng.randrange(self._seen[key])
            if slot < self.SHARED:
                shared[slot] = value
        own = self._own[key].setdefault(owner, collections.deque(maxlen=self.OWN))
        own.append(value)

    def keys_for(self, message: MessageDescriptor, field: Field) -> list[tuple[str, str]]:
        """The pools a request field draws its plausible values from."""
        cached = self._keys.get(field.full_name)
        if cached is not None and cached[0] == len(self._shared):
            return cached[1]
        name = field.name
        if field.is_repeated and name.endswith("s"):
            name = name[:-1]
        owner = snake(message.name)
        keys = [key for key in list(self._shared) if _feeds(key, name, owner)]
        self._keys[field.full_name] = (len(self._shared), keys)
        return keys

    def pick(
        self, rng: random.Random, keys: list[tuple[str, str]], owner: str | None, kind: type
    ) -> object | None:
        """A value from these pools (the owner's own when asked and there are some)."""
        keys = [key for key in keys if self._shared[key] and isinstance(self._shared[key][0], kind)]
        if not keys:
            return None
        key = rng.choice(keys)
        if owner is not None:
            own = self._own[key].get(owner)
            if own:
                # The latest are likeliest still to be live (a request still pending).
                return own[-1 - min(int(rng.expovariate(0.3)), len(own) - 1)]
        return rng.choice(self._shared[key])

    def any_of(self, rng: random.Random, kind: type) -> object | None:
        """A value of any pool of this kind: an id of the wrong type, a handle as a token."""
        keys = [key for key, pool in self._shared.items() if pool and isinstance(pool[0], kind)]
        return rng.choice(self._shared[rng.choice(keys)]) if keys else None


def _feeds(source: tuple[str, str], name: str, owner: str) -> bool:
    """Whether values of response field `source` suit request field `name` of `owner`."""
    source_message, source_field = source
    if name == "id":  # User.id <- User.id, connected_user_id
        return (source_field == "id" and source_message == owner) or source_field.endswith(
            f"{owner}_id"
        )
    if source_field.endswith(name):  # user_id <- connected_user_id, page_token <- next_...
        return True
    # request_id <- ConnectionRequest.id
    stem = name.removesuffix("_id")
    return stem != name and source_field == "id" and source_message.endswith(stem)


def _scalars(message: Message) -> Iterator[tuple[tuple[str, str], object]]:
    owner = snake(message.DESCRIPTOR.name)
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _message_type(field).GetOptions().map_entry:
                continue
            items = value if field.is_repeated else (value,)
            for item in items:
                yield from _scalars(item)
        elif field.type in _INT_RANGES or field.type in _STRING:
            items = value if field.is_repeated else (value,)
            for item in items:
                if item:
                    yield (owner, field.name), item


@dataclass
class Draw:
    """What one request is being built for."""

    rng: random.Random
    owner: str | None  # the caller whose own known values are preferred
    valid: bool


class RequestMaker:
    """Fills request messages from their descriptors."""

    def __init__(self, known: Known) -> None:
        self.known = known

    def message(self, cls: type[Message], draw: Draw) -> Message:
        """A new request of this type."""
        message = cls()
        self._fill(message, draw, 0)
        return message

    def _fill(self, message: Message, draw: Draw, depth: int) -> None:
        rng = draw.rng
        descriptor = message.DESCRIPTOR
        for oneof in descriptor.oneofs:
            if not _is_synthetic(oneof) and rng.random() < (0.9 if draw.valid else 0.8):
                fields: Sequence[Field] = oneof.fields
                self._set(message, rng.choice(fields), draw, depth)
        for field in descriptor.fields:
            if field.containing_oneof is not None and not _is_synthetic(field.containing_oneof):
                continue
            presence = 0.6 if field.has_presence else 0.9
            if rng.random() < presence:
                self._set(message, field, draw, depth)

    def _set(self, message: Message, field: Field, draw: Draw, depth: int) -> None:
        rng = draw.rng
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if _message_type(field).GetOptions().map_entry:
                target = getattr(message, field.name)
                for _ in range(rng.choice((0, 1, 3, 20))):
                    key = values.random_text(rng, rng.randint(0, 8))
                    target[key] = values.random_text(rng, rng.randint(0, 16))
                return
            if _message_type(field).full_name == FIELD_MASK:
                paths = self._mask_paths(message.DESCRIPTOR, field, draw)
                getattr(message, field.name).paths.extend(paths)
                return
            if depth >= MAX_DEPTH:
                return
            if field.is_repeated:
                for _ in range(self._count(draw, small=True)):
                    self._fill(getattr(message, field.name).add(), draw, depth + 1)
                return
            child = getattr(message, field.name)
            child.SetInParent()
            self._fill(child, draw, depth + 1)
            return
        if field.is_repeated:
            # Many elements are drawn from a few: a thousand ids cost what twenty do.
            count = self._count(draw)
            drawn = [self._scalar(message.DESCRIPTOR, field, draw) for _ in range(min(count, 20))]
            items = drawn if count <= 20 else rng.choices(drawn, k=count)
            getattr(message, field.name).extend(items)
            return
        setattr(message, field.name, self._scalar(message.DESCRIPTOR, field, draw))

    def _count(self, draw: Draw, *, small: bool = False) -> int:
        if draw.valid or small:
            return draw.rng.choice((0, 1, 2, 3, 5))
        return draw.rng.choice((0, 1, 2, 3, 10, 100, 999, 1000, 1001, 3000))

    def _scalar(self, parent: MessageDescriptor, field: Field, draw: Draw) -> Any:
        kind = field.type
        if kind == FieldDescriptor.TYPE_BOOL:
            return draw.rng.random() < 0.7
        if kind == FieldDescriptor.TYPE_ENUM:
            return self._enum(field, draw)
        if kind in _INT_RANGES:
            return self._integer(parent, field, draw)
        if kind == FieldDescriptor.TYPE_STRING:
            return self._string(parent, field, draw)
        if kind == FieldDescriptor.TYPE_BYTES:
            return draw.rng.randbytes(draw.rng.choice((0, 1, 16, 300)))
        return draw.rng.choice(values.FLOATS)

    def _enum(self, field: Field, draw: Draw) -> int:
        rng = draw.rng
        numbers = [value.number for value in _enum_type(field).values]
        if draw.valid and rng.random() < 0.9:
            return rng.choice([n for n in numbers if n != 0] or numbers)
        # Proto3 enums are open: any int32 goes over the wire.
        return rng.choice(
            (*numbers, max(numbers) + 1, -1, 2**31 - 1, -(2**31), rng.randint(-9, 99))
        )

    def _integer(self, parent: MessageDescriptor, field: Field, draw: Draw) -> int:
        rng = draw.rng
        low, high = _INT_RANGES[field.type]
        keys = self.known.keys_for(parent, field)
        roll = rng.random()
        value: object | None = None
        if draw.valid:
            if roll < 0.9:
                value = self.known.pick(rng, keys, draw.owner if roll < 0.7 else None, int)
            if value is None:
                value = rng.choice((0, 1, 2, 5, 10, 20, 50, 100)) if "size" in field.name else None
            if value is None:
                value = rng.randint(1, 1000)
        else:
            if roll < 0.25:
                value = self.known.pick(rng, keys, None, int)
            elif roll < 0.4:
                value = self.known.any_of(rng, int)  # an id of another kind
            elif roll < 0.8:
                value = rng.choice(values.INT_BOUNDARIES)
            if value is None:
                value = rng.randint(low, high) if rng.random() < 0.5 else rng.randint(-5, 10_000)
        assert isinstance(value, int)
        return min(max(value, low), high)

    def _string(self, parent: MessageDescriptor, field: Field, draw: Draw) -> str:
        rng = draw.rng
        keys = self.known.keys_for(parent, field)
        plausible, hostile = values.hinted(field.name)
        roll = rng.random()
        value: object | None = None
        if draw.valid:
            if roll < 0.6:
                value = self.known.pick(rng, keys, draw.owner if roll < 0.3 else None, str)
            if value is None and plausible:
                value = rng.choice(plausible)
            if value is None:
                value = values.random_handle(rng) if "name" in field.name else ""
        else:
            if roll < 0.3:
                known = self.known.pick(rng, keys, None, str)
                if known is not None:
                    value = values.mutate(rng, str(known)) if rng.random() < 0.7 else known
            elif roll < 0.4:
                value = self.known.any_of(rng, str)
            elif roll < 0.6 and (plausible or hostile):
                value = rng.choice((*plausible, *hostile))
            elif roll < 0.7:
                value = values.random_text(rng, rng.choice((1, 3, 10, 50, 51, 101, 600)))
            if value is None:
                value = rng.choice(values.ODD_STRINGS)
        return str(value)

    def _mask_paths(self, parent: MessageDescriptor, mask: Field, draw: Draw) -> list[str]:
        """Paths of the message fields beside the mask: valid, nested, unknown, repeated."""
        rng = draw.rng
        valid: list[str] = []
        for sibling in parent.fields:
            if sibling is mask or sibling.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            for field in _message_type(sibling).fields:
                valid.append(field.name)
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    valid.extend(
                        f"{field.name}.{inner.name}" for inner in _message_type(field).fields
                    )
        if not valid:
            valid = [field.name for field in parent.fields if field is not mask]
        if draw.valid:
            return rng.sample(valid, rng.choice((0, 1, 1, 2, 3)) if len(valid) > 2 else 1)
        wrong = (
            "nope",
            "",
            ".",
            "a..b",
            *(f"{sibling.name}.{path}" for sibling in parent.fields for path in valid[:2]),
            *(path.upper() for path in valid[:3]),
            *(f"{path}.deeper" for path in valid[:3]),
            *(f"{path} " for path in valid[:2]),
        )
        paths = [
            rng.choice(valid)
            if rng.random() < 0.6
            else rng.choice((*wrong, *values.ODD_STRINGS[:20]))
            for _ in range(rng.choice((0, 1, 2, 5, 50)))
        ]
        if paths and rng.random() < 0.3:
            paths.append(rng.choice(paths))  # a duplicate
        return paths


def _message_type(field: Field) -> MessageDescriptor:
    assert field.message_type is not None, field.full_name
    return field.message_type


def _enum_type(field: Field) -> upb.EnumDescriptor | EnumDescriptor:
    assert field.enum_type is not None, field.full_name
    return field.enum_type


def _is_synthetic(oneof: Any) -> bool:
    """A proto3 `optional` field sits in a synthetic oneof of its own."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"
