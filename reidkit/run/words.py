"""Words for printed lines: a count with its noun in the number it needs ('1 query')."""
from __future__ import annotations


def counted(number: int, singular: str, plural: str | None = None) -> str:
    """'1 image', '12,345 images': `number` (thousands separated) and `singular` for one,
    `plural` (default: `singular` + 's') for any other number."""
    return f'{number:,} {singular if number == 1 else plural or singular + "s"}'
