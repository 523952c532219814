"""runc containers: the CRIU options runc itself would use, derived from the container's state,
and runc's own command line for what only the runtime can do (restore a container it will then
own, list, delete).

What runc passes CRIU (libcontainer's ``Checkpoint`` and ``Restore``, runc 1.1) and where each
comes from here:

* dump: ``root`` = the rootfs; every bind mount, every cgroup v1 controller mount, every masked
  file (as ``/dev/null``) and every device node as an external mount whose key is its mount
  point; a network or PID namespace given by path as ``--external net[INODE]:extRootNetNS``;
  ``freeze_cgroup`` = the container's freezer; ``manage_cgroups``; ``orphan_pts_master``; the
  ``org.criu.config`` annotation (default ``/etc/criu/runc.conf``) as the config file; and
  ``descriptors.json`` beside the images, what fds 0, 1 and 2 of the container were;
* restore: the rootfs bind-mounted on a directory of its own (``criu-root``); each external
  mount key bound to its host source; namespaces given by path joined (``join_ns``) or, for
  network and PID, handed over as inherited fds; the cgroups at the bundle's ``cgroupsPath``;
  ``evasive_devices``; and a new pipe end for every ``pipe:[...]`` of ``descriptors.json``.

``RuncContainer.options`` reads the first from ``state.json`` (runc's own record of a running
container); ``RuncBundle.options`` the second from an OCI bundle's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._config import read_config_file, render
from .._fs import mountinfo
from ..enums import CgroupMode, Namespace
from ..errors import ContainerRuntimeError, InvalidOptionError
from ..options import CgroupRoot, JoinNamespace
from .options import DESCRIPTORS_FILE, ContainerMount, ContainerOptions, ExternalNamespace

if TYPE_CHECKING:
    from ..criu import Criu
    from ..results import DumpResult

__all__ = ["Runc", "RuncContainer", "RuncBundle", "RuncTarget", "RuncError"]

RuncError = ContainerRuntimeError

#: libcontainer's namespace types -> CRIU's names
_NS_NAMES = {"NEWNET": "net", "NEWPID": "pid", "NEWNS": "mnt", "NEWUTS": "uts", "NEWIPC": "ipc",
             "NEWUSER": "user", "NEWCGROUP": "cgroup"}
#: the OCI spec's namespace types -> CRIU's names
_OCI_NS = {"network": "net", "pid": "pid", "mount": "mnt", "uts": "uts", "ipc": "ipc", "user": "user",
           "cgroup": "cgroup"}
#: the device nodes runc creates in every container (libcontainer/specconv AllowedDevices)
_DEFAULT_DEVICES = ("/dev/null", "/dev/random", "/dev/full", "/dev/tty", "/dev/zero", "/dev/urandom")
#: the choices a caller makes, as runc's checkpoint and restore flags do (runc flag -> field)
CHOICES = ("tcp_established", "tcp_close", "ext_unix_sk", "shell_job", "file_locks", "cgroup_mode", "empty_ns",
           "network_lock", "link_remap", "weak_sysctls", "skip_file_rwx_check", "auto_dedup", "lsm_profile",
           "lsm_mount_context", "cgroup_yard", "veth_pairs")
#: runc restore's own flags for the fields it has one for
_RESTORE_FLAGS = {"tcp_established": "--tcp-established", "ext_unix_sk": "--ext-unix-sk",
                  "shell_job": "--shell-job", "file_locks": "--file-locks", "auto_dedup": "--auto-dedup"}
#: fields runc restore has no flag for: written to the CRIU config file it hands CRIU
_CONFIG_BOOLS = {"tcp_close": "tcp-close", "link_remap": "link-remap", "weak_sysctls": "weak-sysctls",
                 "skip_file_rwx_check": "skip-file-rwx-check"}
_RUNC_CGROUP_MODES = ("soft", "full", "strict")


@dataclass(frozen=True)
class Runc:
    """runc's command line: ``binary``, its state directory ``root`` (runc's ``--root``, default
    ``/run/runc``) and the ``criu`` it runs (``--criu``, default: ``criu`` on ``PATH``)."""

    binary: str = "runc"
    root: str | None = None
    criu: str | None = None
    timeout: float = 120.0

    def argv(self, *args: str) -> list[str]:
        path = shutil.which(self.binary)
        if path is None:
            raise ContainerRuntimeError(f"runc binary {self.binary!r} not found",
                                        hint="install runc (Debian and Ubuntu: apt-get install runc; in a pycriu "
                                             "checkout, scripts/provision.sh does it)")
        out = [path]
        if self.root is not None:
            out += ["--root", self.root]
        if self.criu is not None:
            out += ["--criu", self.criu]
        return out + list(args)

    def run(self, *args: str, check: bool = True, log: str | os.PathLike[str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``runc ARGS`` with its errors captured. With ``log`` (``runc restore``), runc's
        stdio is ``/dev/null`` and its messages go to that file: a container restored with
        ``-d`` takes runc's stdio as its own, and runc records it in its state as the
        container's fds 0, 1 and 2."""
        argv = self.argv(*(["--log", os.fspath(log)] if log is not None else []), *args)
        with tempfile.TemporaryFile(mode="w+") as err:
            try:
                proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL if log is not None else subprocess.PIPE,
                                      stderr=subprocess.DEVNULL if log is not None else err, text=True,
                                      timeout=self.timeout, check=False)
            except subprocess.TimeoutExpired:
                raise ContainerRuntimeError(f"runc {args[0]} took longer than {self.timeout:.0f} s") from None
            err.seek(0)
            stderr = err.read() if log is None else _read(log)
        result = subprocess.CompletedProcess(argv, proc.returncode, proc.stdout or "", stderr)
        if check and proc.returncode != 0:
            raise ContainerRuntimeError(f"runc {args[0]} failed (exit {proc.returncode}): {_runc_message(stderr)}",
                                        hint=f"command: {' '.join(argv)}")
        return result

    @property
    def state_root(self) -> Path:
        return Path(self.root or "/run/runc")

    def state(self, container_id: str) -> dict[str, Any] | None:
        """``runc state ID`` (status, pid, bundle, rootfs), or ``None`` when runc has no such
        container."""
        proc = self.run("state", container_id, check=False)
        if proc.returncode != 0:
            if "does not exist" in proc.stderr:
                return None
            raise ContainerRuntimeError(f"runc state {container_id} failed: {_runc_message(proc.stderr)}")
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def containers(self) -> list[dict[str, Any]]:
        """``runc list``: every container of this state directory."""
        out = json.loads(self.run("list", "--format", "json").stdout or "null")
        return list(out or [])

    def delete(self, container_id: str, *, force: bool = False) -> None:  # noqa: D401
        """``runc delete [--force] ID``, and the derived bundle pycriu made for its restore."""
        self.run("delete", *(["--force"] if force else []), container_id)
        shutil.rmtree(self.derived_bundle_dir(container_id), ignore_errors=True)

    def derived_bundle_dir(self, container_id: str) -> Path:
        """Where pycriu keeps the bundle it restores ``container_id`` from when runc's flags do
        not say everything (see :meth:`restore`): beside this state directory
        (``/run/runc-pycriu-bundles/ID`` for runc's default)."""
        return Path(f"{self.state_root}-pycriu-bundles") / container_id

    def restore(self, container_id: str, *, bundle: str | os.PathLike[str], images_dir: str | os.PathLike[str],
                work_dir: str | os.PathLike[str], options: ContainerOptions | None = None, lazy: bool = False,
                leave_stopped: bool = False, pid_file: str | os.PathLike[str] | None = None) -> int:
        """``runc restore -d`` of ``container_id`` from ``bundle`` and the images in
        ``images_dir``: runc builds every path-bound option from the bundle and owns the
        container afterwards. The choices of ``options`` (``tcp_established``, ``cgroup_mode``,
        ...) become runc's flags; those runc has no flag for, and ``leave_stopped`` (the tree
        is restored stopped, for a migration's commit), go to CRIU through a config file: runc
        hands CRIU the file its bundle's ``org.criu.config`` annotation names, so pycriu restores
        from a derived bundle, the same ``config.json`` with that annotation, whose file holds
        the original file's lines and then pycriu's. Returns the restored init's pid."""
        bundle = os.path.abspath(os.fspath(bundle))
        spec = _read_spec(bundle)
        flags, config = _restore_flags(options or ContainerOptions())
        if lazy:
            flags.append("--lazy-pages")
        if leave_stopped:
            config.append(("leave-stopped", None))
        cgroups = str((spec.get("linux") or {}).get("cgroupsPath") or "")
        if _unified() and cgroups.startswith("/"):
            # runc names CRIU the cgroup roots on cgroup v1 only; on v2 CRIU restored the tree into
            # the cgroup its images name (the source's), not the bundle's. ":PATH" (no controller)
            # is the cgroup2 hierarchy's root alone (CRIU's cgroup_contains)
            config.append(("cgroup-root", f":{cgroups}"))
        used = bundle
        derived = self.derived_bundle_dir(container_id)
        if config:
            used = str(self._derive_bundle(derived, bundle, spec, config))
        work = os.path.abspath(os.fspath(work_dir))
        own_pid_file = pid_file is None
        pid_path = os.path.join(work, f"runc-{container_id}.pid") if pid_file is None else os.fspath(pid_file)
        try:
            self.run("restore", "--detach", "--bundle", used, "--image-path", os.path.abspath(os.fspath(images_dir)),
                     "--work-path", work, "--pid-file", pid_path, *flags, container_id,
                     log=os.path.join(work, f"runc-restore-{container_id}.log"))
            return int(Path(pid_path).read_text().strip())
        except BaseException:
            if used != bundle:
                shutil.rmtree(derived, ignore_errors=True)
            raise
        finally:
            if own_pid_file:
                Path(pid_path).unlink(missing_ok=True)

    @staticmethod
    def _derive_bundle(where: Path, bundle: str, spec: dict[str, Any], config: list[tuple[str, str | None]]) -> Path:
        annotations = dict(spec.get("annotations") or {})
        original = annotations.get("org.criu.config", "/etc/criu/runc.conf")
        lines = read_config_file(original) if original and os.path.isfile(original) else []
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True, mode=0o700)
        conf = where / "criu.conf"
        conf.write_text(render([*lines, *config]))
        derived = dict(spec)
        root = dict(derived.get("root") or {})
        root["path"] = os.path.join(bundle, root.get("path", "rootfs"))
        derived["root"] = root
        derived["annotations"] = {**annotations, "org.criu.config": str(conf)}
        (where / "config.json").write_text(json.dumps(derived))
        return where


def _restore_flags(options: ContainerOptions) -> tuple[list[str], list[tuple[str, str | None]]]:
    """runc restore's flags for the choices of ``options``, and the CRIU config lines for the
    choices runc has no flag for."""
    flags = [flag for name, flag in _RESTORE_FLAGS.items() if getattr(options, name)]
    config: list[tuple[str, str | None]] = [(opt, None) for name, opt in _CONFIG_BOOLS.items()
                                            if getattr(options, name)]
    if options.cgroup_mode is not None:
        mode = options.cgroup_mode.name.lower()
        if mode in _RUNC_CGROUP_MODES:
            flags += ["--manage-cgroups-mode", mode]
        elif options.cgroup_mode != CgroupMode.DEFAULT:
            config.append(("manage-cgroups", mode))
    if options.empty_ns is not None and options.empty_ns & Namespace.NET:
        flags += ["--empty-ns", "network"]
    if options.lsm_profile is not None:
        flags += ["--lsm-profile", options.lsm_profile]
    if options.lsm_mount_context is not None:
        flags += ["--lsm-mount-context", options.lsm_mount_context]
    if options.network_lock is not None:
        config.append(("network-lock", options.network_lock.name.lower()))
    if options.cgroup_yard is not None:
        config.append(("cgroup-yard", options.cgroup_yard))
    config += [("veth-pair", f"{v.inside}={v.outside}") for v in options.veth_pairs]
    return flags, config


def _read(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _runc_message(stderr: str) -> str:
    """runc's last error line, without logrus' decoration."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    last = lines[-1]
    if 'msg="' in last:
        last = last.split('msg="', 1)[1].rsplit('"', 1)[0]
    return last.replace('\\"', '"')


def _read_spec(bundle: str) -> dict[str, Any]:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            spec: dict[str, Any] = json.load(fh)
    except (OSError, ValueError) as exc:
        raise InvalidOptionError(f"bundle {bundle!r} has no readable config.json: {exc}",
                                 hint="pass the directory of an OCI bundle (made with `runc spec`)") from None
    return spec


# --- cgroup v1 controller mounts, as runc binds them into a container ---------------------------------


def _cgroup_v1_mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, mount root, controllers) of this host's cgroup v1 hierarchies."""
    return [(m.mountpoint, m.root, set(m.super_options) - {"rw", "ro"}) for m in mountinfo() if m.fstype == "cgroup"]


def _mount_root(mountpoint: str) -> str:
    """The root (within its filesystem) of what is mounted at ``mountpoint`` last, "/" if none."""
    return next((m.root for m in reversed(mountinfo()) if m.mountpoint == mountpoint), "/")


def _own_cgroups() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            out[name] = path
    return out


def _unified() -> bool:
    try:
        return os.statvfs("/sys/fs/cgroup") is not None and _fstype("/sys/fs/cgroup") == "cgroup2"
    except OSError:
        return False


def _fstype(path: str) -> str | None:
    """The type of what is mounted at ``path`` last (on top), None if nothing is."""
    return next((m.fstype for m in reversed(mountinfo()) if m.mountpoint == path), None)


def cgroup_mounts(destination: str) -> list[ContainerMount]:
    """runc's binds of the cgroup v1 controllers under ``destination`` (its getCgroupMounts):
    one per hierarchy, ``destination/BASENAME`` bound to this process's own cgroup there."""
    own = _own_cgroups()
    out = []
    for mountpoint, root, controllers in _cgroup_v1_mounts():
        mine = next((own[c] for c in sorted(controllers) if c in own), "/")
        rel = os.path.relpath(mine, root)
        source = mountpoint if rel == "." else os.path.join(mountpoint, rel)
        out.append(ContainerMount(os.path.join(destination, os.path.basename(mountpoint)), source))
    return out


def _external_mounts(mounts: Sequence[tuple[str, str, str]], namespaces: set[str]) -> list[ContainerMount]:
    """The external mounts of ``(kind, source, destination)`` mounts (kind ``bind`` or ``cgroup``)."""
    out: list[ContainerMount] = []
    for kind, source, dest in mounts:
        if kind == "bind":
            out.append(ContainerMount(_clean(dest), source))
        elif kind == "cgroup" and "cgroup" not in namespaces and not _unified():
            out += cgroup_mounts(_clean(dest))
    return out


def _clean(path: str) -> str:
    return os.path.normpath("/" + path.lstrip("/"))


def _namespaces(pairs: Sequence[tuple[str, str]]) -> tuple[list[ExternalNamespace], list[JoinNamespace]]:
    """(CRIU name, path) of the namespaces given by path: network and PID are external (CRIU
    leaves them out and takes them as inherited fds), the others are joined."""
    external, join = [], []
    for name, path in pairs:
        if not path:
            continue
        if name in ExternalNamespace.KINDS:
            external.append(ExternalNamespace(name, path))
        elif name == "cgroup":
            raise InvalidOptionError("a cgroup namespace given by path cannot be restored (CRIU has no way to join "
                                     "one; runc refuses it too)")
        else:
            join.append(JoinNamespace(name, path))
    return external, join


def _config_file(annotations: Mapping[str, str]) -> str | None:
    """runc's CRIU config file: the ``org.criu.config`` annotation (empty: none), else
    ``/etc/criu/runc.conf``; only when it exists (CRIU ignores a missing one)."""
    path = annotations.get("org.criu.config", "/etc/criu/runc.conf")
    return path if path and os.path.isfile(path) else None


def _choices(kw: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(kw) - set(CHOICES))
    if unknown:
        raise InvalidOptionError(f"unknown container choice(s) {', '.join(unknown)}",
                                 hint=f"runc's checkpoint and restore choices: {', '.join(CHOICES)}")
    return {k: v for k, v in kw.items() if v is not None}


# --- a running container ------------------------------------------------------------------------------


class RuncContainer:
    """A container of runc, by id (and runc's state directory): its state, the CRIU options runc
    would use for it, and checkpoint, restore and migration of it with pycriu."""

    def __init__(self, container_id: str, runc: Runc | None = None) -> None:
        if not isinstance(container_id, str) or not container_id or "/" in container_id:
            raise InvalidOptionError(f"container id {container_id!r} is invalid: expected runc's container id")
        self.id = container_id
        self.runc = runc or Runc()

    def __repr__(self) -> str:
        return f"RuncContainer({self.id!r}, root={str(self.runc.state_root)!r})"

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """``runc state``: ``status``, ``pid``, ``bundle``, ``rootfs``, ..."""
        state = self.runc.state(self.id)
        if state is None:
            raise ContainerRuntimeError(f"runc has no container {self.id!r} in {self.runc.state_root}",
                                        hint="pass the id `runc list` shows, and runc's --root if it is not the "
                                             "default")
        return state

    @property
    def status(self) -> str | None:
        """``running``, ``paused``, ``stopped``, ``created``, or ``None`` when runc has no such
        container."""
        state = self.runc.state(self.id)
        return None if state is None else str(state["status"])

    @property
    def pid(self) -> int:
        return int(self.state()["pid"])

    def record(self) -> dict[str, Any]:
        """runc's own record of the container (``state.json``: its libcontainer configuration,
        cgroup and namespace paths, the fds it was started with)."""
        path = self.runc.state_root / self.id / "state.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ContainerRuntimeError(f"runc's record of {self.id!r} cannot be read ({path}): {exc}") from None
        return data

    # -- the options runc would use ------------------------------------------------------------

    def options(self, **choices: Any) -> ContainerOptions:
        """The CRIU options runc uses for this container (see the module's docstring), plus the
        caller's ``choices`` (:data:`CHOICES`: ``tcp_established``, ``file_locks``, ...). The
        restore half names this host's paths: :meth:`ContainerOptions.remap` them for another."""
        record = self.record()
        config = record["config"]
        pid = int(record["init_process_pid"])
        ns_paths = [(_NS_NAMES[n["type"]], n.get("path") or "") for n in config.get("namespaces") or []]
        external_ns, join = _namespaces(ns_paths)
        mounts = _external_mounts([(m.get("device", ""), m.get("source", ""), m["destination"])
                                   for m in config.get("mounts") or []], {n for n, _ in ns_paths})
        for masked in config.get("mask_paths") or []:
            path = f"/proc/{pid}/root/{masked.lstrip('/')}"
            if os.path.exists(path) and not os.path.isdir(path):
                mounts.append(ContainerMount(masked, "/dev/null", key="/dev/null"))
        mounts += [ContainerMount(d["path"], d["path"]) for d in config.get("devices") or [] if d.get("path")]
        paths = record.get("cgroup_paths") or {}
        labels = dict(label.split("=", 1) for label in config.get("labels") or [] if "=" in label)
        return ContainerOptions(
            root=config["rootfs"], bind_root=True, mounts=tuple(_unique(mounts)), namespaces=tuple(external_ns),
            join_ns=tuple(join), cgroup_roots=tuple(_cgroup_roots(paths)), manage_cgroups=True,
            freeze_cgroup=paths.get("freezer") or None, orphan_pts_master=True, evasive_devices=True,
            config_file=_config_file(labels), stdio=tuple(record.get("external_descriptors") or ()),
            **_choices(choices))

    # -- checkpoint and restore ----------------------------------------------------------------

    def checkpoint(self, images_dir: str | os.PathLike[str], *, work_dir: str | os.PathLike[str] | None = None,
                   leave_running: bool = False, criu: Criu | None = None, **choices: Any) -> DumpResult:
        """Checkpoint the container with pycriu into ``images_dir``, as ``runc checkpoint`` would
        (``runc restore`` takes the images, ``descriptors.json`` included). Like runc, the
        container is deleted from runc's state afterwards unless ``leave_running``."""
        from ..criu import Criu

        options = self.options(**choices)
        images = Path(images_dir)
        images.mkdir(parents=True, exist_ok=True)
        write_descriptors(images, options)
        result = (criu or Criu()).dump(options.dump_options(
            pid=self.pid, images_dir=images, work_dir=work_dir, log_file="dump.log",
            leave_running=True if leave_running else None))
        if not leave_running:
            self.runc.delete(self.id, force=True)
        return result

    @classmethod
    def restore(cls, container_id: str, *, bundle: str | os.PathLike[str], images_dir: str | os.PathLike[str],
                work_dir: str | os.PathLike[str] | None = None, runc: Runc | None = None,
                **choices: Any) -> RuncContainer:
        """``runc restore`` of ``container_id`` from ``bundle`` and images written by runc or by
        :meth:`checkpoint`: runc owns the container afterwards (``runc list`` shows it)."""
        runc = runc or Runc()
        work = Path(work_dir) if work_dir is not None else Path(images_dir)
        runc.restore(container_id, bundle=bundle, images_dir=images_dir, work_dir=work,
                     options=ContainerOptions(**_choices(choices)))
        return cls(container_id, runc)

    def delete(self, *, force: bool = False) -> None:
        self.runc.delete(self.id, force=force)


def write_descriptors(images: Path, options: ContainerOptions) -> None:
    """runc's ``descriptors.json`` beside the images: what fds 0, 1 and 2 of the container were."""
    (images / DESCRIPTORS_FILE).write_text(json.dumps(list(options.stdio)))
    os.chmod(images / DESCRIPTORS_FILE, 0o600)


def _unique(mounts: Sequence[ContainerMount]) -> list[ContainerMount]:
    seen: dict[str, ContainerMount] = {}
    for m in mounts:
        seen.setdefault(m.mountpoint, m)
    return list(seen.values())


def _cgroup_roots(paths: Mapping[str, str]) -> list[CgroupRoot]:
    """Where the container's cgroups are, as paths inside each hierarchy: per v1 controller, and
    on a cgroup v2 host (runc's key ``""``) the one root of the unified hierarchy."""
    mounts = {c: (mp, root) for mp, root, controllers in _cgroup_v1_mounts() for c in controllers}
    if _unified():
        mounts[""] = ("/sys/fs/cgroup", _mount_root("/sys/fs/cgroup"))
    out = []
    for controller, path in sorted(paths.items()):
        if controller in mounts and path:
            mountpoint, root = mounts[controller]
            inside = os.path.relpath(path, mountpoint)
            if not inside.startswith(".."):
                out.append(CgroupRoot(os.path.normpath(os.path.join(root, inside)), controller))
    return out


# --- a bundle (for pycriu's own restore) and a destination ------------------------------------------


@dataclass(frozen=True)
class RuncBundle:
    """An OCI bundle on this host: the restore options runc would derive from it, for pycriu's
    own restore (the restored tree is then the caller's, not runc's)."""

    path: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.path.abspath(os.fspath(self.path)))

    @property
    def spec(self) -> dict[str, Any]:
        return _read_spec(self.path)

    @property
    def rootfs(self) -> str:
        root = (self.spec.get("root") or {}).get("path", "rootfs")
        return os.path.normpath(os.path.join(self.path, root))

    def bind_mounts(self) -> list[tuple[str, str]]:
        """(destination, source) of the bundle's bind mounts."""
        out = []
        for m in self.spec.get("mounts") or []:
            if m.get("type") == "bind" or {"bind", "rbind"} & set(m.get("options") or ()):
                out.append((_clean(m["destination"]), m.get("source", "")))
        return out

    def missing_sources(self) -> list[str]:
        """The bind mounts whose source does not exist here (runc's restore would fail on each)."""
        return [f"{dest} <- {src}" for dest, src in self.bind_mounts() if not os.path.exists(src)]

    def options(self, container_id: str | None = None, **choices: Any) -> ContainerOptions:
        """The restore options ``runc restore`` derives from this bundle (see the module's
        docstring). The cgroups go to the bundle's ``cgroupsPath`` when it is absolute."""
        spec = self.spec
        linux = spec.get("linux") or {}
        ns_paths = [(_OCI_NS[n["type"]], n.get("path") or "") for n in linux.get("namespaces") or []]
        external_ns, join = _namespaces(ns_paths)
        kinds = []
        for m in spec.get("mounts") or []:
            bind = m.get("type") == "bind" or {"bind", "rbind"} & set(m.get("options") or ())
            kinds.append(("bind" if bind else m.get("type", ""), m.get("source", ""), m["destination"]))
        mounts = _external_mounts(kinds, {n for n, _ in ns_paths})
        if linux.get("maskedPaths"):
            mounts.append(ContainerMount("/dev/null", "/dev/null"))
        devices = [*_DEFAULT_DEVICES, *(d["path"] for d in linux.get("devices") or [] if d.get("path"))]
        mounts += [ContainerMount(d, d) for d in devices]
        cgroups = linux.get("cgroupsPath") or ""
        roots = (CgroupRoot(cgroups),) if cgroups.startswith("/") else ()
        return ContainerOptions(
            root=self.rootfs, bind_root=True, mounts=tuple(_unique(mounts)), namespaces=tuple(external_ns),
            join_ns=tuple(join), cgroup_roots=roots, manage_cgroups=True, orphan_pts_master=True,
            evasive_devices=True, config_file=_config_file(spec.get("annotations") or {}), **_choices(choices))

    def prepare_mountpoints(self) -> None:
        """Make the mount points of the bind mounts in the rootfs, as runc does before a restore
        (a directory, or an empty file for a file's bind)."""
        for dest, src in self.bind_mounts():
            target = Path(self.rootfs) / dest.lstrip("/")
            if target.exists():
                continue
            if os.path.isdir(src):
                target.mkdir(parents=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()


@dataclass(frozen=True)
class RuncTarget:
    """Where a migrated runc container goes on the destination: its ``bundle`` there, the id
    (default: the source's), runc's state directory there (``root``, default ``/run/runc``)."""

    bundle: str
    id: str | None = None
    root: str | None = None

    def __post_init__(self) -> None:
        for name in ("bundle", "root"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.startswith("/")):
                raise InvalidOptionError(f"RuncTarget.{name}={value!r} is invalid: expected an absolute path on "
                                         "the destination")
        if self.id is not None and (not isinstance(self.id, str) or not self.id or "/" in self.id):
            raise InvalidOptionError(f"RuncTarget.id={self.id!r} is invalid: expected a container id")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "runc", **{k: v for k, v in dataclasses.asdict(self).items() if v is not None}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuncTarget:
        if not isinstance(data, Mapping) or data.get("kind") != "runc":
            raise InvalidOptionError("container runtime: only runc is supported ({'kind': 'runc', 'bundle': ...})")
        fields = {k: v for k, v in data.items() if k != "kind"}
        unknown = set(fields) - {"bundle", "id", "root"}
        if unknown:
            raise InvalidOptionError(f"container runtime: unknown field(s) {sorted(unknown)}")
        if "bundle" not in fields:
            raise InvalidOptionError("container runtime: the destination's bundle is missing")
        return cls(**fields)
