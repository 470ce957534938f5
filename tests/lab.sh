#!/usr/bin/env bash
# The lab: the whole fleet on this machine, built from network namespaces.
#   tests/lab.sh up          build, start meshd on every host, wait until meshed, show `meshctl peers`
#   tests/lab.sh exec HOST CMD...   run a command on a lab host (e.g. `wg show wgmesh0`, `meshctl peers`)
#   tests/lab.sh down        remove everything the lab made
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/deps.sh
meshd_need_root
meshd_install_deps
cargo build --release --quiet -p meshd -p meshd-engine -p meshctl -p meshlab
exec target/release/meshlab "$@"
