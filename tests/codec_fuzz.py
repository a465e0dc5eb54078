"""One fuzz check shared by the value-grid codecs' tests: mutated sections only ever raise BadInputError."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import strategies as st

from weightless_cli.errors import BadInputError


def mutated_sections(data: st.DataObject, sections: dict[str, bytes]) -> dict[str, bytes]:
    """``sections`` with one of them hit by 1-4 byte overwrites and maybe a truncation."""
    name = data.draw(st.sampled_from(sorted(sections)))
    raw = bytearray(sections[name])
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    return {**sections, name: bytes(raw[:cut] if data.draw(st.booleans()) else raw)}


def check_decode_survives(data: st.DataObject, decode: Callable, params: dict, sections: dict,
                          shape: tuple[int, ...]) -> None:
    """A mutated record decodes to a float32 tensor of the right shape, or is a one-line BadInputError."""
    try:
        decoded = decode(params, mutated_sections(data, sections), shape, "float32")
    except BadInputError as exc:
        assert "\n" not in str(exc)
    else:
        assert decoded.shape == shape and decoded.dtype == np.float32
