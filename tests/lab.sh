#!/usr/bin/env bash
# The lab: the whole fleet on this machine, built from network namespaces.
#   tests/lab.sh up          build, start meshd on every host, wait until meshed, show `meshctl peers`
#   tests/lab.sh exec HOST CMD...   run a command on a lab host (e.g. `wg show wgmesh0`, `meshctl peers`)
#   tests/lab.sh up --boot   the booted fleet: the Debian package under systemd in a container per host
#   tests/lab.sh down        remove everything the lab made
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/deps.sh
meshd_need_root
meshd_install_deps
cargo build --release --quiet -p meshd -p meshd-engine -p meshctl -p meshlab
if [[ ${1:-} == up && " $* " == *" --boot "* ]]; then
  # The booted fleet boots the package from the cached Debian 12 root.
  meshd_install_package_deps
  source packaging/debian-root.sh
  meshd_debian_base
  if [[ " $* " != *" --deb "* && -z ${MESHLAB_DEB:-} ]]; then
    MESHLAB_DEB=$(packaging/build-deb.sh | tail -n 1)
    export MESHLAB_DEB
  fi
fi
exec target/release/meshlab "$@"
