#!/bin/sh
# What the official postgres image's entrypoint does, for Debian's PostgreSQL 15: on an empty
# data directory, initdb with POSTGRES_USER as the superuser and its password, create
# POSTGRES_DB; then run the given `postgres ...` command as the postgres user.
set -eu
export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
mkdir -p "$PGDATA" /run/postgresql
chown -R postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
    chown postgres /tmp/pwfile
    as_postgres initdb --username="$POSTGRES_USER" --pwfile=/tmp/pwfile --auth=scram-sha-256 --encoding=UTF8 >/dev/null
    rm -f /tmp/pwfile
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    as_postgres pg_ctl -o "-c listen_addresses=" -w start >/dev/null
    PGPASSWORD="$POSTGRES_PASSWORD" psql -h /run/postgresql -U "$POSTGRES_USER" -d postgres -q \
        -c "CREATE DATABASE \"$POSTGRES_DB\""
    as_postgres pg_ctl -m fast -w stop >/dev/null
fi
if [ "${1:-}" = postgres ]; then shift; fi  # "postgres -c ...", as the compose file gives it
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -c listen_addresses='*' "$@"
