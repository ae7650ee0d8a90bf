#!/usr/bin/env bash
# Builds the packages from the release binary:
#   target/debian/kuvasz-streamer_<version>-1_amd64.deb   (cargo-deb)
#   target/generate-rpm/kuvasz-streamer-<version>-1.x86_64.rpm   (cargo-generate-rpm)
# The file lists are in Cargo.toml ([package.metadata.deb], [package.metadata.generate-rpm]).
# Usage: bash packaging/build-packages.sh [--no-build]   (--no-build: use the binary
# already in target/release)
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cargo-deb@3.8.0 cargo-generate-rpm@0.21.1; do
    command -v "${tool%@*}" >/dev/null || cargo install --locked "$tool"
done
if [ "${1:-}" != --no-build ]; then
    cargo build --release
fi
# Man pages go in compressed, as Debian policy and every rpm distribution want them.
mkdir -p target/man
gzip -9n -c man/kuvasz-streamer.8 >target/man/kuvasz-streamer.8.gz
gzip -9n -c man/kuvasz-streamer.toml.5 >target/man/kuvasz-streamer.toml.5.gz
cargo deb --no-build --no-strip
cargo generate-rpm
ls -l target/debian/*.deb target/generate-rpm/*.rpm
