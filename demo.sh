#!/usr/bin/env bash
# Runs kuvasz-streamer on a throwaway pair of local PostgreSQL servers (source and
# destination), with a sample schema and a short workload, and shows the rows arrive.
# Needs root (to install PostgreSQL 15 if missing and run the servers as `postgres`).
set -euo pipefail
cd "$(dirname "$0")"

PGBIN=/usr/lib/postgresql/15/bin
if [ ! -x "$PGBIN/postgres" ]; then
  echo "== installing PostgreSQL 15"
  apt-get update -q && apt-get install -y -q postgresql-15 postgresql-client-15
fi
# KVSZ_BIN: an already built binary (the test of this script passes its own).
if [ -n "${KVSZ_BIN:-}" ]; then
  BIN=$KVSZ_BIN
else
  echo "== building kuvasz-streamer"
  cargo build --release -q
  BIN=$PWD/target/release/kuvasz-streamer
fi
HTTP=127.0.0.1:${KVSZ_DEMO_HTTP_PORT:-8000}

DIR=$(mktemp -d /tmp/kvsz-demo.XXXXXX)
chmod 755 "$DIR"
# Ports nothing listens on now (a fixed pair collides with a server left running by
# an earlier, interrupted run); the range is below the kernel's ephemeral ports.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  while :; do
    p=$(( 20000 + RANDOM % 10000 ))
    listening "$p" || { echo "$p"; return; }
  done
}
SRC_PORT=$(free_port)
DST_PORT=$(free_port)
while [ "$DST_PORT" = "$SRC_PORT" ]; do DST_PORT=$(free_port); done
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$DIR"

cleanup() {
  [ -n "${DAEMON:-}" ] && kill "$DAEMON" 2>/dev/null || true
  for c in src dst; do as_pg "$PGBIN/pg_ctl" -D "$DIR/$c" -m immediate stop >/dev/null 2>&1 || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

for c in src dst; do
  as_pg "$PGBIN/initdb" -D "$DIR/$c" -A trust -U postgres --no-sync -E UTF8 --locale=C >/dev/null
done
start_server() { # name port extra-options
  as_pg "$PGBIN/pg_ctl" -D "$DIR/$1" -l "$DIR/$1.log" -w \
      -o "-p $2 -k $DIR -c listen_addresses=127.0.0.1 $3" start >/dev/null || {
    echo "== the $1 server did not start; its log:" >&2
    cat "$DIR/$1.log" >&2
    exit 1
  }
}
start_server src "$SRC_PORT" "-c wal_level=logical"
start_server dst "$DST_PORT" ""

psql_src() { psql -X -q -h 127.0.0.1 -p $SRC_PORT -U postgres "$@"; }
psql_dst() { psql -X -q -h 127.0.0.1 -p $DST_PORT -U postgres "$@"; }

echo "== sample schema: two tenant databases on the source, one warehouse destination"
for t in tenant1 tenant2; do
  psql_src -c "CREATE DATABASE $t"
  psql_src -d $t -c "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, city text);
                     CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int NOT NULL, amount numeric(10,2), status text);
                     INSERT INTO customers SELECT g, '$t customer ' || g, 'city ' || (g % 7) FROM generate_series(1, 100) g;
                     INSERT INTO orders SELECT g, 1 + g % 100, g * 1.5, 'new' FROM generate_series(1, 1000) g;"
done
psql_dst -c "CREATE DATABASE warehouse"
psql_dst -d warehouse -c "CREATE TABLE customers (sid text, id int, name text, city text, PRIMARY KEY (sid, id));
                          CREATE TABLE orders (sid text, id bigint, customer_id int, amount numeric(10,2), status text, PRIMARY KEY (sid, id));"

cat > "$DIR/map.toml" <<MAP
[[source]]
database = "shop"
urls = [
  { url = "postgres://postgres@127.0.0.1:$SRC_PORT/tenant1", sid = "tenant1" },
  { url = "postgres://postgres@127.0.0.1:$SRC_PORT/tenant2", sid = "tenant2" },
]
[source.tables]
customers = {}
orders = {}
MAP
cat > "$DIR/kuvasz-streamer.toml" <<CONF
[database]
url = "postgres://postgres@127.0.0.1:$DST_PORT/warehouse"
[server]
address = "$HTTP"
[app]
map_file = "$DIR/map.toml"
commit_delay = 0.5
CONF

echo "== starting kuvasz-streamer (log: $DIR/daemon.log)"
"$BIN" --conf "$DIR/kuvasz-streamer.toml" 2>"$DIR/daemon.log" &
DAEMON=$!

counts() {
  local s=0 d t
  for t in tenant1 tenant2; do s=$(( s + $(psql_src -d $t -Atc "SELECT count(*) FROM orders") )); done
  d=$(psql_dst -d warehouse -Atc "SELECT count(*) FROM orders")
  echo "orders on the sources: $s   in the warehouse: $d"
}

echo "== workload: inserts, updates, deletes for 10 seconds"
for i in $(seq 1 10); do
  for t in tenant1 tenant2; do
    psql_src -d $t -c "INSERT INTO orders SELECT g, 1 + g % 100, g, 'new' FROM generate_series($((i*1000+1000)), $((i*1000+1999))) g;
                       UPDATE orders SET status = 'paid' WHERE id % 10 = $((i % 10));
                       DELETE FROM orders WHERE id % 97 = $((i % 97));"
  done
  counts
  sleep 1
done
sleep 2
counts

echo "== monitoring: http://$HTTP/ (status page), /readyz, /metrics, /api/status"
echo "readyz: $(curl -s "http://$HTTP/readyz")"
curl -s "http://$HTTP/metrics" | grep -E '^kuvasz_source_(state\{.*state="streaming"|lag_seconds)'

echo "== stopping (SIGTERM): commits, confirms to the slots, exits 0"
kill -TERM "$DAEMON"; wait "$DAEMON"; DAEMON=
echo "== per tenant: rows on source vs warehouse, and whether the contents are identical"
for t in tenant1 tenant2; do
  a=$(psql_src -d $t -Atc "SELECT md5(string_agg(id||':'||customer_id||':'||amount||':'||status, ',' ORDER BY id)), count(*) FROM orders")
  b=$(psql_dst -d warehouse -Atc "SELECT md5(string_agg(id||':'||customer_id||':'||amount||':'||status, ',' ORDER BY id)), count(*) FROM orders WHERE sid = '$t'")
  if [ "$a" = "$b" ]; then echo "$t: identical ($a)"; else echo "$t: DIFFERENT source=$a warehouse=$b"; exit 1; fi
done
psql_dst -d warehouse -c "SELECT sid, count(*) AS orders, sum(amount) AS total FROM orders GROUP BY sid ORDER BY sid"
tail -n 5 "$DIR/daemon.log"
