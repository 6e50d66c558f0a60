"""The download's Content-Disposition for names a job chose."""

from __future__ import annotations

import pytest
from gpujobq.controller.artifacts import attachment


@pytest.mark.parametrize(("name", "expected"), [
    ("model.pt", "attachment; filename=\"model.pt\"; filename*=UTF-8''model.pt"),
    ("a/b/c.txt", "attachment; filename=\"c.txt\"; filename*=UTF-8''c.txt"),
    ('x"; evil=1.txt', "attachment; filename=\"x__ evil=1.txt\"; "
                       "filename*=UTF-8''x%22%3B%20evil%3D1.txt"),
    ("résumé\n.txt", "attachment; filename=\"r_sum__.txt\"; "
                     "filename*=UTF-8''r%C3%A9sum%C3%A9%0A.txt"),
    ("dir/", "attachment; filename=\"artifact\"; filename*=UTF-8''"),
])
def test_attachment_names_are_header_safe(name: str, expected: str) -> None:
    assert attachment(name) == expected
