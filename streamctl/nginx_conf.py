"""Read nginx's effective configuration (``nginx -T``, or a file) as a tree of directives, and
answer what doctor asks of it: where /live/ logs to and in which format, and where the
fallback for a missing playlist sends its requests."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess


@dataclasses.dataclass
class Directive:
    name: str
    args: list[str]
    children: list["Directive"] | None = None  # a block ({ ... }), else None
    parent: "Directive | None" = None

    def find(self, name: str) -> list["Directive"]:
        """Every directive of that name below this one (no recursion: any depth is fine)."""
        found, pending = [], list(reversed(self.children or ()))
        while pending:
            child = pending.pop()
            if child.name == name:
                found.append(child)
            pending.extend(reversed(child.children or ()))
        return found

    def own(self, name: str) -> list["Directive"]:
        return [child for child in self.children or () if child.name == name]

    def inherited(self, name: str) -> list["Directive"]:
        """The directives of that name that apply here: this block's, else the nearest
        enclosing block's (nginx's inheritance of access_log and the like)."""
        block: Directive | None = self
        while block is not None:
            found = block.own(name)
            if found:
                return found
            block = block.parent
        return []


_TOKEN_RE = re.compile(r'"((?:[^"\\]|\\.)*)"|\'((?:[^\'\\]|\\.)*)\'|(#[^\n]*)|([{};])|([^\s{};"\'#]+)')


def parse(text: str) -> Directive:
    """The configuration as a tree under a root block; ValueError on unbalanced braces."""
    root = Directive("", [], [])
    stack, words = [root], []
    for match in _TOKEN_RE.finditer(text):
        quoted, single, comment, punct, word = match.groups()
        if comment is not None:
            continue
        if punct is None:
            words.append(quoted if quoted is not None else single if single is not None else word)
            continue
        parent = stack[-1]
        assert parent.children is not None  # only blocks are pushed
        if punct == ";":
            if words:
                parent.children.append(Directive(words[0], words[1:], None, parent))
            words = []
        elif punct == "{":
            block = Directive(words[0] if words else "", words[1:], [], parent)
            parent.children.append(block)
            stack.append(block)
            words = []
        else:
            if len(stack) == 1:
                raise ValueError("unbalanced '}'")
            stack.pop()
            words = []
    if len(stack) != 1:
        raise ValueError("unbalanced '{'")
    return root


def effective_config(conf_file: str | None, nginx: str | None = None) -> tuple[str, str]:
    """(text, where it came from): the file given, else what `nginx -T` prints."""
    if conf_file:
        return _with_includes(conf_file, os.path.dirname(os.path.abspath(conf_file)), 0), conf_file
    binary = nginx or shutil.which("nginx") or "/usr/sbin/nginx"
    result = subprocess.run([binary, "-T"], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise OSError(
            f"`nginx -T` failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
        )
    return result.stdout, "nginx -T"


_INCLUDE_RE = re.compile(r"""^\s*include\s+("[^"]*"|'[^']*'|[^;\s]+)\s*;""", re.M)
MAX_INCLUDED_FILES = 500
MAX_CONFIG_BYTES = 16 << 20


def _with_includes(path: str, base: str, depth: int, budget: list[int] | None = None) -> str:
    """A file's text with its include directives replaced by the files they name (as
    `nginx -T` shows them), relative names from the main file's directory; bounded in
    depth, files and size, and only regular files are opened (a FIFO would block)."""
    budget = budget if budget is not None else [MAX_INCLUDED_FILES]
    budget[0] -= 1
    if depth > 10 or budget[0] < 0:
        raise ValueError(f"too many or too deeply nested includes (at {path})")
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read(MAX_CONFIG_BYTES)

    def expand(match: re.Match) -> str:
        pattern = match.group(1).strip("\"'")
        names = sorted(glob.glob(pattern if os.path.isabs(pattern) else os.path.join(base, pattern)))
        return "\n".join(_with_includes(name, base, depth + 1, budget) for name in names)

    return _INCLUDE_RE.sub(expand, text)


def live_locations(root: Directive) -> list[Directive]:
    """The locations that serve /live/ (a prefix location, or a regex naming /live/)."""
    return [
        location
        for location in root.find("location")
        if location.args and any("/live/" in arg for arg in location.args)
    ]


def enclosing_server(directive: Directive) -> Directive | None:
    block = directive.parent
    while block is not None and block.name != "server":
        block = block.parent
    return block


def listen_port(args: list[str]) -> str:
    """The port of a listen directive's address ("80", "127.0.0.1:8080", "[::]:80")."""
    address = args[0] if args else "80"
    return address.rpartition(":")[2] if ":" in address else address if address.isdigit() else "80"


def default_servers_in_front(root: Directive) -> list[tuple[str, str]]:
    """(port, server names) of other servers that are default_server on a port the /live/
    server listens on: with our server_name _, nginx sends the requests there instead."""
    ours = {id(s): s for s in (enclosing_server(loc) for loc in live_locations(root)) if s is not None}
    ports = {listen_port(d.args) for s in ours.values() for d in s.own("listen")}
    ours_default = {listen_port(d.args) for s in ours.values() for d in s.own("listen") if "default_server" in d.args}
    found = []
    for server in root.find("server"):
        if id(server) in ours:
            continue
        for listen in server.own("listen"):
            port = listen_port(listen.args)
            if "default_server" in listen.args and port in ports and port not in ours_default:
                names = " ".join(a for d in server.own("server_name") for a in d.args) or "(no server_name)"
                found.append((port, names))
    return found


def log_formats(root: Directive) -> dict[str, str]:
    """log_format name -> its format string (nginx's concatenation of the pieces)."""
    formats = {}
    for directive in root.find("log_format"):
        args = [a for a in directive.args if not a.startswith("escape=")]
        if args:
            formats[args[0]] = "".join(args[1:])
    return formats


def fallback_targets(root: Directive) -> list[tuple[str, str]]:
    """(named location, address) for each location a missing playlist falls back to
    (error_page 404 = @x, or try_files ... @x), resolving proxy_pass through upstream blocks."""
    upstreams = {u.args[0]: [s.args[0] for s in u.own("server") if s.args] for u in root.find("upstream") if u.args}
    named = {loc.args[0]: loc for loc in root.find("location") if loc.args and loc.args[0].startswith("@")}
    targets = []
    for location in live_locations(root):
        where = " ".join(location.args)
        if ".ts" in where and "m3u8" not in where:
            continue  # a segments' location: its fallback (another host's, multi-host) is not a playlist's
        names = {a.lstrip("=") for d in location.own("error_page") for a in d.args if a.lstrip("=").startswith("@")}
        names |= {a for d in location.own("try_files") for a in d.args if a.startswith("@")}
        for name in sorted(names):
            for proxy in named[name].own("proxy_pass") if name in named else []:
                url = proxy.args[0] if proxy.args else ""
                host = re.sub(r"^https?://", "", url).split("/", 1)[0]
                for address in upstreams.get(host, [host]):
                    targets.append((name, address))
    return targets
