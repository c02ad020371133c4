"""Tracked MySQL session state: sync statements, normalisation, USE parsing."""

from txrdsproxy.proxy import mysql_state as st


BASE = {"character_set_client": "utf8mb4", "character_set_connection": "utf8mb4",
        "character_set_results": "utf8mb4", "collation_connection": "utf8mb4_general_ci",
        "time_zone": "SYSTEM", "autocommit": "1", "sql_mode": "STRICT_TRANS_TABLES",
        "session_track_schema": "1"}


def test_nothing_to_sync():
    assert st.sync_sql(dict(BASE), BASE, {}) == (b"", {})


def test_values_back_to_baseline_and_to_desired():
    current = dict(BASE, time_zone="+05:00", sql_mode="ANSI_QUOTES")
    sql, target = st.sync_sql(current, BASE, {"autocommit": "0"})
    assert sql == b"SET time_zone='SYSTEM', autocommit=0, sql_mode='STRICT_TRANS_TABLES'"
    assert target == {"time_zone": "SYSTEM", "autocommit": "0", "sql_mode": "STRICT_TRANS_TABLES"}


def test_collation_reapplied_after_charset_and_null_results():
    current = dict(BASE, character_set_connection="latin1", collation_connection="latin1_bin",
                   character_set_results="NULL")
    sql, _ = st.sync_sql(current, BASE, {})
    assert sql == (b"SET character_set_connection='utf8mb4', character_set_results='utf8mb4',"
                   b" collation_connection='utf8mb4_general_ci'")
    sql, _ = st.sync_sql(dict(BASE), BASE, {"character_set_results": "NULL"})
    assert sql == b"SET character_set_results=NULL"


def test_set_names_without_collate_follows_charset():
    collations = st.Collations([["8", "latin1_swedish_ci", "latin1", "Yes"],
                                ["47", "latin1_bin", "latin1", ""]])
    desired = {}
    applied = st.apply_assignments(desired, {"character_set_client": "latin1",
                                             "character_set_connection": "LATIN1",
                                             "character_set_results": "latin1"}, collations)
    assert applied["collation_connection"] == "latin1_swedish_ci"
    assert collations.for_id(47)["collation_connection"] == "latin1_bin"
    assert collations.for_id(999) == {}


def test_normalize_and_literals():
    assert st.normalize("autocommit", "ON") == "1"
    assert st.normalize("session_track_schema", "off") == "0"
    assert st.normalize("character_set_results", None) == "NULL"
    assert st.literal("it's") == "'it\\'s'"


