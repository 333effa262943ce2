"""Issue 17: the Redis key table is written once (docs/design.md) and kept true to
streamstate/keys.py; the README is a landing page whose links lead somewhere."""

import os
import re

import pytest

from streamstate import keys
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def documented_keys() -> set[str]:
    with open(os.path.join(REPO, "docs", "design.md")) as handle:
        text = handle.read()
    table = text[text.index("## Redis keys") : text.index("## Hostile input")]
    return set(re.findall(r"^\| `([^`]+)` \|", table, re.M))


def schema_keys() -> set[str]:
    """Every key keys.py spells, with its variable parts named as the table names them."""
    spelled = {
        keys.pid_key(7),
        keys.started_key(7),
        keys.last_access_key(7),
        keys.viewers_key(7),
        keys.run_key(7),
        keys.lock_key(7),
        keys.failed_key(7),
        keys.channel_key(7),
        keys.ACTIVE_STREAMS_KEY,
        keys.host_key("HOST"),
        keys.host_address_key("HOST"),
        keys.provider_slots_key("NAME"),
        keys.reaper_lock_key("HOST"),
        keys.reaper_last_pass_key("HOST"),
        keys.status_history_key("HOST"),
        keys.source_failed_key("http://example.test/a.ts"),
    }
    spelled |= set(keys.stream_keys(7))
    digest = keys.source_failed_key("http://example.test/a.ts").split(":")[1]
    return {
        k.replace(":7:", ":<id>:")
        .replace(":7", ":<id>")
        .replace("HOST", "<host_id>")
        .replace("NAME", "<name>")
        .replace(digest, "<digest>")
        for k in spelled
    }


def test_the_key_table_is_the_schema():
    assert documented_keys() == schema_keys()


def test_every_function_of_the_schema_is_in_the_table_test():
    """A key function added to keys.py must be added to schema_keys above (and the table)."""
    functions = {
        name
        for name, value in vars(keys).items()
        if name.endswith("_key") and not name.startswith("channel_id_from") and callable(value)
    }
    with open(__file__) as handle:
        source = handle.read()
    assert {f for f in functions if f"keys.{f}(" not in source} == set()


def test_the_readme_is_a_landing_page_and_its_links_lead_somewhere():
    with open(os.path.join(REPO, "README.md")) as handle:
        readme = handle.read()
    assert len(readme.splitlines()) <= 160
    for document in ("README.md", "docs/operator.md", "docs/design.md"):
        with open(os.path.join(REPO, document)) as handle:
            text = handle.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                path = os.path.normpath(os.path.join(REPO, os.path.dirname(document), target))
                assert os.path.exists(path), f"{document} links to {target}, which is not there"
