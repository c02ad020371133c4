"""Replica replay lag, as the engines' health checks measure it (the reader set's MaxReplicaLag).

Pure: SQL text and the parsing of its answers; the engines' connectors run them on the health
check's own connection (PgConnector.query_role, MySQLConnector.query_role).

PostgreSQL: `now() - pg_last_xact_replay_timestamp()` is the age of the last transaction
replayed, which keeps growing on a standby of an idle primary that has nothing to replay: so when
everything received has been replayed (`pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn()`)
the lag is 0.  With no WAL receiver (receive lsn NULL: archive recovery, or the stream not up yet)
the timestamp's age is the lag; with no transaction replayed yet the lag is unknown (NULL).  A
standby whose primary is gone has received nothing new and replayed all it has: lag 0, so reads
go on while the writer is away.

MySQL/MariaDB: `Seconds_Behind_Master` of `SHOW SLAVE STATUS`; NULL (replication threads not
running, e.g. the primary is gone) is unknown, and a read-only server that replicates from
nothing (no row) has no lag to measure.  Unknown lag never takes a replica out: it is taken out
for failing or lagging, not for its writer being away.
"""

# The lag column added to the PostgreSQL health check query (NULL on a primary).
PG_REPLAY_LAG_SQL = (
    b"CASE WHEN NOT pg_is_in_recovery() THEN NULL"
    b" WHEN pg_last_wal_receive_lsn() IS NOT NULL"
    b" AND pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0"
    b" ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END")

MYSQL_REPLICA_STATUS_SQL = b"SHOW SLAVE STATUS"
# Seconds_Behind_Master's column in SHOW SLAVE STATUS: the 33rd, in MySQL since 5.0 and in every
# MariaDB (SHOW ALL SLAVES STATUS, which puts Connection_name first, is not used).
MYSQL_SECONDS_BEHIND_COLUMN = 32


def parse_seconds(text):
    """A lag column's text -> float seconds (never negative: clocks may differ a little), or
    None when NULL/empty or not a number."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if value != value:  # NaN
        return None
    return max(0.0, value)


def mysql_lag(rows):
    """SHOW SLAVE STATUS rows -> Seconds_Behind_Master as float, or None (not a replica, or
    replication not running)."""
    if not rows or len(rows[0]) <= MYSQL_SECONDS_BEHIND_COLUMN:
        return None
    return parse_seconds(rows[0][MYSQL_SECONDS_BEHIND_COLUMN])
