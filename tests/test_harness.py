"""The test harness runs against a real PostgreSQL server."""

from __future__ import annotations

import psycopg


def test_cluster_is_real_postgresql_and_takes_ddl(empty_db: str) -> None:
    with psycopg.connect(empty_db, autocommit=True) as conn:
        version_num = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
        assert version_num >= 150000
        assert "PostgreSQL" in conn.execute("SELECT version()").fetchone()[0]  # type: ignore[index]
        conn.execute("CREATE TABLE probe (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO probe VALUES (1, 'real')")
        assert conn.execute("SELECT note FROM probe WHERE id = 1").fetchone() == ("real",)


def test_each_test_gets_its_own_clean_database(empty_db: str, pg_server) -> None:
    other = pg_server.create_database(prefix="other")
    try:
        with psycopg.connect(pg_server.url(other), autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('probe')").fetchone() == (None,)
    finally:
        pg_server.drop_database(other)
