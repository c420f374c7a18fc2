"""Firecracker's API contract, and a fake jailer + Firecracker that enforce it.

No Firecracker binary can run here (no internet to fetch it, no KVM that boots guests), so
the driver is tested against (DESIGN §6):

- :class:`ApiContract`: ``firecracker.yaml`` (Swagger 2.0) turned into a request checker:
  the path must match a path template and method of the file, the body must validate
  against the operation's body schema (``$ref``\\ s resolved, JSON Schema draft 4), and
  objects are **closed** (no unknown fields) because Firecracker's parsers deny unknown
  fields even where the YAML does not say ``additionalProperties: false``. One rule that
  is not a schema is checked too: a path id equals the body's id (Firecracker refuses a
  mismatch).
- a fake ``jailer`` executable that checks its flags like the real one (docs/jailer.md),
  builds ``<chroot_base>/<exec_file_name>/<id>/root/``, emulates the cgroup under a test
  directory, writes ``<exec_file_name>.pid`` and execs (in place, like the real jailer) a
  fake ``firecracker``;
- the fake ``firecracker``: an HTTP server on ``<chroot>/run/firecracker.socket`` that
  validates every request with :class:`ApiContract`, records it, enforces the pre-boot /
  post-boot ordering and checks that every path it is given exists inside the chroot and
  is usable by the jailed uid, and on ``SendCtrlAltDel`` either exits 0 (a guest that
  shuts down) or ignores it (a kernel without an i8042 driver).

The fake never chroots or drops privileges (the venv's Python is not readable by a VM
uid); permission checks are computed from ownership and mode bits instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
SPEC_ENV = "EMBER_FIRECRACKER_SPEC"
DEFAULT_SPEC = REPO.parent / "shared" / "reference" / "firecracker" / "firecracker.yaml"


class SpecMissing(Exception):
    pass


def spec_path() -> Path:
    return Path(os.environ.get(SPEC_ENV) or DEFAULT_SPEC)


def _yaml_load(text: str) -> Any:
    """YAML with only ``true``/``false`` as booleans. PyYAML follows YAML 1.1, where the
    unquoted ``Off`` of ``Logger.level``'s enum would load as ``False``; Firecracker means
    the string (and the Swagger tooling reads the file as YAML 1.2)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    return yaml.load(text, Loader=Loader)


def load_contract(path: Path | None = None) -> ApiContract:
    path = path or spec_path()
    if not path.is_file():
        raise SpecMissing(
            f"Firecracker's API contract is not at {path}. It lives beside every checkout "
            f"as ../shared/reference/firecracker/firecracker.yaml; set {SPEC_ENV} to its "
            "path if yours is elsewhere (it is never copied into the repository)."
        )
    return ApiContract(_yaml_load(path.read_text()), source=path)


def _close_objects(schema: Any) -> Any:
    """A copy of ``schema`` whose objects with ``properties`` refuse unknown fields."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _close_objects(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _close_objects(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _close_objects(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_close_objects(s) for s in out[key]]
    return out


@dataclasses.dataclass(frozen=True)
class Route:
    template: str
    pattern: re.Pattern[str]
    operations: dict[str, dict[str, Any]]


class ApiContract:
    """Checks requests against Firecracker's OpenAPI (Swagger 2.0) file."""

    def __init__(self, spec: dict[str, Any], *, source: Path | None = None) -> None:
        if spec.get("swagger") != "2.0" or "paths" not in spec:
            raise SpecMissing(f"{source} is not a Swagger 2.0 file")
        self.spec = spec
        self.source = source
        self.version = str(spec.get("info", {}).get("version"))
        self.definitions = {k: _close_objects(v) for k, v in spec["definitions"].items()}
        self.routes: list[Route] = []
        for template, item in spec["paths"].items():
            regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            operations = {m.upper(): op for m, op in item.items() if isinstance(op, dict)}
            self.routes.append(Route(template, re.compile(f"^{regex}$"), operations))

    def route(self, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            match = route.pattern.match(path)
            if match:
                return route, match.groupdict()
        return None

    def body_schema(self, method: str, template: str) -> tuple[dict[str, Any], bool] | None:
        """The (closed) body schema of an operation and whether the body is required."""
        for route in self.routes:
            if route.template == template:
                for param in route.operations[method].get("parameters", []):
                    if param.get("in") == "body":
                        schema = {**param["schema"], "definitions": self.definitions}
                        return _close_objects(schema), bool(param.get("required"))
        return None

    def check(self, method: str, path: str, body: Any = None) -> list[str]:
        """What is wrong with the request (empty: it conforms)."""
        from jsonschema import Draft4Validator

        found = self.route(path)
        if found is None:
            return [f"no path of firecracker.yaml matches {path}"]
        route, params = found
        operation = route.operations.get(method.upper())
        if operation is None:
            allowed = ", ".join(sorted(route.operations))
            return [f"{method} is not an operation of {route.template} (only {allowed})"]
        problems: list[str] = []
        declared = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
        for name, value in params.items():
            if name not in declared:
                problems.append(f"path parameter {name} is not declared")
            elif declared[name].get("type") == "string" and not value:
                problems.append(f"path parameter {name} is empty")
        schema = self.body_schema(method.upper(), route.template)
        if schema is None:
            if body is not None:
                problems.append(f"{method} {route.template} takes no body")
            return problems
        body_schema, required = schema
        if body is None:
            if required:
                problems.append(f"{method} {route.template} requires a body")
            return problems
        validator = Draft4Validator(body_schema)
        for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
            where = "/".join(str(p) for p in error.absolute_path) or "(body)"
            problems.append(f"{where}: {error.message}")
        # Not a schema rule, but Firecracker refuses it: the path's id is the body's id.
        for name, value in params.items():
            if isinstance(body, dict) and name in body and body[name] != value:
                problems.append(f"{name} {body[name]!r} in the body is not {value!r} of the path")
        return problems


# --- the fake jailer ----------------------------------------------------------------------

JAIL_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
CGROUP_RE = re.compile(r"^([a-z_]+)\.[a-z_.]+=.+$")
RLIMIT_RE = re.compile(r"^(fsize|no-file)=\d+$")
JAILER_VALUED = {
    "id",
    "exec-file",
    "uid",
    "gid",
    "chroot-base-dir",
    "netns",
    "cgroup-version",
    "parent-cgroup",
    "cgroup",
    "resource-limit",
}
JAILER_SWITCHES = {"daemonize", "new-pid-ns"}
JAILER_REPEATABLE = {"cgroup", "resource-limit"}


class JailerUsage(Exception):
    pass


def parse_jailer_args(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The real jailer's flags (src/jailer/src/main.rs build_arg_parser) and checks."""
    options: dict[str, Any] = {"cgroup": [], "resource-limit": []}
    extra: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            extra = args[index + 1 :]
            break
        if not arg.startswith("--"):
            raise JailerUsage(f"unexpected argument {arg!r}")
        name = arg[2:]
        if name in JAILER_SWITCHES:
            options[name] = True
            index += 1
            continue
        if name not in JAILER_VALUED:
            raise JailerUsage(f"unknown argument --{name}")
        if index + 1 >= len(args):
            raise JailerUsage(f"--{name} needs a value")
        value = args[index + 1]
        if name in JAILER_REPEATABLE:
            options[name].append(value)
        elif name in options:
            raise JailerUsage(f"--{name} given twice")
        else:
            options[name] = value
        index += 2
    for required in ("id", "exec-file", "uid", "gid"):
        if required not in options:
            raise JailerUsage(f"--{required} is required")
    if not JAIL_ID_RE.match(options["id"]):
        raise JailerUsage(f"invalid instance id {options['id']!r}")
    if "firecracker" not in Path(options["exec-file"]).name:
        raise JailerUsage("the filename of --exec-file must contain 'firecracker'")
    if not Path(options["exec-file"]).is_file():
        raise JailerUsage(f"{options['exec-file']} is not a file")
    for name in ("uid", "gid"):
        if not options[name].isdigit():
            raise JailerUsage(f"invalid {name} {options[name]!r}")
    if options.get("cgroup-version", "1") not in {"1", "2"}:
        raise JailerUsage(f"{options['cgroup-version']} is an invalid cgroup version")
    for value in options["cgroup"]:
        if not CGROUP_RE.match(value):
            raise JailerUsage(f"invalid format for cgroups: {value}")
    parent = options.get("parent-cgroup")
    if parent is not None and (parent.startswith("/") or {".", ".."} & set(parent.split("/"))):
        raise JailerUsage("parent cgroup path must be relative, without '.' or '..'")
    for value in options["resource-limit"]:
        if not RLIMIT_RE.match(value):
            raise JailerUsage(f"invalid resource limit {value}")
    if "netns" in options and not Path(options["netns"]).exists():
        raise JailerUsage(f"network namespace {options['netns']} does not exist")
    return options, extra


def jailer_main(config_path: str, argv: list[str]) -> int:
    config = json.loads(Path(config_path).read_text())
    try:
        options, extra = parse_jailer_args(argv[1:])
    except JailerUsage as exc:
        print(f"Arguments parsing error: {exc}", flush=True)
        return 1
    if config.get("fail_jailer"):
        print("fake jailer: failing as configured", flush=True)
        return 1
    exec_name = Path(options["exec-file"]).name
    jail_dir = Path(options.get("chroot-base-dir", "/srv/jailer")) / exec_name / options["id"]
    root = jail_dir / "root"
    root.mkdir(parents=True, exist_ok=True)  # an existing (staged) chroot is kept
    uid, gid = int(options["uid"]), int(options["gid"])
    (jail_dir / "fake-jailer.json").write_text(
        json.dumps({"argv": argv[1:], "uid": uid, "gid": gid, "id": options["id"]})
    )
    exec_copy = root / exec_name
    shutil.copyfile(options["exec-file"], exec_copy)
    exec_copy.chmod(0o755)
    if options.get("cgroup-version") == "2":
        cgroup = Path(config["cgroup_root"]) / (options.get("parent-cgroup") or exec_name)
        cgroup = cgroup / options["id"]
        cgroup.mkdir(parents=True, exist_ok=True)
        for value in options["cgroup"]:
            name, _, setting = value.partition("=")
            (cgroup / name).write_text(setting + "\n")
        (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")
    for sub in ("run", "dev", "dev/net"):
        (root / sub).mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(root / sub, uid, gid)
    if os.geteuid() == 0:
        os.chown(root, uid, gid)
    root.chmod(0o700)
    (root / f"{exec_name}.pid").write_text(str(os.getpid()))
    args = ["--id", options["id"], "--start-time-us", "0", "--start-time-cpu-us", "0", *extra]
    os.execve(exec_copy, [str(exec_copy), *args], {})  # in place: same pid, same stdio
    return 1  # pragma: no cover


# --- the fake firecracker -----------------------------------------------------------------

PRE_BOOT_ONLY = {
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/cpu-config"),
    ("PUT", "/vsock"),
    ("PUT", "/balloon"),
    ("PUT", "/entropy"),
    ("PUT", "/serial"),
    ("PUT", "/pmem/{id}"),
}


def _uid_may(path: Path, uid: int, gid: int, *, write: bool) -> bool:
    st = path.stat()
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid == gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    need = 4 | (2 if write else 0)
    return bits & need == need


class FakeVm:
    def __init__(self, chroot: Path, jail: dict[str, Any], config: dict[str, Any]) -> None:
        self.chroot = chroot
        self.jail = jail
        self.config = config
        self.started = False
        self.configured: dict[str, Any] = {}
        self.root_drive: str | None = None

    def _file(self, inside: str, *, write: bool) -> str | None:
        """Why ``inside`` is unusable by the jailed uid, or None."""
        if not inside.startswith("/"):
            return f"{inside} is not an absolute path inside the jail"
        target = self.chroot / inside.lstrip("/")
        if not target.exists():
            return f"{inside} does not exist inside the jail"
        if not target.resolve().is_relative_to(self.chroot.resolve()):
            return f"{inside} leaves the jail"
        uid, gid = self.jail["uid"], self.jail["gid"]
        parent = target.parent
        while parent != self.chroot:
            st = parent.stat()
            if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)):
                return f"{parent} is not searchable by uid {uid}"
            parent = parent.parent
        if not _uid_may(target, uid, gid, write=write):
            return f"{inside} is not {'writable' if write else 'readable'} by uid {uid}"
        return None

    def handle(self, method: str, template: str, body: Any) -> tuple[int, dict[str, Any] | None]:
        if method == "GET" and template == "/":
            state = "Running" if self.started else "Not started"
            return 200, {
                "app_name": "Firecracker",
                "id": self.jail["id"],
                "state": state,
                "vmm_version": "fake",
            }
        if template in self.config.get("refuse", ()):
            return 400, {"fault_message": f"{template} refused as configured by the test"}
        if self.started and (method, template) in PRE_BOOT_ONLY:
            return 400, {
                "fault_message": "The requested operation is not supported after "
                "starting the microVM."
            }
        problem: str | None = None
        if template == "/logger":
            problem = self._file(body.get("log_path", ""), write=True)
        elif template == "/metrics":
            problem = self._file(body["metrics_path"], write=True)
        elif template == "/boot-source":
            problem = self._file(body["kernel_image_path"], write=False)
            if problem is None and "initrd_path" in body:
                problem = self._file(body["initrd_path"], write=False)
        elif template == "/drives/{drive_id}" and method == "PUT":
            problem = self._file(body["path_on_host"], write=not body.get("is_read_only"))
            if body["is_root_device"]:
                if self.root_drive not in (None, body["drive_id"]):
                    problem = "a root block device already exists"
                else:
                    self.root_drive = body["drive_id"]
        elif template == "/network-interfaces/{iface_id}" and method == "PUT":
            if len(body["host_dev_name"]) > 15:
                problem = f"tap name {body['host_dev_name']} is too long"
            mac = body.get("guest_mac")
            if mac is not None and not re.match(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", mac):
                problem = f"invalid MAC address {mac}"
        elif template == "/actions":
            return self._action(body["action_type"])
        if problem is not None:
            return 400, {"fault_message": problem}
        self.configured[f"{method} {template}"] = body
        return 204, None

    def _action(self, action: str) -> tuple[int, dict[str, Any] | None]:
        if action == "InstanceStart":
            if self.started:
                return 400, {"fault_message": "The microVM is already running."}
            if "PUT /boot-source" not in self.configured:
                return 400, {"fault_message": "Cannot start microvm without kernel configuration."}
            self.started = True
            print("fake firecracker: guest booted", flush=True)
            return 204, None
        if action == "SendCtrlAltDel":
            if not self.started:
                return 400, {"fault_message": "The microVM is not running."}
            if self.config.get("on_ctrl_alt_del", "shutdown") == "shutdown":
                print("fake firecracker: guest got Ctrl+Alt+Del, rebooting", flush=True)
                threading.Timer(0.1, os._exit, (0,)).start()
            else:
                print("fake firecracker: guest ignores Ctrl+Alt+Del", flush=True)
            return 204, None
        return 204, None  # FlushMetrics


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    contract: ApiContract
    vm: FakeVm
    records: Path
    lock: threading.Lock


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "unix"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        method, path = self.command, urlsplit(self.path).path
        body: Any = None
        problems: list[str] = []
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                problems.append("the body is not JSON")
        if not problems:
            problems = self.server.contract.check(method, path, body)
        with self.server.lock:
            if problems:
                status, reply = 400, {"fault_message": "; ".join(problems)}
            else:
                found = self.server.contract.route(path)
                assert found is not None
                status, reply = self.server.vm.handle(method, found[0].template, body)
            with open(self.server.records, "a") as out:
                entry = {"method": method, "path": path, "body": body, "status": status}
                out.write(json.dumps({**entry, "problems": problems}) + "\n")
        data = json.dumps(reply).encode() if reply is not None else b""
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _handle


def firecracker_main(config_path: str, argv: list[str]) -> int:
    config = json.loads(Path(config_path).read_text())
    chroot = Path(argv[0]).parent
    jail = json.loads((chroot.parent / "fake-jailer.json").read_text())
    options: dict[str, str] = {"api-sock": "/run/firecracker.socket"}
    args = argv[1:]
    known = {"id", "api-sock", "start-time-us", "start-time-cpu-us", "parent-cpu-time-us"}
    for index in range(0, len(args), 2):
        name = args[index].removeprefix("--")
        if not args[index].startswith("--") or name not in known or index + 1 >= len(args):
            print(f"fake firecracker: bad arguments {args}", flush=True)
            return 1
        options[name] = args[index + 1]
    if options.get("id") != jail["id"]:
        print(f"fake firecracker: --id {options.get('id')} is not the jail's", flush=True)
        return 1
    sock = chroot / options["api-sock"].lstrip("/")
    if sock.exists():
        print(f"fake firecracker: {options['api-sock']} already exists", flush=True)
        return 1
    os.chdir(sock.parent)  # bind a short relative name: the host path may exceed sun_path
    server = _Server(sock.name, _Handler)
    server.contract = load_contract(Path(config["spec"]))
    server.vm = FakeVm(chroot, jail, config)
    server.records = chroot.parent / "fake-requests.jsonl"
    server.lock = threading.Lock()
    print(f"fake firecracker {server.contract.version}: API on {options['api-sock']}", flush=True)
    server.serve_forever()
    return 0


# --- installation -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeFirecracker:
    bin_dir: Path
    jailer_bin: Path
    firecracker_bin: Path
    config_path: Path
    cgroup_root: Path

    def configure(self, **options: Any) -> None:
        config = json.loads(self.config_path.read_text())
        config.update(options)
        self.config_path.write_text(json.dumps(config))

    @staticmethod
    def requests(jail_dir: Path) -> list[dict[str, Any]]:
        records = jail_dir / "fake-requests.jsonl"
        if not records.exists():
            return []
        return [json.loads(line) for line in records.read_text().splitlines()]

    @staticmethod
    def jailer_invocation(jail_dir: Path) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((jail_dir / "fake-jailer.json").read_text())
        return data


def install_fake(bin_dir: Path, *, spec: Path, cgroup_root: Path) -> FakeFirecracker:
    """Write ``jailer`` and ``firecracker`` executables into ``bin_dir``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    cgroup_root.mkdir(parents=True, exist_ok=True)
    config = bin_dir / "fake.json"
    config.write_text(json.dumps({"spec": str(spec), "cgroup_root": str(cgroup_root)}))
    paths = {}
    for name, entry in (("jailer", "jailer_main"), ("firecracker", "firecracker_main")):
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            f"from tests.support.fake_firecracker import {entry}\n"
            f"sys.exit({entry}({str(config)!r}, sys.argv))\n"
        )
        script.chmod(0o755)
        paths[name] = script
    return FakeFirecracker(bin_dir, paths["jailer"], paths["firecracker"], config, cgroup_root)
