"""Issue 17: the layers show in the imports.  streamstate is the shared layer (the contract,
the Redis storage, host control, deploy); the services (heartbeatd, launcher, egress, reaper)
and streamctl use it and never each other; nothing shipped imports demo (the local stack the
demo and the tests run, not in the wheel).  Read from the source with ast: every import,
at the top or inside a function."""

import ast
import os

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

SHARED = "streamstate"
SERVICES = ("heartbeatd", "launcher", "egress", "reaper")
SHIPPED = (SHARED, *SERVICES, "streamctl")
OURS = (*SHIPPED, "demo", "tests", "bench")


def imports_of(package: str) -> dict[str, set[str]]:
    """module path -> the top-level packages of ours it imports."""
    found = {}
    for folder, _, names in os.walk(os.path.join(REPO, package)):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as handle:
                tree = ast.parse(handle.read(), path)
            targets = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets.add(node.module.split(".")[0])
            found[os.path.relpath(path, REPO)] = {t for t in targets if t in OURS and t != package}
    return found


@pytest.mark.parametrize("package", SHIPPED)
def test_each_shipped_package_imports_only_the_shared_layer(package):
    allowed = set() if package == SHARED else {SHARED}
    crossings = {path: sorted(targets - allowed) for path, targets in imports_of(package).items() if targets - allowed}
    assert crossings == {}


def test_the_wheel_ships_what_a_host_needs_and_not_the_demo():
    import configparser

    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    included = {line.strip().rstrip("*") for line in config["options.packages.find"]["include"].split()}
    assert included == set(SHIPPED)
