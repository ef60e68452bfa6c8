"""The workspace store: executor replicas with a VPE_HOME each (no shared disk) and one PostgreSQL database
(ddl.sql's workspace.file, as the role vpe_executor), so that a DAG run's steps find each other's files whichever
replica they land on. Real servers, real task processes, a real PostgreSQL."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import psycopg
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import bootstrap, free_port, new_database, read_secrets, warehouse_dsn  # noqa: E402
from test_executor import (clean_environ, collect, executor, lines_of, run_cli, server_factory,  # noqa: E402,F401
                           shared_home, tasks_dir)

pb2 = executor.pb2


@pytest.fixture(scope="module")
def store(pg_env) -> dict[str, str]:
    """A migrated warehouse database of its own: the store's URL (as vpe_executor) and the superuser's DSN."""
    dsn, env = new_database(pg_env)
    bootstrap("migrate", env=env)
    password = read_secrets(Path(env["VPE_HOME"]))["VPE_EXECUTOR_DB_PASSWORD"]
    url = f"postgresql://vpe_executor:{password}@127.0.0.1:{env['VPE_PG_PORT']}/{env['VPE_WAREHOUSE_DB']}"
    return {"url": url, "password": password, "admin": dsn}


@pytest.fixture(scope="module")
def replicas(server_factory, store, tmp_path_factory):
    """Two replicas, each with a VPE_HOME of its own, sharing the store."""
    environ = clean_environ(VPE_EXECUTOR_WORKSPACE_STORE=store["url"])
    return [server_factory(home=tmp_path_factory.mktemp(f"replica{i}"), environ=environ).start() for i in range(2)]


def run(replica, workspace: str, *steps: str, **kwargs):
    events, status = collect(replica.client().run("six_a", "t/files.py", list(steps), workspace=workspace, **kwargs))
    return events, status


def show(replica, workspace: str) -> dict[str, str]:
    events, status = run(replica, workspace, "show")
    assert status.exit_code == 0 and not status.ended_by, (status, lines_of(events))
    return json.loads(lines_of(events, pb2.STDOUT)[0])


def stored(store, workspace: str) -> dict[str, str]:
    with psycopg.connect(store["admin"]) as conn:
        rows = conn.execute("SELECT path, convert_from(content, 'UTF8') FROM workspace.file WHERE workspace = %s",
                            (workspace,)).fetchall()
    return dict(rows)


def test_a_step_reads_what_a_step_on_the_other_replica_wrote(replicas, store):
    one, two = replicas
    assert run(one, "w-read", "write:catalog.csv=a,b", "write:sub/x.txt=1")[1].exit_code == 0
    assert show(two, "w-read") == {"catalog.csv": "a,b", "sub/x.txt": "1"}
    assert (two.home / "buffer" / "w-read" / "sub" / "x.txt").read_text() == "1"
    assert one.home != two.home

    unchanged = one.home / "buffer" / "w-read" / "sub" / "x.txt"
    before = unchanged.stat()
    assert run(two, "w-read", "write:catalog.csv=c,d")[1].exit_code == 0
    assert show(one, "w-read") == {"catalog.csv": "c,d", "sub/x.txt": "1"}
    after = unchanged.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), \
        "a file whose content the replica has already is not fetched again"
    assert stored(store, "w-read") == {"catalog.csv": "c,d", "sub/x.txt": "1"}


def test_a_run_that_fails_or_is_killed_sends_nothing(replicas, store):
    one, two = replicas
    assert run(one, "w-fail", "write:good.txt=1")[1].exit_code == 0
    assert run(one, "w-fail", "write:bad.txt=2", "write:good.txt=spoilt", "exit:3")[1].exit_code == 3
    _, killed = run(one, "w-fail", "write:late.txt=3", "delete:good.txt", f"wait:{one.home}/never",
                    timeout_seconds=1)
    assert killed.timed_out
    assert stored(store, "w-fail") == {"good.txt": "1"}
    assert show(two, "w-fail") == {"good.txt": "1"}
    assert show(one, "w-fail") == {"good.txt": "1"}, "the failed runs' leftovers are undone on their replica too"


@pytest.mark.parametrize("placement", ["two replicas", "one replica"])
def test_concurrent_runs_writing_different_files_in_one_workspace_both_land(replicas, store, tmp_path, placement):
    one, two = replicas
    first, second = (one, two) if placement == "two replicas" else (one, one)
    release = tmp_path / "release"
    workspace = f"w-both-{placement.split()[0]}"
    calls = [replica.client().run("six_a", "t/files.py", [f"write:{name}.txt={name}", f"wait:{release}"],
                                  workspace=workspace)
             for replica, name in ((first, "a"), (second, "b"))]
    for call in calls:  # both have started before either may end; collect() reads the rest of each stream
        next(event for event in call if event.HasField("started"))
    release.touch()
    for call in calls:
        status = collect(call)[1]
        assert status.exit_code == 0 and not status.ended_by, status
    assert stored(store, workspace) == {"a.txt": "a", "b.txt": "b"}
    assert show(two, workspace) == show(one, workspace) == {"a.txt": "a", "b.txt": "b"}


def test_a_workspace_written_before_the_store_is_kept_and_stored(replicas, store):
    one, two = replicas
    older = one.home / "buffer" / "w-older"
    (older / "sub").mkdir(parents=True)
    (older / "extract.csv").write_text("x,y")
    (older / "sub" / "z.txt").write_text("2")
    assert show(one, "w-older") == {"extract.csv": "x,y", "sub/z.txt": "2"}
    assert stored(store, "w-older") == {"extract.csv": "x,y", "sub/z.txt": "2"}
    assert show(two, "w-older") == {"extract.csv": "x,y", "sub/z.txt": "2"}


def test_a_file_deleted_by_a_run_is_gone_for_the_next_run_elsewhere(replicas, store):
    one, two = replicas
    assert run(one, "w-delete", "write:x.txt=1", "write:y.txt=2")[1].exit_code == 0
    assert run(two, "w-delete", "delete:x.txt")[1].exit_code == 0
    assert show(one, "w-delete") == {"y.txt": "2"}
    assert not (one.home / "buffer" / "w-delete" / "x.txt").exists()
    assert stored(store, "w-delete") == {"y.txt": "2"}


def test_a_run_whose_files_cannot_be_saved_fails_with_the_reason(replicas, store, tmp_path):
    one, two = replicas
    release = tmp_path / "release"
    call = one.client().run("six_a", "t/files.py", [f"wait:{release}", "write:lost.txt=1"], workspace="w-unsaved")
    next(event for event in call if event.HasField("started"))
    with psycopg.connect(store["admin"], autocommit=True) as conn:
        conn.execute("REVOKE INSERT ON workspace.file FROM vpe_executor")
        try:
            release.touch()
            status = collect(call)[1]
        finally:
            conn.execute("GRANT INSERT ON workspace.file TO vpe_executor")
    assert status.exit_code == 0, status
    assert status.ended_by.startswith(f"workspace store {executor.redacted_url(store['url'])}: cannot save the files "
                                      "of workspace 'w-unsaved': permission denied"), status.ended_by
    assert status.ended_by.endswith("; the run's files were not saved")
    assert executor.status_exit_code(status) == 1, "the CLI does not call it a success"
    assert show(two, "w-unsaved") == {}


def test_runs_go_on_after_the_store_dropped_the_executors_connections(replicas, store):
    one, _ = replicas
    assert run(one, "w-reconnect", "write:a.txt=1")[1].exit_code == 0
    with psycopg.connect(store["admin"], autocommit=True) as conn:
        dropped = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE application_name = 'vpe-executor'").fetchone()[0]
    assert dropped >= 1, "the executor keeps connections to the store open between runs"
    assert run(one, "w-reconnect", "write:b.txt=2")[1].exit_code == 0
    assert stored(store, "w-reconnect") == {"a.txt": "1", "b.txt": "2"}


def test_a_stored_path_that_would_leave_the_workspace_is_refused(replicas, store):
    one, _ = replicas
    with psycopg.connect(store["admin"], autocommit=True) as conn:
        conn.execute("INSERT INTO workspace.file (workspace, path, sha256, mode, content) "
                     "VALUES ('w-hostile', '../escaped.txt', '', 420, 'x')")
    events, status = run(one, "w-hostile", "write:x.txt=1")
    assert status.WhichOneof("outcome") is None, "the task never ran"
    assert "cannot bring workspace 'w-hostile' here: refusing the stored file '../escaped.txt'" in status.ended_by
    assert not (one.home / "buffer" / "escaped.txt").exists()


def test_a_store_that_is_down_gives_a_clean_error_and_the_run_does_not_start(server_factory, store, tmp_path):
    port = free_port()
    url = f"postgresql://vpe_executor:{store['password']}@127.0.0.1:{port}/warehouse"
    replica = server_factory(home=tmp_path / "alone",
                             environ=clean_environ(VPE_EXECUTOR_WORKSPACE_STORE=url)).start()
    events, status = run(replica, "w-down", "write:x.txt=1")
    assert status.WhichOneof("outcome") is None, "the task never ran"
    assert not any(event.HasField("started") for event in events)
    assert status.ended_by.startswith(f"workspace store postgresql://vpe_executor@127.0.0.1:{port}/warehouse: "
                                      "cannot bring workspace 'w-down' here: "), status.ended_by
    assert status.ended_by.endswith("; the run did not start") and "Traceback" not in status.ended_by
    assert store["password"] not in status.ended_by
    assert not (tmp_path / "alone" / "buffer" / "w-down" / "x.txt").exists()

    cli = run_cli(replica, "run", "six_a", "t/files.py", "--workspace", "w-down", "--", "write:x.txt=1")
    assert cli.returncode == 1 and "the run did not start" in cli.stdout + cli.stderr, cli
    ping = run_cli(replica, "ping")
    assert f"workspace store: postgresql://vpe_executor@127.0.0.1:{port}/warehouse" in ping.stdout
    assert store["password"] not in ping.stdout + replica.log()


def test_ping_says_when_workspaces_stay_on_the_replicas_disk(server_factory, tmp_path):
    replica = server_factory(home=tmp_path / "disk").start()
    assert replica.client().ping().workspace_store == ""
    assert "workspace store: none" in run_cli(replica, "ping").stdout


def test_pruning_removes_the_stores_old_workspaces_but_not_those_in_use(store):
    with psycopg.connect(store["admin"], autocommit=True) as conn:
        for workspace, age in (("p-old", "30 days"), ("p-busy", "30 days"), ("p-new", "1 day")):
            conn.execute("INSERT INTO workspace.file (workspace, path, sha256, mode, content, updated_at) "
                         "VALUES (%s, 'f', '', 420, '', now() - %s::interval)", (workspace, age))
        assert executor.WorkspaceStore(store["url"]).prune(14, {"p-busy"}) == (1, 1)
        left = {row[0] for row in conn.execute("SELECT workspace FROM workspace.file WHERE workspace LIKE 'p-%'")}
    assert left == {"p-busy", "p-new"}


def test_the_executor_role_reaches_the_workspace_schema_only(store):
    with psycopg.connect(store["url"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM workspace.file WHERE workspace = 'none'").fetchone() == (0,)
        for statement in ("SELECT * FROM landslide_event", "SELECT * FROM staging.weather_hourly",
                          "CREATE TABLE workspace.mine (x int)", "DROP TABLE workspace.file"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
