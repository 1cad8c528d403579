#!/usr/bin/env bash
# Starts a private PostgreSQL server for the coordinator tests (Debian's `postgresql` package;
# .ci/run installs it) on 127.0.0.1:55432 with a superuser `tabula` (trust authentication, so
# keep it on loopback), and prints the URL the tests take as TABULA_TEST_POSTGRES_URL.
# Idempotent: a server already running there is reused.
set -euo pipefail
port=${TABULA_PG_PORT:-55432}
pgdata=${TABULA_PGDATA:-/var/tmp/tabula-postgres-$port}
url="postgres://tabula@127.0.0.1:$port/postgres"
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$pgbin" ]; then
  echo "PostgreSQL is not installed: apt-get install postgresql (or run .ci/run)" >&2
  exit 1
fi
as_owner() {
  # initdb and postgres refuse to run as root: use the `postgres` user there.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if as_owner "$pgbin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
  echo "$url"
  exit 0
fi
if [ ! -f "$pgdata/PG_VERSION" ]; then
  mkdir -p "$pgdata"
  [ "$(id -u)" = 0 ] && chown postgres "$pgdata"
  as_owner "$pgbin/initdb" -D "$pgdata" -U tabula --auth=trust >/dev/null
fi
as_owner "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w \
  -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
echo "$url"
