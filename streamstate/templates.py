"""The one renderer of the files streamkeeper ships as templates (the nginx snippet, the
logrotate file, the systemd units): package data, so an installed wheel renders exactly
what a checkout does."""

from __future__ import annotations

import re
from importlib import resources


def package_file(*parts: str) -> str:
    """The text of a file shipped inside the package (streamstate/nginx/..., systemd/...)."""
    return resources.files("streamstate").joinpath(*parts).read_text(encoding="utf-8")


def fill(template: str, values: dict) -> str:
    """Replace {{name}} placeholders (nginx's own $variables are left alone).

    A tuple value is a block of directives: one per line, each at the
    placeholder's indentation.
    """

    def value(match: re.Match) -> str:
        indent, name = match.group(1), match.group(2)
        if name not in values:
            raise KeyError(f"template: no value for {{{{{name}}}}}")
        found = values[name]
        if isinstance(found, tuple):
            return "\n".join(indent + line for line in found) if found else indent + "# (none)"
        return indent + str(found)

    return re.sub(r"([ \t]*)\{\{([a-z_]+)\}\}", value, template)
