"""The SQL command vocabulary of the postgres classifier, without the parser.

Why a module of its own (issue 16): the policy compiler checks the command names a policy
writes (``match.postgres.statements``) in every sidecar, while the parser (``pglast``,
libpg_query: ~2.5-3 MB of RSS) is needed only where SQL is classified - a pod with a postgres
connection (``postgres/``) or ``chaperone policy test``. :mod:`.postgres` classifies with these
tables; the compiler reads :data:`STATEMENT_NAMES` from here.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Kind", "KINDS", "NODES", "PREFIX", "OPAQUE", "TRANSACTION", "STATEMENT_NAMES"]

Kind = Literal["read", "write", "ddl", "other"]
KINDS: tuple[Kind, ...] = ("read", "write", "ddl", "other")

# node class -> (command, kind). Anything not listed: first CamelCase word, kind from PREFIX.
NODES: dict[str, tuple[str, Kind]] = {
    "SelectStmt": ("SELECT", "read"), "VariableShowStmt": ("SHOW", "read"),
    "ExplainStmt": ("EXPLAIN", "read"), "FetchStmt": ("FETCH", "read"),
    "DeclareCursorStmt": ("DECLARE", "read"), "ClosePortalStmt": ("CLOSE", "other"),
    "InsertStmt": ("INSERT", "write"), "UpdateStmt": ("UPDATE", "write"),
    "DeleteStmt": ("DELETE", "write"), "MergeStmt": ("MERGE", "write"),
    "CopyStmt": ("COPY", "read"), "TruncateStmt": ("TRUNCATE", "write"),
    "RefreshMatViewStmt": ("REFRESH", "write"),
    "RenameStmt": ("ALTER", "ddl"), "IndexStmt": ("CREATE", "ddl"), "ViewStmt": ("CREATE", "ddl"),
    "RuleStmt": ("CREATE", "ddl"), "DefineStmt": ("CREATE", "ddl"),
    "CompositeTypeStmt": ("CREATE", "ddl"), "CreatedbStmt": ("CREATE", "ddl"),
    "DropdbStmt": ("DROP", "ddl"), "CommentStmt": ("COMMENT", "ddl"), "SecLabelStmt": ("SECURITY LABEL", "ddl"),
    "GrantStmt": ("GRANT", "ddl"), "GrantRoleStmt": ("GRANT", "ddl"), "ReindexStmt": ("REINDEX", "ddl"),
    "ClusterStmt": ("CLUSTER", "ddl"), "ImportForeignSchemaStmt": ("IMPORT FOREIGN SCHEMA", "ddl"),
    "ReassignOwnedStmt": ("REASSIGN OWNED", "ddl"), "DropOwnedStmt": ("DROP", "ddl"),
    "ReplicaIdentityStmt": ("ALTER", "ddl"),
    "TransactionStmt": ("BEGIN", "other"), "VariableSetStmt": ("SET", "other"),
    "DiscardStmt": ("DISCARD", "other"), "ListenStmt": ("LISTEN", "other"),
    "UnlistenStmt": ("UNLISTEN", "other"), "NotifyStmt": ("NOTIFY", "other"),
    "PrepareStmt": ("PREPARE", "other"), "DeallocateStmt": ("DEALLOCATE", "other"),
    "LockStmt": ("LOCK", "other"), "CheckPointStmt": ("CHECKPOINT", "other"),
    "VacuumStmt": ("VACUUM", "other"), "ConstraintsSetStmt": ("SET", "other"),
    "DoStmt": ("DO", "other"), "CallStmt": ("CALL", "other"), "ExecuteStmt": ("EXECUTE", "other"),
    "LoadStmt": ("LOAD", "other"),
}
PREFIX: dict[str, Kind] = {"Create": "ddl", "Alter": "ddl", "Drop": "ddl"}
# What they run is not in the text (a function body, a prepared plan, a shared library).
OPAQUE = frozenset({"DoStmt", "CallStmt", "ExecuteStmt", "LoadStmt"})
TRANSACTION = {
    "TRANS_STMT_BEGIN": "BEGIN", "TRANS_STMT_START": "BEGIN", "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK", "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE", "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION", "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}
# Every command name a policy may write in match.postgres.statements.
STATEMENT_NAMES = frozenset(
    {c for c, _ in NODES.values()} | set(TRANSACTION.values())
    | {"CREATE", "ALTER", "DROP", "REVOKE", "RESET", "ANALYZE", "SELECT INTO"})
