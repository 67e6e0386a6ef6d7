"""A resolver for made-up names (no DNS, no /etc/hosts): the seam of `Destinations`."""

from __future__ import annotations

from collections import Counter

from umbra_grpc.destinations import system_resolver


class Names:
    """Answers each listed name with its answers in turn (the last one repeating).

    Anything else (literal addresses in any spelling, unknown names) goes to the system
    resolver. `lookups` counts the lookups of each name.
    """

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self._answers = {name: list(sequence) for name, sequence in answers.items()}
        self.lookups: Counter[str] = Counter()

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups[host] += 1
        sequence = self._answers.get(host)
        if sequence is None:
            return await system_resolver(host, port)
        return sequence.pop(0) if len(sequence) > 1 else sequence[0]
