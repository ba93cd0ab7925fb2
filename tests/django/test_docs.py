"""docs/guides/django.md shows this project's code: each recipe block is in its file (as
tests/test_docs.py checks for every page), and the page keeps showing each file."""

from __future__ import annotations

from tests import docs_pages
from tests.conftest import ROOT


def test_the_django_guide_shows_the_tested_project():
    page = (ROOT / "docs" / "guides" / "django.md").read_text()
    shown = docs_pages.recipes(page)
    for path, block in shown:
        assert block.strip() in (ROOT / path).read_text(), f"the {path} block differs"
    assert {path for path, _ in shown} == {
        f"tests/django/project/{name}"
        for name in (
            "djproject/settings.py",
            "djproject/asgi.py",
            "shop/tasks.py",
            "shop/views.py",
            "shop/tests.py",
            "shop/tests_pytest.py",
        )
    }
