"""The rows the sync hands to COPY."""

from __future__ import annotations

import json

import pytest

from webapp.services.sync import _json_strings


@pytest.mark.parametrize(
    "values",
    [[], ["\\Seen"], ["a@b.com", "c@d.com"], ['quo"te\\', "café ✓", "\x00\x1f\n", "\ud800"]],
)
def test_json_of_the_list_columns_is_what_json_dumps_writes(values):
    assert _json_strings(values) == json.dumps(values)
