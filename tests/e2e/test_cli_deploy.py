"""`ember deploy`, `ember releases`, `ember rollback` with the real CLI against a real
single-node stack (API, Postgres, docker-registry, controller).

The stack has no hosts yet, so no rollout can converge: deploys that are not about
waiting pass --detach (`ember deploy` waits for the rollout by default)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.client.oci import ImageConfig, OciLayout, RegistryClient, build_image, write_archive
from tests.support.stack import stack_env

EMBER = str(Path(sys.executable).parent / "ember")

MANIFEST = """schema_version = 1
app = "web"
[processes]
web = "httpd -f -p {port} -h /www"
[[services]]
process = "web"
internal_port = {port}
protocol = "tcp"
[env]
GREETING = "hi"
"""


class Stack:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.project = home / "project"
        self.project.mkdir()

    def __call__(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [EMBER, *args],
            env=stack_env(self.home),
            cwd=self.project,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    home = Path(tempfile.mkdtemp(prefix="ember-deploy-"))
    s = Stack(home)
    try:
        up = s.json("dev", "up")
        assert up["registry_url"]  # type: ignore[index]
        s("apps", "create", "web")
        s("envs", "create", "prod", "--app", "web")
        yield s
    finally:
        subprocess.run(
            [EMBER, "dev", "down"], env=stack_env(home), capture_output=True, check=False
        )
        shutil.rmtree(home, ignore_errors=True)


def image(tmp: Path, content: str) -> Path:
    root = tmp / f"rootfs-{content}"
    (root / "www").mkdir(parents=True)
    (root / "www" / "index.html").write_text(content)
    layout = tmp / f"layout-{content}"
    build_image(layout, [root], ImageConfig(cmd=["httpd"]))
    return layout


def test_deploy_release_identical_redeploy_and_rollback(stack: Stack, tmp_path: Path) -> None:
    (stack.project / "ember.toml").write_text(MANIFEST.format(port=8080))
    one = image(tmp_path, "one")
    v1 = stack.json("deploy", "--image", str(one), "--detach")
    assert (v1["version"], v1["status"], v1["reason"]) == (1, "active", "deploy")  # type: ignore[index]
    assert v1["image"]["repository"] == "local/web"  # type: ignore[index]
    # The image really is in the platform registry, by digest.
    registry = stack.json("dev", "status")["registry_url"]  # type: ignore[index]
    with RegistryClient(registry) as reg:
        assert reg.has_manifest("local/web", v1["image"]["digest"])  # type: ignore[index]

    again = stack("deploy", "--image", str(one))
    assert "already live; nothing to do" in again.stdout

    # A new manifest, as an archive this time: v2.
    (stack.project / "ember.toml").write_text(MANIFEST.format(port=9090))
    archive = tmp_path / "two.tar"
    write_archive(OciLayout.open(image(tmp_path, "two")), archive)
    v2 = stack.json("deploy", "--image", str(archive), "--detach")
    assert v2["version"] == 2 and v2["image"]["digest"] != v1["image"]["digest"]  # type: ignore[index]

    listed = stack.json("releases")
    assert [(r["version"], r["status"]) for r in listed] == [(2, "active"), (1, "superseded")]  # type: ignore[union-attr,index]

    back = stack.json("rollback")
    assert (back["version"], back["rollback_of"]) == (3, 1)  # type: ignore[index]
    assert back["image"] == v1["image"] and back["manifest_hash"] == v1["manifest_hash"]  # type: ignore[index]
    assert "nothing to do" in stack("rollback", "v1").stdout
    stack("rollback", "v9", expect=3)
    stack("rollback", "nine", expect=2)


def test_deploy_copies_an_image_from_another_registry_by_digest(
    stack: Stack, tmp_path: Path
) -> None:
    (stack.project / "ember.toml").write_text(MANIFEST.format(port=7070))
    registry = stack.json("dev", "status")["registry_url"]  # type: ignore[index]
    host = registry.split("://", 1)[1]  # type: ignore[union-attr]
    with RegistryClient(registry) as reg:
        pushed = reg.push(OciLayout.open(image(tmp_path, "three")), "vendor/thing", tag="1.0")
    release = stack.json("deploy", "--image", f"{host}/vendor/thing:1.0", "--detach")
    assert release["image"] == {"repository": "local/web", "digest": pushed.digest}  # type: ignore[index]


def test_deploy_refuses_bad_input_and_changes_nothing(stack: Stack, tmp_path: Path) -> None:
    (stack.project / "ember.toml").write_text(MANIFEST.format(port=8080))
    before = stack("releases", "--json").stdout
    missing = stack("deploy", expect=2)
    assert "--image" in missing.stderr
    (stack.project / "ember.toml").write_text(
        MANIFEST.format(port=8080).replace("internal_port", "intenal_port")
    )
    bad = stack("deploy", "--image", str(image(tmp_path, "bad")), expect=2)
    assert "services[0].intenal_port" in bad.stderr
    (stack.project / "ember.toml").write_text(MANIFEST.format(port=8080))
    stack("deploy", "--image", str(tmp_path / "nowhere"), expect=2)
    stack("deploy", "--image", str(image(tmp_path, "x")), "--env", "nope", expect=3)
    assert stack("releases", "--json").stdout == before


def test_deploy_waits_for_the_rollout_and_gives_up_with_exit_6(
    stack: Stack, tmp_path: Path
) -> None:
    (stack.project / "ember.toml").write_text(MANIFEST.format(port=6060))
    waited = stack("deploy", "--image", str(image(tmp_path, "wait")), "--timeout", "2s", expect=6)
    assert "promoted in prod" in waited.stdout  # the release itself is made
    # No host can run it here: either the rollout starts and cannot place its instance,
    # or no controller runs at all. Both say so.
    assert "within 2s" in waited.stderr and "Hint:" in waited.stderr
    status = stack.json("status")
    live = stack.json("releases")[0]  # type: ignore[index]
    assert status["release"]["version"] == live["version"]  # type: ignore[index]
    assert status["converged"] is False and status["problems"]  # type: ignore[index]
