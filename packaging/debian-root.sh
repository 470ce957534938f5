# Sourced by packaging/test-deb.sh and tests/lab.sh: the cached Debian 12 root the package
# tests and the booted fleet start from. `meshd_debian_base` makes the tarball once with
# debootstrap from deb.debian.org (minbase plus man-db, systemd and procps) and leaves it in
# $MESHD_DEB_BASE; delete it to start cold.
MESHD_DEB_CACHE=/var/cache/meshd-deb
MESHD_DEB_MIRROR=http://deb.debian.org/debian
MESHD_DEB_SUITE=bookworm
# man-db: to read the installed man pages with man(1); systemd and procps (/bin/kill): the
# units and commands meshd.service refers to, for systemd-analyze verify and for booting.
MESHD_DEB_INCLUDE=man-db,systemd,procps
MESHD_DEB_BASE=$MESHD_DEB_CACHE/$MESHD_DEB_SUITE-minbase-${MESHD_DEB_INCLUDE//,/-}.tar.gz
MESHD_DEB_ARCHIVES=$MESHD_DEB_CACHE/archives

# Make $MESHD_DEB_BASE if it is missing. Prints what it did.
meshd_debian_base() {
  [[ -f $MESHD_DEB_BASE ]] && return 0
  local tmp
  mkdir -p "$MESHD_DEB_CACHE"
  tmp=$(mktemp -d /tmp/meshd-debootstrap.XXXXXX)
  debootstrap --variant=minbase --include="$MESHD_DEB_INCLUDE" "$MESHD_DEB_SUITE" "$tmp" "$MESHD_DEB_MIRROR" \
    || { rm -rf "$tmp"; return 1; }
  rm -f "$tmp"/var/cache/apt/archives/*.deb
  tar -C "$tmp" --numeric-owner -czf "$MESHD_DEB_BASE.tmp" . && mv "$MESHD_DEB_BASE.tmp" "$MESHD_DEB_BASE"
  rm -rf "$tmp"
  echo "debootstrapped Debian 12 and cached it as $MESHD_DEB_BASE"
}
