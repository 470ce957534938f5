#!/usr/bin/env bash
# The package test (issue 8), run by tests/run.sh; as root, on Debian 12:
#   1. builds the .deb twice with packaging/build-deb.sh: the current version and a
#      "previous" one (VERSION~prev-1, the same build) to upgrade from;
#   2. lintian: no errors (warnings are listed and justified in packaging/README.md);
#   3. systemd-analyze verify accepts the units, installed in the chroot (its systemd units,
#      its /usr/bin/meshd, its man pages);
#   4. in a Debian 12 chroot (debootstrap, cached as a tarball in /var/cache/meshd-deb):
#      apt-get install of the previous .deb resolves its dependencies; meshd --version,
#      meshctl --help, --check-config of the shipped conffile, the man pages (installed,
#      rendered by `man --warnings -l` without a warning) and completions work; the
#      upgrade to the current .deb; the maintainer scripts run twice change nothing; purge
#      (and autoremove of the dependencies it pulled) leaves exactly the files that were
#      there before the install;
#   5. the lab test tests/tests/package.rs: a lab host running the package's meshd, meshctl
#      and meshd-wg (copied out of the installed chroot) joins the mesh with a token;
#   6. packaging/test-unit-nspawn.sh: the Debian 12 root with the .deb boots under
#      systemd-nspawn and meshd runs under the hardened unit (skipped, and said so, without
#      systemd-nspawn).
# Prints how long each step took. Nothing is started in the chroot (policy-rc.d says 101),
# nothing is mounted in it, and it is removed at exit.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=../tests/deps.sh
source tests/deps.sh
meshd_need_root
meshd_install_deps
meshd_install_package_deps

source packaging/debian-root.sh
CACHE=$MESHD_DEB_CACHE
BASE=$MESHD_DEB_BASE
ARCHIVES=$MESHD_DEB_ARCHIVES
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

work=$(mktemp -d /tmp/meshd-deb.XXXXXX)
root=$work/root

# Nothing is mounted into the chroot; make sure of it before deleting anything.
cleanup() {
  local rc=$?
  if grep -q " $work" /proc/self/mountinfo; then
    echo "test-deb.sh: something is mounted under $work; not removing it:" >&2
    grep " $work" /proc/self/mountinfo >&2
  else
    rm -rf "$work"
  fi
  return $rc
}
trap cleanup EXIT

declare -a timings=()
t_step=$SECONDS
step() { printf '\n== %s\n' "$*"; t_step=$SECONDS; }
took() { timings+=("$(printf '%-44s %4ds' "$1" $((SECONDS - t_step)))"); }
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# A maintainer script run by hand, in the environment dpkg gives it (deb-systemd-helper does
# nothing unless DPKG_MAINTSCRIPT_PACKAGE is set).
run_script() { local script=$1; shift; in_root DPKG_MAINTSCRIPT_PACKAGE=meshd \
  DPKG_MAINTSCRIPT_NAME="${script##*.}" DPKG_MAINTSCRIPT_ARCH=amd64 DPKG_ROOT= "$script" "$@"; }
# No pty in the chroot (/dev/pts is not mounted): dpkg writes its output directly.
APT=(apt-get -o Dpkg::Use-Pty=0 -y -q)

# A sorted list of the chroot's files with type and mode. Left out, and why:
#   proc sys dev run tmp    not the package's (and /tmp holds the .debs we copy in)
#   var/lib/dpkg            dpkg's own database (status, info/, triggers, *-old backups)
#   var/lib/apt var/cache/apt   apt's lists, extended_states and downloaded .debs
#   var/log                 apt's and dpkg's logs (history.log, term.log, dpkg.log, ...)
#   var/cache/man           man-db's index, rebuilt by its trigger when man pages come or go
#   var/cache/debconf       debconf's database (config.dat-old, templates.dat-old backups)
snapshot() {
  (cd "$root" && find . \( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run \
      -o -path ./tmp -o -path ./var/lib/dpkg -o -path ./var/lib/apt -o -path ./var/cache/apt \
      -o -path ./var/log -o -path ./var/cache/man -o -path ./var/cache/debconf \) -prune \
      -o -printf '%y %m %p\n') | LC_ALL=C sort
}

# apt-get install from the chroot; cached .debs first, and a refresh of the (cached) package
# lists only if the mirror has moved on since the tarball was made.
apt_install() {
  mkdir -p "$ARCHIVES"
  find "$ARCHIVES" -name '*.deb' -exec cp -t "$root/var/cache/apt/archives/" {} +
  if ! in_root "${APT[@]}" install --no-install-recommends "$@"; then
    echo "(refreshing the chroot's package lists and trying again)" >&2
    in_root "${APT[@]}" update
    in_root "${APT[@]}" install --no-install-recommends "$@"
  fi
  find "$root/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -exec cp -n -t "$ARCHIVES/" {} +
}

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[[ -n $version ]] || fail "no workspace version in Cargo.toml"
cur=$version-1
prev=$version~prev-1

step "build the .deb ($cur) with packaging/build-deb.sh"
cur_deb=$(packaging/build-deb.sh --output "$work/cur")
took "build .deb (release build + docs + cargo deb)"
step "build the previous .deb ($prev), to upgrade from"
prev_deb=$(packaging/build-deb.sh --deb-version "$prev" --output "$work/prev")
took "build previous .deb"
dpkg-deb --info "$cur_deb"
dpkg-deb --contents "$cur_deb"
deb_size=$(stat -c %s "$cur_deb")

step "lintian"
lintian --fail-on error --display-info --info "$cur_deb" | tee "$work/lintian.txt"
if grep -q '^E: ' "$work/lintian.txt"; then fail "lintian reports errors"; fi
# Every warning must be listed (and justified) in packaging/README.md.
while read -r tag; do
  grep -q -- "$tag" packaging/README.md || fail "lintian warning $tag is not explained in packaging/README.md"
done < <(sed -n 's/^W: [^ ]* \([a-z0-9-]*\).*/\1/p' "$work/lintian.txt" | sort -u)
took "lintian"

step "Debian 12 chroot"
mkdir -p "$CACHE" "$root"
if [[ -f $BASE ]]; then
  tar -C "$root" --numeric-owner -xzf "$BASE"
  took "chroot from cached tarball (warm)"
else
  meshd_debian_base
  tar -C "$root" --numeric-owner -xzf "$BASE"
  took "chroot by debootstrap (cold; tarball cached)"
fi
step "install and upgrade in the chroot"
# Services are never started in the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp "$prev_deb" "$root/tmp/meshd_prev.deb"
cp "$cur_deb" "$root/tmp/meshd_cur.deb"
snapshot > "$work/before.lst"

apt_install /tmp/meshd_prev.deb
[[ $(in_root dpkg-query -W -f '${Version}' meshd) == "$prev" ]] || fail "meshd $prev is not installed"
# (Outputs are captured before grep: with pipefail, `... | grep -q` can fail on SIGPIPE.)
for dep in nftables iproute2; do
  out=$(in_root dpkg-query -W -f '${Status}' "$dep")
  [[ $out == "install ok installed" ]] || fail "dependency $dep was not installed ($out)"
done
in_root meshd --version
out=$(in_root meshctl --help)
grep -q 'join' <<<"$out" || fail "meshctl --help does not list join: $out"
in_root meshd --check-config --config /etc/meshd/meshd.toml
# The pages are installed where man finds them, and each renders with no warning (groff's
# and man's: `man --warnings -l PAGE` prints nothing on stderr).
for page in man8/meshd.8 man8/meshctl.8 man8/meshd-wg.8 man5/meshd.toml.5; do
  [[ -s $root/usr/share/man/$page.gz ]] || fail "/usr/share/man/$page.gz is missing"
  warnings=$(in_root sh -c "MANWIDTH=80 man --warnings -l /usr/share/man/$page.gz 2>&1 >/dev/null")
  [[ -z $warnings ]] || fail "man --warnings -l $page: $warnings"
done
for page in "8 meshctl" "8 meshd" "8 meshd-wg" "5 meshd.toml"; do
  out=$(in_root sh -c "MANPAGER=cat MANWIDTH=80 man $page 2>&1")
  grep -q "^NAME" <<<"$out" || fail "man $page: $out"
done
out=$(in_root sh -c "MANPAGER=cat MANWIDTH=80 man meshctl")
grep -q "invite" <<<"$out" || fail "man meshctl does not describe invite"
out=$(in_root sh -c "MANPAGER=cat MANWIDTH=80 man meshd.toml")
grep -q "rotate_every_days" <<<"$out" || fail "man meshd.toml does not describe rotate_every_days"
# `meshctl completion bash` is valid bash and is what the package installs.
in_root sh -c "meshctl completion bash > /tmp/meshctl.bash"
in_root bash -n /tmp/meshctl.bash || fail "meshctl completion bash is not valid bash"
cmp "$root/tmp/meshctl.bash" "$root/usr/share/bash-completion/completions/meshctl" \
  || fail "meshctl completion bash differs from the installed completion"
rm -f "$root/tmp/meshctl.bash"
for prog in meshd meshctl meshd-wg; do
  out=$(in_root "$prog" -V)
  [[ $out == "$prog $version" ]] || fail "$prog -V printed: $out"
done
in_root dpkg-query -W -f '${Conffiles}\n' meshd | tee "$work/conffiles.txt"
grep -q '/etc/meshd/meshd.toml' "$work/conffiles.txt" || fail "meshd.toml is not a conffile"
[[ -L $root/etc/systemd/system/multi-user.target.wants/meshd.service ]] \
  || fail "meshd.service is not enabled"
for f in usr/share/bash-completion/completions/meshctl usr/share/zsh/vendor-completions/_meshctl \
         usr/share/fish/vendor_completions.d/meshctl.fish \
         usr/share/bash-completion/completions/meshd usr/share/bash-completion/completions/meshd-wg \
         usr/share/doc/meshd/copyright \
         usr/share/doc/meshd/changelog.Debian.gz etc/iproute2/rt_protos.d/meshd.conf; do
  [[ -s $root/$f ]] || fail "/$f is missing"
done
# The docs option is not something to complete.
if grep -rl -- --generate-docs "$root"/usr/share/{bash-completion,zsh,fish}; then
  fail "completions offer --generate-docs"
fi

apt_install /tmp/meshd_cur.deb
[[ $(in_root dpkg-query -W -f '${Version}' meshd) == "$cur" ]] || fail "the upgrade to $cur failed"
in_root meshd --version
took "chroot install + upgrade"

step "systemd-analyze verify, against the chroot"
# --root: the units it pulls in, the binaries ExecStart= names and (through MANPATH, for the
# man(1) that checks Documentation=) the man pages are those installed in the chroot.
MANPATH=$root/usr/share/man systemd-analyze verify --root="$root" \
  "$root/usr/lib/systemd/system/meshd.service" "$root/usr/lib/systemd/system/meshd-online.target" \
  2>&1 | tee "$work/verify.txt"
if [[ -s $work/verify.txt ]]; then fail "systemd-analyze verify reported the above"; fi
echo "ok: no findings"
# The unit's sandbox must stay at an overall exposure of 3.0 or less (issue 14).
exposure_line=$(systemd-analyze security --offline=yes --root="$root" \
  "$root/usr/lib/systemd/system/meshd.service" 2>/dev/null | tail -n 1 || true)
echo "$exposure_line"
exposure=$(grep -oE 'level for meshd.service: [0-9]+\.[0-9]+' <<<"$exposure_line" | grep -oE '[0-9]+\.[0-9]+$' || true)
[[ -n $exposure ]] || fail "systemd-analyze security printed no exposure: $exposure_line"
awk -v e="$exposure" 'BEGIN { exit !(e <= 3.0) }' \
  || fail "meshd.service's exposure is $exposure, above 3.0: see packaging/README.md"
echo "ok: exposure $exposure <= 3.0"
took "systemd-analyze verify"
step "maintainer scripts twice, purge"

# What meshd itself creates at run time, as it names them, so that purge has to find them.
mkdir -p "$root/var/lib/meshd" "$root/run/meshd"
printf 'generated\n' > "$root/etc/meshd/private.key"
printf 'generated\n' > "$root/etc/meshd/private.key.next"
printf '{}\n' > "$root/var/lib/meshd/netmap.json"

# Idempotency: every maintainer script run twice leaves the chroot as it was.
snapshot > "$work/installed.lst"
for run in 1 2; do
  run_script /var/lib/dpkg/info/meshd.postinst configure "$prev"
  run_script /var/lib/dpkg/info/meshd.postinst configure ""
done
in_root "${APT[@]}" install --reinstall /tmp/meshd_cur.deb
snapshot > "$work/again.lst"
diff -u "$work/installed.lst" "$work/again.lst" || fail "running the scripts again changed files"
for run in 1 2; do run_script /var/lib/dpkg/info/meshd.prerm remove; done
for run in 1 2; do run_script /var/lib/dpkg/info/meshd.postrm remove; done
# (postrm remove masked the unit, as dh's fragment does; configure unmasks it again)
[[ -L $root/etc/systemd/system/meshd.service ]] || fail "postrm remove did not mask meshd.service"
for run in 1 2; do run_script /var/lib/dpkg/info/meshd.postinst configure "$cur"; done
snapshot > "$work/again.lst"
diff -u "$work/installed.lst" "$work/again.lst" || fail "prerm/postrm/postinst run twice changed files"

# The package's binaries and conffile, for the lab test.
pkgroot=$work/pkgroot
mkdir -p "$pkgroot/usr/bin" "$pkgroot/etc/meshd"
cp -p "$root"/usr/bin/{meshd,meshctl,meshd-wg} "$pkgroot/usr/bin/"
cp -p "$root/etc/meshd/meshd.toml" "$pkgroot/etc/meshd/"
cp -p "$root/var/lib/dpkg/info/meshd.postrm" "$work/meshd.postrm"

in_root "${APT[@]}" purge meshd
in_root "${APT[@]}" autoremove --purge
cp "$work/meshd.postrm" "$root/tmp/meshd.postrm"
for run in 1 2; do run_script /tmp/meshd.postrm purge; done
rm -f "$root/tmp/meshd.postrm"
[[ ! -e $root/etc/meshd && ! -e $root/var/lib/meshd ]] || fail "purge left /etc/meshd or /var/lib/meshd"
snapshot > "$work/after.lst"
if ! diff -u "$work/before.lst" "$work/after.lst"; then
  fail "install, upgrade and purge left the files above changed"
fi
echo "ok: install -> upgrade -> purge leaves the chroot's file list as it was"
took "chroot scripts twice, purge, file-list diff"

step "lab: a host running the package's binaries joins with a token"
# The coordinator runs the build's binaries: the release ones just built for the package.
MESHD_PACKAGE_ROOT=$pkgroot MESHLAB_BIN_DIR=$CARGO_TARGET_DIR/release \
  cargo test -p meshlab --test package -- --ignored --nocapture --test-threads=1
took "lab test (package.rs, incl. its build)"

step "the hardened unit under systemd (systemd-nspawn boot of the Debian 12 root)"
if command -v systemd-nspawn >/dev/null && [[ -c /dev/net/tun ]]; then
  packaging/test-unit-nspawn.sh "$cur_deb"
  took "meshd.service under systemd-nspawn"
else
  echo "SKIPPED: systemd-nspawn (Debian package systemd-container) or /dev/net/tun is missing:" \
    "the unit's sandbox at run time is not checked in this run"
  took "meshd.service under systemd-nspawn (SKIPPED)"
fi

step "the booted fleet: the package under systemd on every daemon host, meshed, restarted under ping"
if command -v systemd-nspawn >/dev/null && [[ -c /dev/net/tun ]]; then
  MESHLAB_DEB=$cur_deb MESHLAB_DEB_PREV=$prev_deb MESHLAB_BIN_DIR=$CARGO_TARGET_DIR/release \
    cargo test -p meshlab --test boot_fleet -- --ignored --nocapture --test-threads=1
  took "booted fleet (boot_fleet.rs)"
else
  echo "SKIPPED: systemd-nspawn (Debian package systemd-container) or /dev/net/tun is missing:" \
    "the booted fleet did not run"
  took "booted fleet (SKIPPED)"
fi

printf '\n== package test: ok\n'
printf '%s\n' "${timings[@]}"
printf '%-44s %4d KiB\n' "$(basename "$cur_deb")" $((deb_size / 1024))
