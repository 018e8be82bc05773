"""Runs one untrusted program inside the sandbox's child process (see sandbox.py).

Started as `python -I -S -B sandbox_boot.py SETTINGS_JSON`: isolated mode (no PYTHON*
variables, no user site, not even the script's folder on sys.path), no site-packages, no
bytecode written. Standard library only: this file imports nothing from the project.

Before the program's first line runs, this process
1. lowers its resource limits (CPU seconds, address space, file size, open files, no core
   dumps, no new processes for a non-root user);
2. moves into the program's fresh temp folder;
3. installs a PEP 578 audit hook that refuses, with PermissionError:
   - writes, deletions, renames, links, mode and owner changes outside that folder, and
     opening a folder outside it (a folder descriptor would let relative paths escape);
   - reads and listings outside an allow-list: the folder, the standard library (sys.path
     here), this process's own /proc/<pid>, /dev/null, /dev/zero, /dev/urandom, /dev/random
     and the time zone files. So no other process's /proc/<pid>/environ, cmdline or mem,
     no ServiceAccount token, no ~/.aws or Hugging Face token: nothing the trainer keeps;
   - every socket operation (the no-network shim; kept on when a network namespace
     already cuts the network off);
   - new processes (fork, exec, spawn, system, subprocess) and signals to other processes;
   - ctypes and the _posixsubprocess module (both reach the C library around the hook),
     raising the resource limits, and the gc functions that could find the hook itself;
4. runs the program as __main__ with no reference to the hook left in Python.
Audit hooks cannot be removed once added. They are a guard for model-written code, not a
boundary against a determined attacker; the parent adds the wall-clock kill and, where
the kernel allows, a network namespace.
"""

import json
import os
import resource
import sys
import types

BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "os.chroot", "resource.setrlimit", "resource.prlimit",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.remote_exec",
}
BLOCKED_PREFIXES = ("ctypes.",)
BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"}
# event -> (positions of the paths it changes, position of its dir_fd arguments)
PATH_EVENTS = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
    "os.mkfifo": ((0,), (2,)),
    "os.mknod": ((0,), (3,)),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
    "os.chflags": ((0,), ()),
    "os.lchflags": ((0,), ()),
    "os.lchmod": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)),
    "shutil.chown": ((0,), ()),
}
# Listings are reads of a folder: which paths the event lists.
LIST_EVENTS = ("os.listdir", "os.scandir")
READABLE_EVERYWHERE = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/usr/share/zoneinfo",
                       "/etc/localtime", "/etc/timezone")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
HARMLESS_TARGETS = {"/dev/null"}


def set_limits(settings):
    cpu = int(settings["cpu_seconds"])
    limits = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, settings["memory_bytes"], settings["memory_bytes"]),
        (resource.RLIMIT_FSIZE, settings["file_bytes"], settings["file_bytes"]),
        (resource.RLIMIT_NOFILE, settings["open_files"], settings["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, 0, 0),  # enforced for non-root users; the hook covers root
    ]
    for kind, soft, hard in limits:
        try:
            resource.setrlimit(kind, (soft, hard))
        except (ValueError, OSError):  # a limit already lower than ours stays
            pass


def readable_roots():
    """Where the program may read, as real paths: the standard library it imports from,
    its own /proc entry, a few device and time zone files. Computed before the hook."""
    roots = [os.path.realpath(p) for p in sys.path if p and os.path.exists(p)]
    roots += [f"/proc/{os.getpid()}"]
    roots += [os.path.realpath(p) for p in READABLE_EVERYWHERE]
    return tuple(sorted({r.rstrip("/") for r in roots} - {""}))  # never "/" itself


def make_guard(root, block_sockets, guard_reads=True, readable=()):
    """The audit hook. One flat function whose closure holds only immutable values and C
    builtins, captured here: a program that reaches the hook's frame (a traceback of its
    PermissionError) finds nothing it could rebind, and rebinding `builtins` or `os`
    attributes later changes nothing here."""
    lstat, stat, readlink, getcwd = os.lstat, os.stat, os.readlink, os.getcwd
    str_, bytes_, int_, tuple_, type_, len_, any_ = str, bytes, int, tuple, type, len, any
    denied, oserror = PermissionError, OSError
    blocked_events, blocked_modules = frozenset(BLOCKED_EVENTS), frozenset(BLOCKED_MODULES)
    blocked_prefixes = tuple(BLOCKED_PREFIXES) + (("socket.",) if block_sockets else ())
    path_events = {event: (tuple(paths), tuple(fds)) for event, (paths, fds) in PATH_EVENTS.items()}
    path_events = tuple(path_events.items())
    harmless, write_flags = frozenset(HARMLESS_TARGETS), WRITE_FLAGS
    list_events = frozenset(LIST_EVENTS)
    readable = tuple(readable)
    readable_below = tuple(r + "/" for r in readable)
    code_attributes = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
    link_mode, dir_mode, type_mask = 0o120000, 0o040000, 0o170000

    root = os.path.realpath(root).rstrip("/") or "/"

    def guard(event, args):
        if event in blocked_events or event.startswith(blocked_prefixes):
            raise denied(f"sandbox: {event} is not allowed")
        if event == "import":
            if args and args[0] in blocked_modules:
                raise denied(f"sandbox: importing {args[0]} is not allowed")
            return
        if event == "object.__setattr__":
            if len_(args) > 1 and args[1] in code_attributes:
                raise denied(f"sandbox: setting {args[1]} is not allowed")
            return
        # Which paths does this event change (or, for open, touch), and may it use dir_fd?
        if event == "open":
            path, mode, flags = args
            if type_(path) is int_ or path is None:
                return
            writes = any_(c in mode for c in "wax+") if type_(mode) is str_ else bool((flags or 0) & write_flags)
            targets, fds = (path,), ()
        elif event in list_events:
            path = args[0] if args else None
            if type_(path) is int_:  # a folder descriptor: only folders inside could be opened
                return
            targets, writes, fds = ((path if path is not None else "."),), False, ()
        else:
            spec = None
            for name, value in path_events:
                if name == event:
                    spec = value
                    break
            if spec is None:
                return
            positions, fd_positions = spec
            for i in fd_positions:
                if i < len_(args) and args[i] is not None and args[i] != -1:
                    raise denied(f"sandbox: {event} with dir_fd is not allowed")
            targets = tuple_(args[i] for i in positions if i < len_(args) and type_(args[i]) is not int_)
            writes, fds = True, ()
        for target in targets:
            if type_(target) is bytes_:
                target = target.decode("utf-8", "surrogateescape")
            if type_(target) is not str_:
                raise denied(f"sandbox: {event} needs a str or bytes path here (got {type_(target).__name__})")
            # realpath, inline: absolute, '.' and '..' collapsed, symbolic links followed.
            pending = (target if target.startswith("/") else getcwd() + "/" + target).split("/")[::-1]
            parts, hops = [], 0
            while pending:
                part = pending.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if parts:
                        parts.pop()
                    continue
                candidate = "/" + "/".join(parts + [part])
                try:
                    is_link = (lstat(candidate).st_mode & type_mask) == link_mode
                except oserror:
                    is_link = False
                if is_link:
                    hops += 1
                    if hops > 40:
                        raise denied(f"sandbox: too many symbolic links in {target}")
                    link = readlink(candidate)
                    if link.startswith("/"):
                        parts = []
                    pending.extend(link.split("/")[::-1])
                    continue
                parts.append(part)
            real = "/" + "/".join(parts)
            if real == root or real.startswith(root + "/") or real in harmless:
                continue
            if writes:
                raise denied(f"sandbox: {event}: writing outside the sandbox folder is not allowed ({real})")
            if guard_reads and not (real in readable or real.startswith(readable_below)):
                raise denied(f"sandbox: {event}: reading outside the sandbox folder is not allowed ({real})")
            if event in list_events:
                continue
            try:
                is_dir = (stat(real).st_mode & type_mask) == dir_mode
            except oserror:
                is_dir = False
            if is_dir:  # a folder descriptor outside would let relative paths (dir_fd) escape
                raise denied(f"sandbox: opening the folder {real} is not allowed")

    return guard


def main():
    settings = json.loads(sys.argv[1])
    set_limits(settings)
    os.chdir(settings["workdir"])
    with open(settings["program"], encoding="utf-8") as f:
        source = f.read()
    code = compile(source, settings["program"], "exec")
    guard = make_guard(settings["workdir"], settings["block_sockets"], settings.get("guard_reads", True), readable_roots())
    sys.addaudithook(guard)
    program = types.ModuleType("__main__")
    program.__file__ = os.path.join(settings["workdir"], settings["program"])
    sys.modules["__main__"] = program
    sys.argv = [settings["program"]]
    return code, program.__dict__


if __name__ == "__main__":
    _code, _namespace = main()
    # Nothing in the program's reach refers to this module, main() or the hook any more.
    for _name in [n for n in list(globals()) if n not in ("_code", "_namespace", "__builtins__")]:
        del globals()[_name]
    exec(_code, _namespace)
