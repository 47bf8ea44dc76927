"""Installation: the systemd units, socket activation, the Dockerfile and the default config.

systemd is not PID 1 on the test machines, so the units are checked with `systemd-analyze
verify` and their runtime contract is emulated with real processes: the data plane runs as
pysoci-data-plane.service's ExecStart (its own NOTIFY_SOCKET), the listening socket is created
here (as pysoci.socket does) and handed to pysoci.service's ExecStart as fd 3 with
LISTEN_FDS/LISTEN_PID, readiness arrives on NOTIFY_SOCKET datagram sockets, and both daemons run
under their unit's CapabilityBoundingSet and NoNewPrivileges (util-linux `setpriv`); a restart
is what `Restart=always` does, a reload runs the unit's ExecReload. One test uses systemd's own
`systemd-socket-activate` for the fd passing. What needs systemd as PID 1 is not exercised:
cgroups and KillMode (that a restart of pysoci.service cannot reach the data plane follows from
the data plane being another unit), and the seccomp options (SystemCallFilter,
RestrictAddressFamilies, RestrictNamespaces).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter import config as config_mod
from snapshotter import labels as names
from snapshotter import mountinfo
from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter._proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.daemon import DEFAULT_ADDRESS
from tests.fixtures.containerd import detach_mounts_under
from tests.fixtures.images import Layer, files_tar, write_image
from tests.fixtures.pysoci_config import pysoci_config
from tests.fixtures.registry import start_registry

REPO = Path(__file__).resolve().parents[2]
SERVICE = REPO / "systemd" / "pysoci.service"
SOCKET_UNIT = REPO / "systemd" / "pysoci.socket"
DATA_PLANE = REPO / "systemd" / "pysoci-data-plane.service"
DOCKERFILE = REPO / "Dockerfile"
DEFAULT_CONFIG = REPO / "config" / "config.toml"
PYSOCI = str(Path(sys.executable).with_name("pysoci"))
INSTALLED_PYSOCI = "/usr/local/bin/pysoci"

# Options that give a service a mount namespace of its own: pysoci's FUSE and overlay mounts
# would then be invisible to containerd.
MOUNT_NAMESPACE_OPTIONS = (
    "PrivateTmp",
    "ProtectSystem",
    "ProtectHome",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "TemporaryFileSystem",
    "BindPaths",
    "BindReadOnlyPaths",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "PrivateMounts",
    "MountFlags",
    "RootDirectory",
    "RootImage",
)


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """`{section: {key: [values...]}}` of a unit file (comments and blank lines dropped)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def capability_bounding_set(unit: Path = SERVICE) -> list[str]:
    """A service's CapabilityBoundingSet, as setpriv names (`sys_admin`, ...)."""
    caps = unit_settings(unit)["Service"]["CapabilityBoundingSet"]
    return [c.removeprefix("CAP_").lower() for v in caps for c in v.split()]


def _cap_mask(names: list[str]) -> int:
    numbers = {
        "chown": 0,
        "dac_override": 1,
        "dac_read_search": 2,
        "fowner": 3,
        "fsetid": 4,
        "mknod": 27,
        "sys_admin": 21,
        "setfcap": 31,
    }
    return sum(1 << numbers[n] for n in names)


def _hardened(argv: list[str], unit: Path = SERVICE) -> list[str]:
    """`argv` run under a service's capability bounding set and no_new_privs."""
    caps = ",".join(["-all", *(f"+{c}" for c in capability_bounding_set(unit))])
    return ["setpriv", f"--bounding-set={caps}", "--no-new-privs", "--", *argv]


def _unit_argv(unit: Path, key: str, root: Path, config: Path | None) -> list[str]:
    """A unit's ExecStart/ExecReload with the installed path replaced by this venv's pysoci."""
    (command,) = unit_settings(unit)["Service"][key]
    argv = shlex.split(command)
    assert argv[0] == INSTALLED_PYSOCI
    argv[0] = PYSOCI
    argv[argv.index("--root") + 1] = str(root)
    if config is not None and key == "ExecStart":
        argv += ["--config", str(config)]
    if key == "ExecStart":
        argv += ["--log-level", "debug"]
    return argv


def _serve_argv(root: Path, config: Path | None) -> list[str]:
    """pysoci.service's ExecStart."""
    return _unit_argv(SERVICE, "ExecStart", root, config)


# What systemd does in the service's process before exec: the socket at fd 3, LISTEN_FDS=1,
# LISTEN_PID = the pid that will exec the daemon.
_ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()),"
    " LISTEN_FDNAMES='pysoci.socket')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Notifications:
    """A NOTIFY_SOCKET: the datagrams the daemon sends with sd_notify."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(
        self, state: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60
    ) -> None:
        """Wait until a message contains the line `state` (e.g. READY=1); fail early if `proc`
        exits first."""
        deadline = time.monotonic() + timeout
        while not any(state in m.split("\n") for m in self.messages):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {state} in {self.messages}")
            self.sock.settimeout(0.2)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode} before {state}") from None

    def wait_line(self, prefix: str, after: int, timeout: float = 60) -> str:
        """The first line starting with `prefix` in a message received after the first
        `after` messages."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages[after:]:
                for line in m.split("\n"):
                    if line.startswith(prefix):
                        return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {prefix} in {self.messages[after:]}")
            self.sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


@dataclass
class ActivatedPysoci:
    """`pysoci serve` run as pysoci.socket + pysoci.service run it: the socket created by the
    caller (kept open across restarts), fd 3, sd_notify, the unit's bounding set."""

    root: Path
    socket: Path
    log: Path
    config: Path | None
    listener: socket.socket
    notify: Notifications
    data_notify: Notifications
    proc: subprocess.Popen[bytes] | None = None
    data_plane: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)

    @classmethod
    def start(
        cls, root: Path, socket_path: Path, config: Path | None, workdir: Path
    ) -> ActivatedPysoci:
        """Create the socket as pysoci.socket does, then start the daemon on it."""
        socket_path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(socket_path))
        os.chmod(socket_path, 0o660)  # SocketMode=0660
        listener.listen(1024)  # Backlog=1024
        notify = Notifications(workdir / "pysoci-notify.sock")
        data_notify = Notifications(workdir / "data-plane-notify.sock")
        daemon = cls(
            root, socket_path, workdir / "pysoci.log", config, listener, notify, data_notify
        )
        daemon.launch_data_plane()
        daemon.launch()
        return daemon

    def launch_data_plane(self) -> None:
        """pysoci-data-plane.service's ExecStart, until READY=1 (the control plane's unit is
        ordered after it)."""
        argv = _hardened(_unit_argv(DATA_PLANE, "ExecStart", self.root, self.config), DATA_PLANE)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.data_notify.path)}
        with open(self.log, "ab") as logf:
            self.data_plane = subprocess.Popen(argv, stdout=logf, stderr=logf, env=env)
        self.data_notify.wait_for("READY=1", self.data_plane)

    def launch(self) -> None:
        """Exec the daemon on the socket and wait for READY=1."""
        self.notify.messages.clear()
        argv = _hardened(
            [
                sys.executable,
                "-c",
                _ACTIVATE,
                str(self.listener.fileno()),
                *_serve_argv(self.root, self.config),
            ]
        )
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path)}
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                argv, stdout=logf, stderr=logf, env=env, pass_fds=(self.listener.fileno(),)
            )
        try:
            self.notify.wait_for("READY=1", self.proc)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(
                f"pysoci did not become ready: {self.log.read_text()[-3000:]}"
            ) from None

    def data_plane_main(self) -> int:
        """The data plane unit's main pid: the last MAINPID it announced, else the first."""
        assert self.data_plane is not None
        pids = [
            int(line.split("=", 1)[1])
            for m in self.data_notify.messages
            for line in m.split("\n")
            if line.startswith("MAINPID=")
        ]
        return pids[-1] if pids else self.data_plane.pid

    def terminate(self, sig: int = signal.SIGTERM) -> int:
        """Stop the daemon (the socket stays open, as pysoci.socket's does)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        self.exits.append(code)
        return code

    def stop(self) -> None:
        if self.proc is not None:
            self.terminate()
        if self.data_plane is not None:
            main = self.data_plane_main()
            os.kill(main, signal.SIGTERM)  # the data plane unit's stop: its main process
            deadline = time.monotonic() + 60
            while _running(main) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.data_plane.poll() is None and main != self.data_plane.pid:
                self.data_plane.kill()  # KillMode=mixed: what is left is killed
            if _running(main):
                os.kill(main, signal.SIGKILL)
            self.data_plane.wait(60)
        self.listener.close()
        self.notify.close()
        self.data_notify.close()
        with open(self.log, "a") as f:
            f.write(f"\n[test] daemon exit codes: {self.exits}\n")


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _fuse_mounted(root: Path) -> bool:
    return bool(mountinfo.mounts_at(root / "fuse"))


def _stub(path: Path) -> pb_grpc.SnapshotsStub:
    return pb_grpc.SnapshotsStub(grpc.insecure_channel(f"unix:{path}"))


def _names(stub: pb_grpc.SnapshotsStub) -> set[str]:
    req = pb.ListSnapshotsRequest(snapshotter="soci")
    return {info.name for resp in stub.List(req, timeout=60) for info in resp.info}


# --- the units ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as installed, with ExecStart pointing at this checkout's pysoci (verify
    checks that the binary exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not found (Debian's systemd package)")
    d = tmp_path_factory.mktemp("units")
    for unit in (SERVICE, DATA_PLANE):
        (d / unit.name).write_text(unit.read_text().replace(INSTALLED_PYSOCI, PYSOCI))
    shutil.copy(SOCKET_UNIT, d / "pysoci.socket")
    return d


def test_units_verify(installed_units: Path) -> None:
    res = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            "pysoci.socket",
            "pysoci.service",
            "pysoci-data-plane.service",
        ],
        cwd=installed_units,
        capture_output=True,
        text=True,
    )
    # verify only warns (exit 0) about unknown keys and bad values: any output is a failure.
    assert res.returncode == 0 and res.stdout == res.stderr == "", res.stdout + res.stderr


def test_verify_catches_a_broken_unit(installed_units: Path, tmp_path: Path) -> None:
    """The check above is not vacuous: a typo or a missing binary is reported."""
    text = (installed_units / "pysoci.service").read_text()
    (tmp_path / "pysoci.service").write_text(text.replace("KillMode=", "KilMode="))
    shutil.copy(installed_units / "pysoci.socket", tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "pysoci.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "Unknown key" in res.stderr
    (tmp_path / "pysoci.service").write_text(text.replace(PYSOCI, "/nonexistent/pysoci"))
    res = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "pysoci.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "not executable" in res.stderr


def test_unit_contract() -> None:
    service, sock = unit_settings(SERVICE), unit_settings(SOCKET_UNIT)
    unit, svc = service["Unit"], service["Service"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["main"]
    assert svc["Restart"] == ["always"] and svc["KillMode"] == ["mixed"]
    assert "containerd.service" in " ".join(unit["Before"])
    assert "pysoci.socket" in " ".join(unit["Requires"])
    assert "pysoci.socket" in " ".join(unit["After"])
    assert "containerd.service" in " ".join(service["Install"]["WantedBy"])
    (exec_start,) = svc["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[:2] == [INSTALLED_PYSOCI, "serve"] and "fd://3" in argv
    # The data plane is another unit the control plane wants but does not require (a data
    # plane restart must not restart it), and never spawns into its own cgroup.
    assert argv[argv.index("--data-plane") + 1] == "external"
    assert "pysoci-data-plane.service" in " ".join(unit["Wants"])
    assert "pysoci-data-plane.service" in " ".join(unit["After"])
    assert "pysoci-data-plane.service" not in " ".join(unit.get("Requires", []))
    data = unit_settings(DATA_PLANE)
    dsvc = data["Service"]
    assert dsvc["Type"] == ["notify"] and dsvc["NotifyAccess"] == ["all"]  # the hand-over
    assert dsvc["KillMode"] == ["mixed"] and dsvc["Restart"] == ["always"]
    assert shlex.split(dsvc["ExecStart"][0])[1:3] == ["data-plane", "run"]
    assert shlex.split(dsvc["ExecReload"][0])[1:3] == ["data-plane", "upgrade"]
    assert {"containerd.service", "pysoci.service"} <= set(" ".join(data["Unit"]["Before"]).split())
    assert not set(dsvc) & set(MOUNT_NAMESPACE_OPTIONS)
    assert dsvc["NoNewPrivileges"] == ["yes"] and dsvc["OOMScoreAdjust"] == ["-999"]
    assert capability_bounding_set(DATA_PLANE) == capability_bounding_set(SERVICE)
    # No option that would hide pysoci's mounts from containerd.
    assert not set(svc) & set(MOUNT_NAMESPACE_OPTIONS), set(svc) & set(MOUNT_NAMESPACE_OPTIONS)
    assert svc["NoNewPrivileges"] == ["yes"]
    assert "sys_admin" in capability_bounding_set()
    # The socket is the daemon's default address, private to root.
    assert sock["Socket"]["ListenStream"] == [DEFAULT_ADDRESS]
    assert sock["Socket"]["SocketMode"] == ["0660"]
    assert sock["Socket"]["Accept"] == ["no"]
    assert "containerd.service" in " ".join(sock["Unit"]["Before"])
    assert sock["Install"]["WantedBy"] == ["sockets.target"]


# --- socket activation, emulated --------------------------------------------------------------


def test_systemd_socket_activate_on_demand(tmp_path: Path) -> None:
    """systemd's own fd passing (`systemd-socket-activate`): the first connection starts the
    daemon, which serves on the socket it was handed and reports READY=1, then STOPPING=1."""
    if shutil.which("systemd-socket-activate") is None:
        pytest.fail("systemd-socket-activate not found (Debian's systemd package)")
    sock_path = tmp_path / "run" / "pysoci.sock"
    sock_path.parent.mkdir()
    root = tmp_path / "root"
    notify = Notifications(tmp_path / "notify.sock")
    data_notify = Notifications(tmp_path / "data-notify.sock")
    log = tmp_path / "serve.log"
    # pysoci-data-plane.service first (the control plane's unit is ordered after it).
    data_env = {**os.environ, "NOTIFY_SOCKET": str(data_notify.path)}
    with open(tmp_path / "data-plane.log", "wb") as logf:
        data_plane = subprocess.Popen(
            _hardened(_unit_argv(DATA_PLANE, "ExecStart", root, None), DATA_PLANE),
            stdout=logf,
            stderr=logf,
            env=data_env,
        )
    data_notify.wait_for("READY=1", data_plane)
    assert _fuse_mounted(root)  # the data plane's FUSE session
    argv = _hardened(
        [
            "systemd-socket-activate",
            "-l",
            str(sock_path),
            "-E",
            f"NOTIFY_SOCKET={notify.path}",
            *_serve_argv(root, None),
        ]
    )
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=logf)
    try:
        deadline = time.monotonic() + 10
        while not sock_path.exists():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert not notify.messages  # the control plane does not run yet
        stub = _stub(sock_path)
        resp = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="soci", key="k1"), timeout=60)
        assert resp.mounts[0].type == "bind"
        notify.wait_for("READY=1", proc)
        assert _names(stub) == {"k1"}
        # The daemon (exec'd in place of systemd-socket-activate) runs bounded and no_new_privs.
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert int(re.search(r"CapBnd:\s*(\w+)", status)[1], 16) == _cap_mask(  # type: ignore[index]
            capability_bounding_set()
        )
        assert re.search(r"NoNewPrivs:\s*1", status)
        assert "serving containerd.services.snapshots.v1.Snapshots on fd://3" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        notify.wait_for("STOPPING=1", timeout=5)
        assert _fuse_mounted(root)  # the control plane's stop leaves the data plane serving
        status = Path(f"/proc/{data_plane.pid}/status").read_text()
        assert int(re.search(r"CapBnd:\s*(\w+)", status)[1], 16) == _cap_mask(  # type: ignore[index]
            capability_bounding_set(DATA_PLANE)
        )
        data_plane.send_signal(signal.SIGTERM)  # the data plane unit's stop
        assert data_plane.wait(60) == 0
        data_notify.wait_for("STOPPING=1", timeout=5)
        assert not _fuse_mounted(root)
    finally:
        for p in (proc, data_plane):
            if p.poll() is None:
                p.kill()
                p.wait()
        notify.close()
        data_notify.close()


def test_socket_outlives_a_restart(tmp_path: Path) -> None:
    """With the socket held by systemd (here: the test), a call made while the daemon is down
    waits in the backlog and is answered by the next daemon; the state persists."""
    daemon = ActivatedPysoci.start(
        tmp_path / "root", tmp_path / "run" / "pysoci.sock", None, tmp_path
    )
    try:
        stub = _stub(daemon.socket)
        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="soci", key="before"), timeout=60)
        assert daemon.terminate() == 0
        daemon.notify.wait_for("STOPPING=1", timeout=5)
        assert daemon.socket.exists()  # the daemon did not unlink a socket it does not own

        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["names"] = _names(_stub(daemon.socket))
            except grpc.RpcError as e:
                result["error"] = e

        caller = threading.Thread(target=call)
        caller.start()
        time.sleep(1.0)  # the call is connected, waiting in the listen backlog
        assert caller.is_alive(), result
        daemon.launch()  # Restart=always
        caller.join(60)
        assert result.get("names") == {"before"}, result
    finally:
        daemon.stop()
    assert daemon.exits == [0, 0]


def test_units_keep_a_containers_lazy_layer_across_restart_and_reload(tmp_path: Path) -> None:
    """Both services as their units run them: a reader on an overlay over a lazy layer (a
    container's rootfs) reads on, every byte right and no operation failing, across a restart
    of pysoci.service (SIGTERM, then Restart=always) and a `systemctl reload` of
    pysoci-data-plane.service (its ExecReload: the old data plane hands over, announces the
    successor as MAINPID, and serves the reader on until it goes)."""
    rng = random.Random(5)
    files = {f"data/{i:03d}": rng.randbytes(40_000) for i in range(300)}
    reg = start_registry(tmp_path / "registry")
    root, certs = tmp_path / "root", tmp_path / "certs.d"
    certs.mkdir()
    config = tmp_path / "pysoci.toml"
    config.write_text(
        pysoci_config(f'[background_fetch]\ndisable = true\n[registry]\nconfig_path = "{certs}"\n')
    )
    layer = Layer.from_tar(files_tar(files))
    write_image(tmp_path / "layout", "v1", [layer])
    plain, ref = f"{reg.host}/units:v1", f"{reg.host}/units:soci"
    subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{tmp_path}/layout:v1",
         f"docker://{plain}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    subprocess.run(
        [PYSOCI, "convert", plain, ref, "--root", str(tmp_path / "build"), "-q",
         "--min-layer-size", "1MiB", "--span-size", "1MiB"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    daemon = ActivatedPysoci.start(root, tmp_path / "run" / "pysoci.sock", config, tmp_path)
    target = tmp_path / "rootfs"
    errors: list[str] = []
    reads = [0]
    stop = threading.Event()
    try:
        stub = _stub(daemon.socket)
        labels = {
            names.TARGET: "sha256:chain",
            names.CRI_IMAGE_REF: ref,
            names.CRI_LAYER_DIGEST: "sha256:" + hashlib.sha256(layer.blob).hexdigest(),
        }
        with pytest.raises(grpc.RpcError) as exists:
            stub.Prepare(
                pb.PrepareSnapshotRequest(
                    snapshotter="soci", key="extract sha256:chain", labels=labels
                ),
                timeout=120,
            )
        assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
        (mount,) = stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter="soci", key="ctr", parent="sha256:chain"),
            timeout=60,
        ).mounts
        assert "/fuse/" in ",".join(mount.options)  # the lazy layer, not an unpack
        target.mkdir()
        subprocess.run(
            ["mount", "-t", mount.type, mount.source, str(target), "-o", ",".join(mount.options)],
            check=True, capture_output=True,
        )  # fmt: skip

        def reader() -> None:
            names_ = sorted(files)
            i = 0
            while not stop.is_set():
                name = names_[i % len(names_)]
                try:
                    if (target / name).read_bytes() != files[name]:
                        errors.append(f"wrong bytes in {name}")
                    reads[0] += 1
                except OSError as e:
                    errors.append(f"{name}: {e}")
                i += 1

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        time.sleep(1)
        before = reads[0]
        assert daemon.terminate() == 0  # systemctl restart pysoci: stop ...
        time.sleep(1)
        daemon.launch()  # ... and start
        assert reads[0] > before
        old = daemon.data_plane_main()
        seen = len(daemon.data_notify.messages)
        env = {**os.environ, "NOTIFY_SOCKET": str(daemon.data_notify.path)}
        reload = subprocess.run(
            _hardened(_unit_argv(DATA_PLANE, "ExecReload", root, None), DATA_PLANE),
            capture_output=True, text=True, timeout=180, env=env,
        )  # fmt: skip
        assert reload.returncode == 0, reload.stderr
        daemon.data_notify.wait_line("MAINPID=", seen)
        daemon.data_notify.wait_line("READY=1", seen)  # from the successor
        new = daemon.data_plane_main()
        assert new != old and _running(old) and _running(new)
        time.sleep(1)
        at_reload = reads[0]
        time.sleep(2)
        assert reads[0] > at_reload
        # A new container gets the layer from the new data plane.
        (mount2,) = stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter="soci", key="ctr2", parent="sha256:chain"),
            timeout=60,
        ).mounts
        lower = [o for o in mount.options if o.startswith("lowerdir=")]
        assert lower and [o for o in mount2.options if o.startswith("lowerdir=")] == lower
    finally:
        stop.set()
        if "thread" in locals():
            thread.join(30)  # a read in flight keeps the overlay busy
        subprocess.run(["umount", str(target)], capture_output=True)
        daemon.stop()
        reg.stop()
        detach_mounts_under(tmp_path)
    assert errors == [], errors[:5]
    print(f"{reads[0]} reads across the restart and the reload, none failed")
    deadline = time.monotonic() + 30
    while _running(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(old)  # the old data plane went with its last user


# --- Dockerfile and the default config ---------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a continuation line"
    return out


def test_dockerfile() -> None:
    """No Docker engine runs here: the Dockerfile is checked statically."""
    import json

    instructions = _dockerfile_instructions()
    froms = [a for i, a in instructions if i == "FROM"]
    assert froms and all(a.split()[0] == "debian:bookworm-slim" for a in froms), froms
    # The last stage: the runtime.
    last = max(n for n, (i, _) in enumerate(instructions) if i == "FROM")
    final = instructions[last:]
    runs = " ".join(a for i, a in final if i == "RUN")
    for package in ("fuse3", "python3", "ca-certificates"):
        assert re.search(rf"\b{re.escape(package)}\b", runs), package
    (entrypoint,) = [a for i, a in final if i == "ENTRYPOINT"]
    assert json.loads(entrypoint)[-1] == "serve", entrypoint
    (cmd,) = [a for i, a in final if i == "CMD"]
    args = json.loads(cmd)
    assert args[args.index("--address") + 1] == DEFAULT_ADDRESS
    assert args[args.index("--root") + 1] == str(config_mod.DEFAULT_ROOT)
    # Every COPY source exists in the build context (the repository).
    for i, a in instructions:
        if i == "COPY" and "--from=" not in a:
            for src in a.split()[:-1]:
                assert (REPO / src).exists(), src
    # The build installs pysoci from the repository into a venv the final stage copies.
    assert any(i == "RUN" and "pip install" in a for i, a in instructions)
    assert any(i == "COPY" and "--from=" in a and "/opt/pysoci" in a for i, a in final)


def _fields(cls: type[Any], prefix: str = "") -> set[str]:
    """Dotted names of every scalar key of a config section (mirrors excluded)."""
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        section = config_mod._SECTIONS.get(f.type) if isinstance(f.type, str) else None
        if f.name in ("resolver",):
            continue
        if section is not None:
            out |= _fields(section, name + ".")
        else:
            out.add(name)
    return out


def test_default_config_lists_every_key_with_its_default() -> None:
    text = DEFAULT_CONFIG.read_text()
    # Installed as is, the file changes nothing: every setting is commented out.
    assert tomllib.loads(text) == {}
    # Uncommented, it is a config whose every value is the built-in default.
    active = "\n".join(
        re.sub(r"^#\s?(?=\[|[A-Za-z_]+\s*=)", "", line) for line in text.splitlines()
    )
    parsed, unknown = config_mod.parse_config(active)
    assert unknown == []
    assert parsed == config_mod.Config()
    config_mod.parse_config("")  # fills config_mod._SECTIONS
    raw = tomllib.loads(active)
    listed = set(_flatten(raw))
    assert listed == _fields(config_mod.Config)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
