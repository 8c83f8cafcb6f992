#!/usr/bin/env bash
# The dependency check, offline: cargo-deny (installed here at a pinned version if missing)
# against the RustSec snapshot in third_party/advisory-db (see its SNAPSHOT.txt), with the
# exceptions and their reasons in deny.toml. Fails on any other advisory, unmaintained or yanked
# crate in Cargo.lock, on a second version of a crate not listed there, on a license outside
# its list, and on a crate from anywhere but crates.io.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version=0.20.2
tools="$root/target/tools"
deny="$tools/bin/cargo-deny"
if ! [ -x "$deny" ] || ! "$deny" --version | grep -q " $version\$"; then
  cargo install --quiet --locked --root "$tools" cargo-deny --version "$version"
fi
# cargo-deny keeps each database under db-path in a directory named after its URL.
export KEEL_ADVISORY_DBS="$root/target/advisory-dbs"
db="$KEEL_ADVISORY_DBS/advisory-db-3157b0e258782691"
rm -rf "$db"
mkdir -p "$db"
cp -r third_party/advisory-db/. "$db/"
git -C "$db" init -q
git -C "$db" add -A
git -C "$db" -c user.name=keel -c user.email=keel@localhost commit -q -m "RustSec snapshot $(head -c 80 third_party/advisory-db/SNAPSHOT.txt | grep -o '[0-9a-f]\{40\}' || true)"
# Every crate of every target must be downloaded for an offline `cargo metadata`.
cargo fetch --quiet
"$deny" --offline check advisories bans licenses sources
echo "advisories, bans, licenses, sources: clean (RustSec snapshot $(grep -o '[0-9a-f]\{40\}' third_party/advisory-db/SNAPSHOT.txt | head -1))"
