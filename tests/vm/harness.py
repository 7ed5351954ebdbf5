"""Boot Debian's kernel under qemu (TCG) with the host root shared read-only, run a command.

The guest sees the host's `/` through 9p under a tmpfs overlay: every file of the host
(this checkout, its .venv, strongSwan, iperf3) is there at the same path, and whatever the
guest writes vanishes when it powers off. The command runs as root in the given directory;
its stdout, stderr and exit code come back through virtio-serial ports.

`tests/vm/setup_vm.sh` prepares the kernel, initramfs and init scripts (idempotent);
`ensure_vm_ready()` calls it when they are missing.

Facts that shape this (see /work/shared/reference/kernel-vm/README.md):
- /dev/kvm on the CI machine is PVM-only: a stock kernel does not boot with `-accel kvm`,
  so this is TCG. A boot costs 2-3 s; Python in the guest runs 13-30x slower than on the
  host, so batch many checks into one boot.
- No udev in the guest: modules are not loaded by device events. `modprobe` works (the
  guest's kernel modules and kmod are provided by stage 1), and the kernel's own
  request_module() calls work too.

Usage (also `python -m tests.vm.harness [--timeout S] -- COMMAND...`):

    result = run_in_vm("uname -r", timeout=60)
    assert result.returncode == 0, result.describe()
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

VM_DIR = Path(os.environ.get("ESPLANADE_VM_DIR", "/var/tmp/esplanade-vm"))
SETUP_SCRIPT = Path(__file__).with_name("setup_vm.sh")
TIMEOUT_RC = 124
VM_FAILED_RC = 125
# Host variables passed into the guest unless the caller overrides them.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TERM", "PYTHONPATH", "VIRTUAL_ENV")


class VmUnavailable(RuntimeError):
    """The VM cannot be prepared or booted on this host."""


@dataclass(frozen=True, slots=True)
class VmResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    console: str  # the guest kernel's console (last lines), for boot failures

    def describe(self) -> str:
        parts = [f"exit code {self.returncode} after {self.seconds:.1f}s"]
        if self.stdout:
            parts.append("--- stdout ---\n" + self.stdout[-20000:])
        if self.stderr:
            parts.append("--- stderr ---\n" + self.stderr[-20000:])
        if self.returncode in (TIMEOUT_RC, VM_FAILED_RC) and self.console:
            parts.append("--- guest console (tail) ---\n" + self.console)
        return "\n".join(parts)


def kernel_release(vm_dir: Path = VM_DIR) -> str:
    ready = vm_dir / "READY"
    if not ready.exists():
        raise VmUnavailable(f"{vm_dir} is not prepared: run {SETUP_SCRIPT}")
    return ready.read_text().strip()


def ensure_vm_ready(vm_dir: Path = VM_DIR, timeout: float = 600.0) -> str:
    """Run setup_vm.sh (idempotent, fast when everything is there); return the kernel release."""
    if shutil.which("qemu-system-x86_64") and (vm_dir / "READY").exists():
        return kernel_release(vm_dir)
    env = dict(os.environ, ESPLANADE_VM_DIR=str(vm_dir))
    proc = subprocess.run(
        ["bash", str(SETUP_SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise VmUnavailable(f"{SETUP_SCRIPT} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return kernel_release(vm_dir)


def _command_script(command: str | Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    lines = [f"cd -- {shlex.quote(str(cwd))} 2>/dev/null || cd /"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    lines.append("export HOME=/root USER=root LOGNAME=root ESPLANADE_IN_VM=1")
    lines.append(command if isinstance(command, str) else shlex.join(command))
    return "\n".join(lines) + "\n"


def run_in_vm(
    command: str | Sequence[str],
    *,
    timeout: float,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    rw_dir: Path | str | None = None,
    memory_mb: int = 512,
    cpus: int = 1,
    kernel_args: str = "",
    vm_dir: Path = VM_DIR,
) -> VmResult:
    """Boot a throw-away VM, run `command` (a bash line or an argv) as root, power off.

    `env` is added to the host's PATH/LANG/... `rw_dir` is a host directory shared
    read-write at the same path (for reports). The exit code is the command's, 124 on
    timeout, 125 if the VM failed before reporting one.
    """
    release = kernel_release(vm_dir)
    runs = vm_dir / "runs"
    runs.mkdir(exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="run.", dir=runs))
    started = time.monotonic()
    try:
        guest_env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        guest_env.update(env or {})
        (run / "cmd.sh").write_text(_command_script(command, Path(cwd or os.getcwd()), guest_env))
        for name in ("stdout", "stderr", "rc", "console.log"):
            (run / name).touch()
        append = [
            "console=ttyS0",
            "panic=-1",
            "quiet",
            "loglevel=3",
            f"esplanade_vm_dir={vm_dir}",
            f"esplanade_run={run}",
        ]
        rw_opts: list[str] = []
        if rw_dir is not None:
            rw = Path(rw_dir).resolve()
            rw.mkdir(parents=True, exist_ok=True)
            if any(c.isspace() for c in str(rw)):
                raise VmUnavailable(f"read-write dir {rw} must not contain spaces")
            rw_opts = [
                "-fsdev",
                f"local,id=rwdir,path={rw},security_model=none,multidevs=remap",
                "-device",
                "virtio-9p-pci,fsdev=rwdir,mount_tag=rwdir",
            ]
            append.append(f"esplanade_rwdir={rw}")
        if kernel_args:
            append.append(kernel_args)
        qemu = [
            "qemu-system-x86_64",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-name",
            "esplanade-vm",
            "-machine",
            "q35",
            "-accel",
            "tcg,tb-size=256",  # caps the code cache (the default costs 1 GiB of RSS)
            "-cpu",
            "max",
            "-smp",
            str(cpus),
            "-m",
            str(memory_mb),
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
            "-serial",
            f"file:{run / 'console.log'}",
            "-kernel",
            str(vm_dir / "kernel" / "boot" / f"vmlinux-{release}"),
            "-initrd",
            str(vm_dir / "initramfs.cpio.gz"),
            "-append",
            " ".join(append),
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            *rw_opts,
            "-device",
            "virtio-serial-pci",
        ]
        for port in ("stdout", "stderr", "rc"):
            qemu += [
                "-chardev",
                f"file,id={port},path={run / port}",
                "-device",
                f"virtserialport,chardev={port},name=esplanade.{port}",
            ]
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            qemu_output, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            qemu_output, _ = proc.communicate()
            timed_out = True
        rc_text = "".join(c for c in (run / "rc").read_text(errors="replace") if c.isdigit())
        console = "\n".join((run / "console.log").read_text(errors="replace").splitlines()[-40:])
        stderr = (run / "stderr").read_text(errors="replace")
        if rc_text:
            returncode = int(rc_text)
        elif timed_out:
            returncode = TIMEOUT_RC
            stderr += f"\nvm harness: timeout after {timeout:.0f}s"
        else:
            returncode = VM_FAILED_RC
            stderr += f"\nvm harness: VM exited (qemu rc={proc.returncode}) without a result: {qemu_output.decode()}"
        return VmResult(
            returncode=returncode,
            stdout=(run / "stdout").read_text(errors="replace"),
            stderr=stderr,
            seconds=time.monotonic() - started,
            console=console,
        )
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a command as root in a throw-away Debian 6.1 VM.")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--rw-dir", default=None, help="host dir shared read-write at the same path")
    parser.add_argument("--memory", type=int, default=512, help="MiB")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="a bash line, or an argv after --")
    args = parser.parse_args(argv)
    command = [c for c in args.command if c != "--"] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    ensure_vm_ready()
    result = run_in_vm(
        command[0] if len(command) == 1 else command,
        timeout=args.timeout,
        rw_dir=args.rw_dir,
        memory_mb=args.memory,
    )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode in (TIMEOUT_RC, VM_FAILED_RC):
        sys.stderr.write(result.console + "\n")
    sys.stderr.write(f"[vm] exit {result.returncode} after {result.seconds:.1f}s\n")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
