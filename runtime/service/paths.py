"""Where wam-edge keeps its sockets and its state, and the checks that nobody else on the machine can touch them.

Two directories (docs/safety.md, "Where state lives on the robot"):

- the runtime directory holds the ipc sockets (chunks, state, control, sim, faults); tmpfs is fine;
- the state directory holds the e-stop latch and the command record, which must survive a reboot (a power cycle must
  not clear an e-stop), so on the robot it is never on tmpfs by default.

Both belong to the user the processes run as, mode 0700: anyone else who could write there could delete the latch
(clearing an e-stop) or replace a socket or the record. ``ensure_private_dir`` makes or checks one,
``check_private_file`` checks a latch or record that exists; each refuses with a PathError naming what it found.
"""

from __future__ import annotations

import os
import stat
from typing import Mapping, Optional, Tuple

APP = "wam-edge"
#: made by systemd for the units (RuntimeDirectory=wam-edge, StateDirectory=wam-edge)
SYSTEM_RUNTIME_DIR = "/run/wam-edge"
SYSTEM_STATE_DIR = "/var/lib/wam-edge"
#: the last resort when nothing above applies (per user: never shared, never a directory another user made first)
FALLBACK_PARENT = "/tmp"
#: placeholders a config's path keys may hold, expanded at load
RUNTIME_DIR = "{runtime_dir}"
STATE_DIR = "{state_dir}"

#: the longest path a unix socket address holds (sockaddr_un.sun_path is 108 bytes with its NUL)
MAX_IPC_PATH = 107


class PathError(Exception):
    """A directory or file wam-edge cannot use safely or cannot write: names the path, what was found and what is
    expected."""


# -- where ---------------------------------------------------------------------------------------------------------

def _systemd_dir(env: Mapping[str, str], name: str) -> Optional[str]:
    """$RUNTIME_DIRECTORY / $STATE_DIRECTORY: colon-separated when a unit lists several; the first is ours."""
    first = env.get(name, "").split(":")[0]
    return first if os.path.isabs(first) else None


def _own_dir(path: str) -> bool:
    """A real directory (no symlink) owned by the effective user."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _fallback() -> str:
    return os.path.join(FALLBACK_PARENT, f"{APP}-{os.geteuid()}")


def runtime_dir(env: Optional[Mapping[str, str]] = None) -> Tuple[str, str]:
    """(the runtime directory, why). In order: $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=); /run/wam-edge when
    it is a directory owned by this user (so `sudo -u <service user> wam-edge arm` finds the services' sockets
    without their environment); $XDG_RUNTIME_DIR/wam-edge (a login session's); /tmp/wam-edge-<uid>."""
    env = os.environ if env is None else env
    d = _systemd_dir(env, "RUNTIME_DIRECTORY")
    if d:
        return d, "$RUNTIME_DIRECTORY (systemd's RuntimeDirectory=)"
    if _own_dir(SYSTEM_RUNTIME_DIR):
        return SYSTEM_RUNTIME_DIR, "the services' runtime directory, owned by this user"
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg) and _own_dir(xdg):
        return os.path.join(xdg, APP), "$XDG_RUNTIME_DIR/wam-edge"
    return _fallback(), "per-user fallback (no $RUNTIME_DIRECTORY, /run/wam-edge or $XDG_RUNTIME_DIR of this user)"


def _home(env: Mapping[str, str]) -> Optional[str]:
    """$HOME when it is this user's directory, else the password database's home when it is; else None."""
    candidates = [env.get("HOME", "")]
    try:
        import pwd

        candidates.append(pwd.getpwuid(os.geteuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    for home in candidates:
        if os.path.isabs(home) and home != "/" and _own_dir(os.path.realpath(home)):
            return home
    return None


def state_dir(env: Optional[Mapping[str, str]] = None) -> Tuple[str, str]:
    """(the state directory, why). In order: $STATE_DIRECTORY (systemd's StateDirectory=); /var/lib/wam-edge when it
    is a directory owned by this user; $XDG_STATE_HOME/wam-edge; ~/.local/state/wam-edge; /tmp/wam-edge-<uid>, which
    is NOT kept across a reboot (the controller warns when its latch is on tmpfs)."""
    env = os.environ if env is None else env
    d = _systemd_dir(env, "STATE_DIRECTORY")
    if d:
        return d, "$STATE_DIRECTORY (systemd's StateDirectory=)"
    if _own_dir(SYSTEM_STATE_DIR):
        return SYSTEM_STATE_DIR, "the controller service's state directory, owned by this user"
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, APP), "$XDG_STATE_HOME/wam-edge"
    home = _home(env)
    if home:
        return os.path.join(home, ".local", "state", APP), "~/.local/state/wam-edge"
    return _fallback(), "per-user fallback, NOT kept across a reboot (no $STATE_DIRECTORY, /var/lib/wam-edge, " \
                        "$XDG_STATE_HOME or home directory of this user)"


def expand(text: str, dirs: Mapping[str, str]) -> str:
    """Replace {runtime_dir} and {state_dir} (``dirs`` maps the placeholder to the directory); nothing else."""
    for token, directory in dirs.items():
        text = text.replace(token, directory)
    return text


# -- checks ----------------------------------------------------------------------------------------------------------

def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _check_ancestor(path: str, target: str, what: str) -> None:
    """A directory above ``target``: owned by this user or root, and writable by nobody else unless sticky (then
    others cannot remove or rename what is ours). A symbolic link: owned by this user or root."""
    st = os.lstat(path)
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise PathError(f"{what} {target}: {path} above it is owned by {_user(st.st_uid)}, who could replace what "
                        f"is below it; expected {_user(me)} or root. Use a directory of your own")
    if stat.S_ISLNK(st.st_mode):
        return
    if not stat.S_ISDIR(st.st_mode):
        raise PathError(f"{what} {target}: {path} above it is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise PathError(f"{what} {target}: {path} above it has mode {mode:04o}: writable by group or others, not "
                        "sticky, so another user could replace what is below it. Use a directory of your own")


def _ancestors(directory: str, target: str, what: str, make: bool) -> None:
    """Check every directory from / down to ``directory`` (making the missing ones, mode 0700, when ``make``)."""
    current = os.sep
    _check_ancestor(current, target, what)
    for name in directory.split(os.sep):
        if not name:
            continue
        current = os.path.join(current, name)
        if make and not os.path.lexists(current):
            try:
                os.mkdir(current, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise PathError(f"{what} {target}: cannot create {current}: {exc.strerror}") from None
        _check_ancestor(current, target, what)


def ensure_private_dir(path: str, what: str = "runtime directory", strict: bool = True) -> str:
    """Make ``path`` (mode 0700 whatever the umask; missing parents too) or check the one there: a real directory,
    not a symlink, owned by the effective user, with no group or other permissions (``strict``; else, for a state
    directory, at least none to write), under parents nobody else can write to. Returns the absolute path; raises
    PathError naming what it found and what is expected."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    _ancestors(parent, path, what, make=True)
    real = os.path.realpath(parent)
    if real != parent:  # a symlink above: its target's parents too
        _ancestors(real, path, what, make=False)
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise PathError(f"{what} {path}: cannot create it: {exc.strerror}") from None
    st = os.lstat(path)
    me = os.geteuid()
    # a directory just made gets exactly 0700 below, whatever the umask gave it
    problem = _dir_problem(st, owner_ok=st.st_uid == me, mask=0 if created else 0o077 if strict else 0o022)
    if problem == "link":
        raise PathError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); expected a real directory "
                        f"owned by {_user(me)}, mode 0700. Remove it and start again")
    if problem == "not_dir":
        raise PathError(f"{what} {path} is not a directory")
    if problem == "owner":
        raise PathError(f"{what} {path} is owned by {_user(st.st_uid)}; expected {_user(me)} (the user wam-edge "
                        "runs as), mode 0700: someone else made it and could change what is in it. Remove it and "
                        "start again, or configure another directory")
    if problem == "mode":
        expect = "0700 (no access for group or others)" if strict else "0700 (at least: not writable by group or " \
                                                                        "others)"
        raise PathError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o} (owner {_user(st.st_uid)}); "
                        f"expected {expect}: others could have replaced or removed what is in it. Check it, then "
                        f"remove it and start again (or chmod 700 {path})")
    if created:
        os.chmod(path, 0o700)
    return path


def _dir_problem(st: os.stat_result, owner_ok: bool, mask: int) -> Optional[str]:
    """What is wrong with a directory others must not control, from its lstat: "link", "not_dir", "owner" (when
    not ``owner_ok``), "mode" (a permission bit in ``mask``), or None. The one inspection both the binding side
    (ensure_private_dir) and the connecting side (check_connect_dir) make; each words its own refusal."""
    if stat.S_ISLNK(st.st_mode):
        return "link"
    if not stat.S_ISDIR(st.st_mode):
        return "not_dir"
    if not owner_ok:
        return "owner"
    if stat.S_IMODE(st.st_mode) & mask:
        return "mode"
    return None


def check_connect_dir(path: str, what: str = "socket directory") -> None:
    """Before connecting to an ipc socket in ``path``: a directory that is there must be a real directory that nobody
    but its owner may enter (no group or other permissions), owned by this user (root may connect to the services'
    user's). A socket in a directory someone else controls may be theirs, posing as the controller: an e-stop sent
    there would reach nobody. A missing directory is left to the binder, which makes and checks it."""
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    me = os.geteuid()
    problem = _dir_problem(st, owner_ok=me in (0, st.st_uid), mask=0o077)
    if problem == "link":
        raise PathError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); expected a real directory, "
                        "mode 0700: not connecting")
    if problem == "not_dir":
        raise PathError(f"{what} {path} is not a directory: not connecting")
    if problem == "owner":
        raise PathError(f"{what} {path} is owned by {_user(st.st_uid)}, not {_user(me)}: its sockets may be "
                        "someone else's; not connecting (run as the services' user)")
    if problem == "mode":
        raise PathError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o} (owner {_user(st.st_uid)}); "
                        "expected 0700: others could have put their own socket there; not connecting")


def check_private_file(path: str, what: str) -> bool:
    """An existing latch or record: a regular file (no symlink) owned by the effective user and not writable by group
    or others. False when there is none; raises PathError when it is not safe."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PathError(f"{what} {path}: {exc.strerror}") from None
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise PathError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); expected a regular file")
    if not stat.S_ISREG(st.st_mode):
        raise PathError(f"{what} {path} is not a regular file")
    if st.st_uid != me:
        raise PathError(f"{what} {path} is owned by {_user(st.st_uid)}; expected {_user(me)} (the user wam-edge "
                        "runs as)")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise PathError(f"{what} {path} has mode {mode:04o}: writable by group or others; expected 0600")
    return True


# -- durable writes (the latch) -------------------------------------------------------------------------------------

def _sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    """Write ``path`` (mode 0600) so that it survives a power cut once this returns: a new file beside it, synced,
    renamed over it, the directory synced. Raises OSError."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _sync_dir(directory)


def remove_durably(path: str) -> None:
    """Remove ``path`` (gone already is fine) and sync its directory. Raises OSError."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    _sync_dir(os.path.dirname(os.path.abspath(path)))


def probe_writable(directory: str, what: str) -> None:
    """Create, sync and remove a file in ``directory``: what writing the latch takes (a read-only or full file
    system, a directory we may not write). Raises PathError."""
    probe = os.path.join(directory, f".wam-edge-probe.{os.getpid()}")
    try:
        write_durably(probe, b"probe\n")
        remove_durably(probe)
    except OSError as exc:
        raise PathError(f"{what}: cannot write in {directory}: {exc.strerror or exc}") from None


def on_tmpfs(path: str) -> Optional[str]:
    """The file system type when ``path`` lies on one that a reboot empties (tmpfs, ramfs), else None (also when
    /proc/self/mounts cannot be read)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return None
    return kind if kind in ("tmpfs", "ramfs") else None
