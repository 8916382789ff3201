#!/bin/sh
# Start a throwaway PostgreSQL for the storage tests (Debian 12, as root).
# Installs Debian's postgresql if missing, runs a cluster in a temporary
# directory on 127.0.0.1 only, creates database "stitch" and prints
#   STITCH_TEST_POSTGRES=postgres://stitch@127.0.0.1:PORT/stitch?sslmode=disable
# on standard output. Stop it with: scripts/postgres.sh stop
set -eu
PORT=${STITCH_PG_PORT:-55432}
DIR=${STITCH_PG_DIR:-/tmp/stitch-pg}

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }

if [ "${1:-}" = stop ]; then
	[ -d "$DIR/data" ] && su postgres -s /bin/sh -c "$(bindir)/pg_ctl -D '$DIR/data' -m fast stop" >&2 || true
	exit 0
fi

if [ -z "$(bindir)" ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq postgresql >&2
fi
BIN=$(bindir)

if ! su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$DIR/data' status" >/dev/null 2>&1; then
	rm -rf "$DIR"
	mkdir -p "$DIR"
	chown postgres "$DIR"
	su postgres -s /bin/sh -c "$BIN/initdb -D '$DIR/data' -A trust -U postgres" >&2
	# Loopback only; fsync off: the data is thrown away.
	su postgres -s /bin/sh -c "$BIN/pg_ctl -D '$DIR/data' -l '$DIR/log' -w \
		-o \"-c listen_addresses=127.0.0.1 -p $PORT -k '$DIR' -c fsync=off -c max_connections=200\" start" >&2
	psql="psql -h 127.0.0.1 -p $PORT -U postgres -v ON_ERROR_STOP=1 -q"
	su postgres -s /bin/sh -c "$psql -c 'CREATE ROLE stitch LOGIN' -c 'CREATE DATABASE stitch OWNER stitch'" >&2
fi
echo "STITCH_TEST_POSTGRES=postgres://stitch@127.0.0.1:$PORT/stitch?sslmode=disable"
