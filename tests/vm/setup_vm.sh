#!/bin/bash
# Prepare everything tests/vm/harness.py needs to boot Debian's kernel under qemu (TCG).
#
# Idempotent; the second run takes well under a second. Run as root on Debian 12.
#
# Host-global change: `apt-get install qemu-system-x86` when qemu is missing. Nothing else
# is installed: the Debian kernel image, kmod and busybox-static are `apt-get download`ed
# and unpacked with `dpkg -x` under $ESPLANADE_VM_DIR (default /var/tmp/esplanade-vm):
#   debs/                downloaded .deb files
#   kernel/              linux-image-<abi>-amd64 unpacked, depmod run, vmlinux (PVH boot)
#   tools/               kmod (modprobe, depmod) and a static busybox, unpacked
#   initramfs.cpio.gz    busybox + the virtio/9p/overlay modules + stage1-init.sh as /init
#   stage2-init.sh       PID 1 on the overlay root: runs the command, reports its exit code
#   READY                written last; its content is the kernel release
#
# Why a PVH vmlinux: qemu boots the uncompressed ELF directly, skipping firmware and the
# xz decompression (2-3 s a boot under TCG). Why linux-image-amd64 and not the cloud
# flavour: the cloud kernel lacks 9p, which shares the host root with the guest.
set -euo pipefail
VM_DIR=${ESPLANADE_VM_DIR:-/var/tmp/esplanade-vm}
KERNEL_META=${ESPLANADE_VM_KERNEL_PKG:-linux-image-amd64}
mkdir -p "$VM_DIR/debs"
cd "$VM_DIR"
log() { echo "[setup_vm] $*" >&2; }
have_apt_lists() { ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages'; }

# 1. qemu (the only package installed on the host)
if ! command -v qemu-system-x86_64 >/dev/null; then
  log "installing qemu-system-x86"
  have_apt_lists || apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y \
    --no-install-recommends qemu-system-x86
fi

fetch_deb() {  # $1 = package name; prints the path of its downloaded .deb
  local deb
  deb=$(ls debs/"$1"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    have_apt_lists || apt-get update >&2
    (cd debs && apt-get -o APT::Sandbox::User=root download "$1" >&2)
    deb=$(ls debs/"$1"_*.deb | head -1)
  fi
  echo "$deb"
}

# 2. Debian kernel and its modules, unpacked (never installed)
if [ ! -s kernel/RELEASE ]; then
  abi_pkg=$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/{print $2; exit}')
  [ -n "$abi_pkg" ] || { log "cannot resolve $KERNEL_META"; exit 1; }
  log "kernel package: $abi_pkg"
  deb=$(fetch_deb "$abi_pkg")
  rm -rf kernel.tmp && mkdir kernel.tmp && dpkg -x "$deb" kernel.tmp
  ls kernel.tmp/lib/modules/ | head -1 > kernel.tmp/RELEASE
  rm -rf kernel && mv kernel.tmp kernel
fi
KREL=$(cat kernel/RELEASE)

if [ ! -s "kernel/boot/vmlinux-$KREL" ]; then
  python3 - "kernel/boot/vmlinuz-$KREL" "kernel/boot/vmlinux-$KREL.tmp" <<'PYEOF'
import lzma
import sys

data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("no xz stream in " + sys.argv[1])
open(sys.argv[2], "wb").write(lzma.LZMADecompressor().decompress(data[start:]))
PYEOF
  mv "kernel/boot/vmlinux-$KREL.tmp" "kernel/boot/vmlinux-$KREL"
fi

# 3. kmod and a static busybox, unpacked
if [ ! -x tools/bin/kmod ] || [ ! -x tools/bin/busybox ]; then
  rm -rf tools && mkdir tools
  dpkg -x "$(fetch_deb kmod)" tools
  dpkg -x "$(fetch_deb busybox-static)" tools
  for n in depmod modprobe insmod rmmod lsmod modinfo; do ln -sfn ../bin/kmod "tools/sbin/$n"; done
fi
[ -e "kernel/lib/modules/$KREL/modules.dep" ] || tools/sbin/depmod -b "$VM_DIR/kernel" "$KREL"

# 4. guest init scripts
write_if_changed() {  # $1 = file, content on stdin; exit status 0 when (re)written
  local tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$1"; chmod 755 "$1"
}
STAGE1_CHANGED=0
write_if_changed stage1-init.sh <<'INITEOF' && STAGE1_CHANGED=1 || true
#!/bin/sh
# PID 1 in the initramfs (static busybox): load the virtio/9p/overlay modules, mount the
# host root read-only under a tmpfs overlay, then switch_root to stage 2 on the host fs.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
die() { echo "esplanade-vm: $*"; echo o > /proc/sysrq-trigger; sleep 5; }
for m in $(cat /mods/order); do insmod "/mods/$m" || echo "esplanade-vm: insmod $m failed"; done
esplanade_vm_dir=/var/tmp/esplanade-vm
for a in $(cat /proc/cmdline); do case "$a" in esplanade_*=*) eval "${a%%=*}=\${a#*=}";; esac; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
  || die "9p mount of the host root failed"
mount -t tmpfs -o mode=755 rw /rw && mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || die "overlay mount failed"
R=/newroot
if [ -n "${esplanade_rwdir:-}" ]; then
  mkdir -p "$R$esplanade_rwdir"
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 rwdir "$R$esplanade_rwdir" \
    || echo "esplanade-vm: read-write dir mount failed"
fi
mount --move /dev $R/dev
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null
ln -sf /proc/self/fd $R/dev/fd
# the guest kernel's modules and kmod (the host may have neither)
KREL=$(uname -r)
mkdir -p $R/lib/modules
ln -sfn "$esplanade_vm_dir/kernel/lib/modules/$KREL" "$R/lib/modules/$KREL"
cp "$R$esplanade_vm_dir/tools/bin/kmod" $R/usr/sbin/kmod
for n in modprobe insmod rmmod lsmod depmod modinfo; do ln -sf kmod "$R/usr/sbin/$n"; done
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
hostname esplanade-vm
echo esplanade-vm > $R/etc/hostname
for p in /sys/class/virtio-ports/vport*; do
  case "$(cat "$p/name")" in
    esplanade.stdout) export ESPLANADE_VM_OUT=/dev/${p##*/};;
    esplanade.stderr) export ESPLANADE_VM_ERR=/dev/${p##*/};;
    esplanade.rc) export ESPLANADE_VM_RC=/dev/${p##*/};;
  esac
done
export esplanade_run esplanade_vm_dir
umount /proc /sys
exec switch_root $R /bin/sh "$esplanade_vm_dir/stage2-init.sh"
die "switch_root failed"
INITEOF
write_if_changed stage2-init.sh <<'INITEOF' || true
#!/bin/sh
# PID 1 on the overlay root: run the command the harness wrote, report its exit code on
# the esplanade.rc port, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ip link set lo up
rc=255
if [ -r "$esplanade_run/cmd.sh" ]; then
  bash "$esplanade_run/cmd.sh" </dev/null >"${ESPLANADE_VM_OUT:-/dev/console}" 2>"${ESPLANADE_VM_ERR:-/dev/console}"
  rc=$?
else
  echo "esplanade-vm: no command in $esplanade_run" >"${ESPLANADE_VM_ERR:-/dev/console}"
fi
echo "$rc" > "${ESPLANADE_VM_RC:-/dev/console}"
sync
echo o > /proc/sysrq-trigger
sleep 10
INITEOF

# 5. initramfs: busybox, the modules stage 1 needs, /init
if [ ! -e initramfs.cpio.gz ] || [ $STAGE1_CHANGED = 1 ]; then
  log "building initramfs.cpio.gz"
  S=$(mktemp -d)
  mkdir -p $S/bin $S/mods $S/proc $S/sys $S/dev $S/lower $S/rw $S/newroot
  cp tools/bin/busybox $S/bin/
  for a in sh mount umount insmod mkdir switch_root cat echo ls ln cp sleep hostname uname; do
    ln -s busybox "$S/bin/$a"
  done
  for m in virtio_pci virtio_console 9pnet_virtio 9p overlay; do
    tools/sbin/modprobe -d "$VM_DIR/kernel" -S "$KREL" --show-depends $m | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' > $S/mods.list
  while read -r p; do cp "$p" $S/mods/; basename "$p"; done < $S/mods.list > $S/mods/order
  rm $S/mods.list
  cp stage1-init.sh $S/init
  (cd $S && find . | "$VM_DIR/tools/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -1 > initramfs.cpio.gz.tmp
  mv initramfs.cpio.gz.tmp initramfs.cpio.gz
  rm -rf "$S"
fi

echo "$KREL" > READY
log "ready: $VM_DIR, kernel $KREL, $(qemu-system-x86_64 --version | awk 'NR==1{print $1" "$4}')"
