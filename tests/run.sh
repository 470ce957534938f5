#!/usr/bin/env bash
# The test suite: what CI runs (.ci/run) and what the README's quick start calls.
# Installs missing Debian packages, checks formatting, lints, the mesh-proto dependency rule,
# then builds everything once and runs every test (unit, property, namespace lab), then the
# Debian package test (packaging/test-deb.sh).
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tests/deps.sh
meshd_need_root
meshd_install_deps

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "mesh-proto stays free of I/O crates"
forbidden='^(tokio|mio|netlink-[a-z-]+|rtnetlink|nix|socket2|hyper|reqwest|axum|h2|ureq|tun-rs)$'
if cargo tree -p mesh-proto -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u | grep -E "$forbidden"; then
  echo "mesh-proto depends on an I/O crate (listed above); keep it pure" >&2
  exit 1
fi
echo "ok"

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "build"
cargo build --workspace --all-targets

step "tests"
# Namespace tests build their own uniquely named hosts; two test threads on these 2-core machines.
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"

step "Debian package"
# Builds the .deb, lintian, systemd-analyze verify, install/upgrade/purge in a Debian 12
# chroot, and a lab host running the packaged binaries joining with a token.
bash packaging/test-deb.sh

step "benchmark smoke"
# bench/run.sh end to end on meshd-wg alone (1 round of 2 s per test, about 20 s with the
# release build the package step made): the benchmark in the repository keeps working.
bash bench/run.sh --smoke
