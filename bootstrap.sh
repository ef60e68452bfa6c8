#!/usr/bin/env bash
# VPE bootstrap: brings the platform up, reports on it, and takes it down.
#
# Where a Docker engine answers, the stack runs under docker compose; otherwise
# every component runs as a local process with all state under $VPE_HOME.
# Both modes read the same .env, airflow.env, SQL, envs/ and dags/.
#
# Read from the top: usage, main, then what main calls, section by section (bash looks a
# function up when it is called, so `main "$@"` on the last line sees them all).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
COMPONENTS=(postgres executor airflow)
AIRFLOW_SERVICES=(api-server scheduler dag-processor triggerer)

usage() {
  cat <<EOF
Usage: ./bootstrap.sh [--local|--docker] [--offline-demo] [--celery] [COMMAND] [ARGS...]

Commands:
  up [COMPONENT...]  start what is down (default command); components: ${COMPONENTS[*]}; on an executor
                     or worker host (VPE_CENTRAL_HOST set): executor, celery-worker (README "Running on
                     several hosts")
  status             one line per component: address and health (exit 1 if any is unhealthy)
  down               stop every process this project started; data is kept
  psql [--admin] [ARGS...]  psql on the warehouse as the reader role (--admin: as the superuser, for
                     migrations); ARGS go to psql
  logs [COMPONENT...] last lines of the components' logs (all without one)
  migrate            apply ddl.sql and dml.sql to the warehouse (up does this too)
  airflow [ARGS...]  the airflow CLI, configured for this stack (e.g. airflow dags list)
  executor [ARGS...] the executor's CLI, configured for this stack (e.g. executor envs)
  test [ARGS...]     install the test tools and run the test suite, or the test files ARGS name
                     (ARGS go to pytest)
  config             print the resolved configuration and mode

Options:
  --local            run every component as a local process (default without a Docker engine)
  --docker           run the stack with docker compose (default when a Docker engine answers)
  --celery           Airflow's CeleryExecutor: Redis and VPE_CELERY_WORKERS Celery workers
                     (same as VPE_AIRFLOW_EXECUTOR=CeleryExecutor)
  --offline-demo     no internet: crawl SYNTHETIC weather from a local Open-Meteo stand-in,
                     into the database VPE_DEMO_WAREHOUSE_DB (local mode); `live` catalog reads
                     go to a local stand-in of NASA's ArcGIS layer
  -h, --help         this help

Configuration: .env (every port, name and path); environment variables override it.
EOF
}

# Options, then one command in the chosen mode: cmd_* (local processes) or compose_* (docker compose).
main() {
  MODE_FLAG="" OFFLINE_DEMO=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --local) MODE_FLAG=local ;;
      --docker) MODE_FLAG=docker ;;
      --offline-demo) OFFLINE_DEMO=1 ;;
      --celery) export VPE_AIRFLOW_EXECUTOR=CeleryExecutor ;;
      -h|--help|help) usage; exit 0 ;;
      -*) usage >&2; exit 2 ;;
      *) break ;;
    esac
    shift
  done
  local command=${1:-up}
  [ $# -gt 0 ] && shift
  load_config
  choose_mode
  [ "$MODE" = docker ] || several_hosts_addresses
  case "$command" in
    config) print_config; return ;;
    test) cmd_test "$@"; return ;;
    up|logs) all_components "$@" || { usage >&2; exit 2; } ;;
    # A reader session (SELECT everything, scratch tables in schema scratch); --admin: the superuser.
    psql) PSQL_USER=vpe_reader; [ "${1:-}" != --admin ] || { PSQL_USER=$VPE_PG_USER; shift; } ;;
    status|down|migrate|airflow|executor) ;;
    *) usage >&2; exit 2 ;;
  esac
  if [ "$MODE" = docker ]; then
    [ "$OFFLINE_DEMO" = 0 ] || die "--offline-demo runs in local mode only: ./bootstrap.sh --local --offline-demo"
    "compose_$command" "$@"
    return
  fi
  prepare_local
  "cmd_$command" "$@"
}

say() { printf '%s\n' "$*"; }
step() { printf '==> %s\n' "$*"; }
die() { printf 'bootstrap: %s\n' "$*" >&2; exit 1; }

# --- configuration -----------------------------------------------------------

load_config() {
  read_env_file "$ROOT/.env"
  VPE_HOME=$(absolute "$VPE_HOME")
  VPE_VENV=$(absolute "$VPE_VENV")
  VPE_DAGS_DIR=$(absolute "$VPE_DAGS_DIR")
  VPE_TASKS_DIR=$(absolute "$VPE_TASKS_DIR")
  export VPE_HOME VPE_VENV VPE_DAGS_DIR VPE_TASKS_DIR
  export VPE_EXECUTOR_TASKS_DIR=$VPE_TASKS_DIR
  PG_DATA=$VPE_HOME/pg/data
  PG_SOCKET=$VPE_HOME/pg/run
  LOGS=$VPE_HOME/logs
  PIDS=$VPE_HOME/run
  SECRETS=$VPE_HOME/secrets.env
  export VPE_BUFFER=$VPE_HOME/buffer
  export AIRFLOW_HOME=$VPE_HOME/airflow
}

# Exports a KEY=value file (.env, airflow.env) without overwriting variables the caller already set.
# Values are taken as written: no quotes, no ${VAR}.
read_env_file() {
  local line key value
  while IFS= read -r line || [ -n "$line" ]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    [[ "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || die "${1#"$ROOT"/}: cannot parse line: $line"
    key=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    [ -n "${!key+x}" ] || export "$key=$value"
  done < "$1"
}

absolute() { case "$1" in /*) say "$1" ;; *) say "$ROOT/$1" ;; esac; }

# An explicit flag wins; otherwise compose whenever a Docker engine answers.
choose_mode() {
  if [ -n "${MODE_FLAG:-}" ]; then
    MODE=$MODE_FLAG
  elif command -v docker >/dev/null 2>&1 && timeout 5 docker info >/dev/null 2>&1; then
    MODE=docker
  else
    MODE=local
  fi
}

print_config() {
  say "VPE_MODE=$MODE"
  local key
  for key in $(grep -oE '^[A-Za-z_][A-Za-z0-9_]*' "$ROOT/.env"); do
    say "$key=${!key}"
  done
}

# --- commands ----------------------------------------------------------------

prepare_local() {
  make_state_dirs
  ensure_secrets
  if [ "$OFFLINE_DEMO" = 1 ] || { ! satellite && open_meteo_running; }; then enter_offline_demo; fi
  # A running Redis (or, on a worker host, running workers) means the stack was started under Celery: later
  # commands keep to it.
  if redis_running || compgen -G "$PIDS/celery-worker-*.pid" > /dev/null; then export VPE_AIRFLOW_EXECUTOR=CeleryExecutor; fi
  export_warehouse_dsn
  export_workspace_store
  airflow_env
}

cmd_up() {
  local wanted=("$@") component
  if satellite; then
    [ ${#wanted[@]} -gt 0 ] && [[ " ${wanted[*]} " != *" postgres "* && " ${wanted[*]} " != *" airflow "* ]] \
      || die "this host reaches the central host $VPE_CENTRAL_HOST (VPE_CENTRAL_HOST): start what runs here, ./bootstrap.sh up executor or ./bootstrap.sh --celery up celery-worker"
  fi
  [ ${#wanted[@]} -gt 0 ] || wanted=("${COMPONENTS[@]}")
  if [ "$OFFLINE_DEMO" = 1 ] && ! satellite; then
    open_meteo_running || ! running executor "executor.py serve" \
      || die "the executor runs against the real weather API; to switch to the offline demo: ./bootstrap.sh down && ./bootstrap.sh --offline-demo"
    wanted=(open-meteo arcgis "${wanted[@]}")
  fi
  exec 9> "$PIDS/bootstrap.lock"
  flock -n 9 || die "another ./bootstrap.sh is working on $VPE_HOME; wait for it to finish."
  ensure_venv
  for component in "${wanted[@]}"; do "start_${component//-/_}"; done
  say ""
  # Whatever was asked for is healthy by now (start_* waits or dies); others may be down on purpose.
  cmd_status || true
}

cmd_status() {
  local bad=0 replica
  satellite || find_pg_bin
  status_row COMPONENT ADDRESS STATE
  status_line postgres "$VPE_PG_HOST:$VPE_PG_PORT" postgres_healthy || bad=1
  for replica in $(executor_replicas); do
    status_line executor "$replica" replica_healthy "$replica" || bad=1
  done
  if [ "$OFFLINE_DEMO" = 1 ] && ! satellite; then
    status_line "open-meteo (SYNTHETIC)" "$CENTRAL:$VPE_OPEN_METEO_PORT" open_meteo_healthy || bad=1
    status_line "arcgis (demo layer)" "$CENTRAL:$VPE_ARCGIS_PORT" arcgis_healthy || bad=1
  fi
  status_line airflow-api "$(airflow_api)" airflow_healthy || bad=1
  local part
  satellite || for part in scheduler dag_processor triggerer; do
    status_line "airflow-${part/_/-}" "(reported by airflow-api)" airflow_part_healthy "$part" || bad=1
  done
  if celery_mode; then celery_status || bad=1; fi
  say ""
  replica=$(executor_replicas | sed -n 1p)
  executor_cli ping --host "${replica%:*}" --port "${replica##*:}" 2>/dev/null | sed 's/^/  /' || true
  [ "$OFFLINE_DEMO" = 0 ] || say "
OFFLINE DEMO: the weather is SYNTHETIC (local stand-in), loaded into the database $VPE_WAREHOUSE_DB.
To use the real archive API: ./bootstrap.sh down && ./bootstrap.sh"
  next_steps "$(airflow_password)"
  return $bad
}

# What to do next, under both modes' status tables.
next_steps() {
  cat <<EOF

Airflow UI     $(airflow_api)   (user admin, password $1)
Warehouse      ./bootstrap.sh psql
Trigger a DAG  ./bootstrap.sh airflow dags trigger ping_grpc
Logs           ./bootstrap.sh logs [postgres|executor|airflow]
Stop           ./bootstrap.sh down
EOF
}

status_row() { printf '%-22s %-30s %s\n' "$@"; }

status_line() {
  local name=$1 address=$2 state=healthy
  shift 2
  "$@" >/dev/null 2>&1 || state=unhealthy
  status_row "$name" "$address" "$state"
  [ "$state" = healthy ]
}

cmd_down() {
  local service airflow=()
  for service in "${AIRFLOW_SERVICES[@]}"; do airflow+=("airflow-$service"); done
  for service in $(celery_worker_names); do airflow+=("${service%@*}"); done
  # Airflow first: its running tasks are cancelled while the executor can still hear it.
  stop_groups "${airflow[@]}" celery-log-server
  stop_groups executor open-meteo arcgis redis
  satellite || stop_postgres
  say "stopped; data kept in $VPE_HOME"
}

cmd_psql() {
  find_pg_bin
  postgres_healthy || die "PostgreSQL is not running: ./bootstrap.sh up"
  exec "$PG_BIN/psql" -h "$PG_SOCKET" -p "$VPE_PG_PORT" -U "$PSQL_USER" -d "$VPE_WAREHOUSE_DB" "$@"
}

cmd_logs() {
  local components=("$@") component file
  [ $# -gt 0 ] || components=("${COMPONENTS[@]}")
  for component in "${components[@]}"; do
    for file in "$LOGS/$component"/*.log; do
      [ -f "$file" ] || continue
      say "==> $file <=="
      tail -n 40 "$file"
    done
  done
}

cmd_migrate() {
  find_pg_bin
  postgres_healthy || die "PostgreSQL is not running: ./bootstrap.sh up postgres"
  migrate
  say "applied ddl.sql and dml.sql to $VPE_WAREHOUSE_DB"
}

cmd_airflow() { exec "$VPE_VENV/bin/airflow" "$@"; }

cmd_executor() { exec "$VPE_VENV/bin/python" "$ROOT/executor.py" "$@"; }

# Runs the whole suite, or only the test files/nodes named in ARGS (pytest's own options pass through).
cmd_test() {
  ensure_venv "$ROOT/requirements-test.txt"
  cd "$ROOT"
  local arg
  for arg in "$@"; do
    [ -e "${arg%%::*}" ] && exec "$VPE_VENV/bin/python" -m pytest "$@"
  done
  exec "$VPE_VENV/bin/python" -m pytest tests "$@"
}

all_components() {
  local component
  for component in "$@"; do
    [[ " ${COMPONENTS[*]} celery-worker " == *" $component "* ]] || return 1
  done
}

# --- prerequisites -----------------------------------------------------------

require_python() {
  command -v python3 >/dev/null 2>&1 || die "python3 not found: install Python 3.11 or newer (Debian: apt-get install python3 python3-venv)."
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$(python3 --version) is too old: install Python 3.11 or newer."
  python3 -c 'import venv, ensurepip' 2>/dev/null \
    || die "python3 cannot create venvs: apt-get install python3-venv"
}

find_pg_bin() {
  local dir
  for dir in "$VPE_PG_BIN" /usr/lib/postgresql/15/bin "$(pg_config --bindir 2>/dev/null || true)"; do
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then PG_BIN=$dir; return; fi
  done
  die "PostgreSQL server binaries not found: apt-get install postgresql-15, or set VPE_PG_BIN to the folder holding initdb and pg_ctl."
}

# PostgreSQL refuses to run as root, so root runs it as the postgres account.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

pg_os_user() {
  if [ "$(id -u)" != 0 ]; then PG_OS_USER=$(id -un); return; fi
  PG_OS_USER=postgres
  id "$PG_OS_USER" >/dev/null 2>&1 || die "running as root needs a 'postgres' account to run PostgreSQL: install postgresql-15, or run bootstrap as a normal user."
  runuser -u "$PG_OS_USER" -- test -x "$VPE_HOME" \
    || die "the postgres account cannot reach $VPE_HOME (a parent folder is private): set VPE_HOME to a folder it can reach, e.g. VPE_HOME=/var/tmp/vpe ./bootstrap.sh"
}

# --- local state -------------------------------------------------------------

make_state_dirs() {
  mkdir -p "$VPE_HOME" "$PIDS" "$VPE_BUFFER" "$AIRFLOW_HOME" "$LOGS"/{postgres,executor,airflow} "$VPE_HOME/pg"
}

# Secrets are generated once and kept: the database passwords must survive re-runs.
# A key added by a newer version (the roles' passwords) is appended to an older file.
# Executor and worker hosts use the central host's file, copied: the same token and passwords.
ensure_secrets() {
  if satellite; then
    [ -s "$SECRETS" ] || die "this host needs the central host's secrets: copy its \$VPE_HOME/secrets.env to $SECRETS (scp, mode 600)"
  else
    make_secrets
  fi
  local line key
  while IFS= read -r line; do
    key=${line%%=*}
    [ -n "${!key+x}" ] || export "$line"
  done < "$SECRETS"
}

make_secrets() {
  ( umask 077; touch "$SECRETS" )
  add_secret VPE_PG_PASSWORD random_hex 24
  add_secret VPE_EXECUTOR_TOKEN random_hex 32
  add_secret AIRFLOW__API_AUTH__JWT_SECRET random_hex 32
  add_secret AIRFLOW__API__SECRET_KEY random_hex 32
  add_secret AIRFLOW__CORE__FERNET_KEY python3 -c 'import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'
  add_secret VPE_AIRFLOW_DB_PASSWORD random_hex 24
  add_secret VPE_LOADER_PASSWORD random_hex 24
  add_secret VPE_READER_PASSWORD random_hex 24
  add_secret VPE_EXECUTOR_DB_PASSWORD random_hex 24
  add_secret VPE_REDIS_PASSWORD random_hex 24
  add_secret VPE_AIRFLOW_ADMIN_PASSWORD random_hex 12
}

# KEY COMMAND...: appends KEY=<the command's output> unless KEY is there.
add_secret() {
  grep -q "^$1=" "$SECRETS" || say "$1=$("${@:2}")" >> "$SECRETS"
}

# The tasks load as vpe_loader: they may stage rows and call load_staging, nothing more.
export_warehouse_dsn() {
  export VPE_WAREHOUSE_DSN="postgresql://vpe_loader:$VPE_LOADER_PASSWORD@$VPE_PG_HOST:$VPE_PG_PORT/$VPE_WAREHOUSE_DB"
}

# The executor keeps its workspaces in the mode's warehouse database, as vpe_executor: every host reaches it.
export_workspace_store() {
  export VPE_EXECUTOR_WORKSPACE_STORE="postgresql://vpe_executor:$VPE_EXECUTOR_DB_PASSWORD@$VPE_PG_HOST:$VPE_PG_PORT/$VPE_WAREHOUSE_DB"
}

random_hex() { python3 -c "import secrets; print(secrets.token_hex($1))"; }

# Installs a requirements file only when it changed since its last install.
ensure_venv() {
  local file stamp want
  for file in "$ROOT/requirements.txt" "$@"; do
    stamp=$VPE_VENV/.vpe-installed-$(basename "$file")
    want=$(sha256sum < "$file" | cut -d' ' -f1)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && continue
    if [ ! -x "$VPE_VENV/bin/python" ]; then
      require_python
      step "creating the Python venv $VPE_VENV"
      python3 -m venv "$VPE_VENV"
    fi
    [ -x "$VPE_VENV/bin/uv" ] || "$VPE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check uv \
      || die "installing uv into $VPE_VENV failed (see above); PyPI must be reachable."
    step "installing $(basename "$file") into $VPE_VENV (the first time takes a minute)"
    "$VPE_VENV/bin/uv" pip install --quiet --python "$VPE_VENV/bin/python" -r "$file" \
      || die "installing $file failed (see above); PyPI must be reachable."
    say "$want" > "$stamp"
  done
  ensure_package
}

# The repo itself, installed editable (pyproject.toml): Airflow imports the operator from the vpe
# package, whose vpe.executor is this checkout's executor.py. Reinstalled when what the install
# records changes: the build files or the version.
ensure_package() {
  local stamp=$VPE_VENV/.vpe-installed-package want
  want=$(cat "$ROOT/pyproject.toml" "$ROOT/hatch_build.py" <(grep '^__version__' "$ROOT/executor.py") | sha256sum | cut -d' ' -f1)
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
  step "installing this checkout as the package vpe-executor into $VPE_VENV (editable)"
  "$VPE_VENV/bin/uv" pip install --quiet --python "$VPE_VENV/bin/python" -e "$ROOT[airflow]" \
    || die "installing $ROOT as a package failed (see above); PyPI must be reachable for its build backend (hatchling)."
  say "$want" > "$stamp"
}

pidfile() { say "$PIDS/$1.pid"; }

# Alive and still the process we started (pid files outlive reboots).
running() {
  local file pid
  file=$(pidfile "$1")
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -Eq -- "$2"
}

# Each process gets its own session, so `down` can stop it with all its children.
spawn() {
  local name=$1 log=$2; shift 2
  # fd 9 is bootstrap's lock: a server that inherited it would hold it forever.
  setsid "$@" >> "$log" 2>&1 < /dev/null 9>&- &
  say $! > "$(pidfile "$name")"
}

# TERM to every named process group at once, KILL to whatever is left after 15 s.
stop_groups() {
  local name file pids=() pid i
  for name in "$@"; do
    file=$(pidfile "$name")
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    kill -TERM -- "-$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$file"
  done
  for i in $(seq 1 150); do
    any_group_alive "${pids[@]}" || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}

any_group_alive() {
  local pid
  for pid in "$@"; do ps -o pid= -g "$pid" >/dev/null 2>&1 && return 0; done
  return 1
}

# Prints the body of a 2xx answer, fails otherwise (python3 is a prerequisite anyway; curl is not).
http_get() {
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())' "$1" 2>/dev/null
}

wait_for() {
  local what=$1 seconds=$2 log=$3; shift 3
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what did not become healthy within ${seconds}s; its log: $log (./bootstrap.sh logs)"
    sleep 0.5
  done
}

# --- postgres ----------------------------------------------------------------

psql_super() {
  "$PG_BIN/psql" -X -q -h "$PG_SOCKET" -p "$VPE_PG_PORT" -U "$VPE_PG_USER" -v ON_ERROR_STOP=1 "$@"
}

# Another host only sees whether the central host's PostgreSQL takes connections (it may lack pg_isready).
postgres_healthy() {
  if satellite; then ! port_free "$VPE_PG_HOST" "$VPE_PG_PORT"; return; fi
  "$PG_BIN/pg_isready" -q -h "$PG_SOCKET" -p "$VPE_PG_PORT"
}

init_cluster() {
  [ -s "$PG_DATA/PG_VERSION" ] && return
  step "creating the PostgreSQL cluster in $PG_DATA"
  mkdir -p "$PG_DATA" "$PG_SOCKET"
  chown "$PG_OS_USER" "$VPE_HOME/pg" "$PG_DATA" "$PG_SOCKET"
  chmod 0700 "$PG_DATA" "$PG_SOCKET"
  local pwfile=$VPE_HOME/pg/.pwfile
  ( umask 077; say "$VPE_PG_PASSWORD" > "$pwfile" )
  chown "$PG_OS_USER" "$pwfile"
  # Sockets trust only who can enter the 0700 socket folder; TCP needs the password.
  as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$VPE_PG_USER" -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 --pwfile="$pwfile" > "$LOGS/postgres/initdb.log" 2>&1 \
    || { rm -f "$pwfile"; die "initdb failed; see $LOGS/postgres/initdb.log"; }
  rm -f "$pwfile"
}

start_postgres() {
  find_pg_bin
  pg_os_user
  # Everything else runs as the caller; only PostgreSQL's log folder belongs to its account.
  chown "$PG_OS_USER" "$LOGS/postgres"
  init_cluster
  allow_other_hosts
  if as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    say "postgres   already running"
  else
    port_free "$VPE_PG_HOST" "$VPE_PG_PORT" || die "port $VPE_PG_PORT is taken by another program: set VPE_PG_PORT in .env or the environment."
    step "starting PostgreSQL on $VPE_PG_HOST:$VPE_PG_PORT"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$LOGS/postgres/postgres.log" -w -t 60 \
      -o "-p $VPE_PG_PORT -k $PG_SOCKET -c listen_addresses=$VPE_PG_HOST ${VPE_PG_OPTIONS:-}" start >/dev/null 9>&- \
      || die "PostgreSQL did not start; see $LOGS/postgres/postgres.log"
  fi
  wait_for PostgreSQL 30 "$LOGS/postgres/postgres.log" postgres_healthy
  ensure_login_roles
  ensure_database "$VPE_WAREHOUSE_DB"
  ensure_airflow_database
  migrate
}

# The roles the components log in as, with the passwords of $SECRETS. ddl.sql grants the
# warehouse roles their rights (docker-compose.yml's airflow-init does the same in compose mode).
ensure_login_roles() {
  psql_super -d postgres -v airflow="$VPE_AIRFLOW_DB_PASSWORD" -v loader="$VPE_LOADER_PASSWORD" \
    -v reader="$VPE_READER_PASSWORD" -v executor="$VPE_EXECUTOR_DB_PASSWORD" <<'SQL'
SELECT format('%s ROLE %I LOGIN PASSWORD %L', CASE WHEN r.rolname IS NULL THEN 'CREATE' ELSE 'ALTER' END,
              w.name, w.password)
FROM (VALUES ('airflow', :'airflow'), ('vpe_loader', :'loader'), ('vpe_reader', :'reader'),
             ('vpe_executor', :'executor')) AS w(name, password)
LEFT JOIN pg_roles r ON r.rolname = w.name \gexec
SQL
}

# Airflow's metadata belongs to the airflow role, and only it (and the superuser) may connect.
# Tables an older version created as the superuser are handed over; a column's own sequence
# follows its table.
ensure_airflow_database() {
  ensure_database "$VPE_AIRFLOW_DB"
  psql_super -d "$VPE_AIRFLOW_DB" <<'SQL'
SELECT format('ALTER DATABASE %I OWNER TO airflow', current_database()) \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database()) \gexec
SELECT format('ALTER %s %s OWNER TO airflow',
              CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             ELSE 'TABLE' END, c.oid::regclass)
FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
  AND c.relowner <> 'airflow'::regrole
  AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                       AND d.objid = c.oid AND d.deptype IN ('a', 'i'))) \gexec
SQL
}

# Several hosts: the hosts on this host's networks log in with a password, like local TCP clients; the address
# they use is listen_addresses (VPE_PG_HOST, set from VPE_LISTEN_ADDRESS). A running server rereads the file.
allow_other_hosts() {
  serves_others || return 0
  local line="host all all samenet scram-sha-256  # VPE_LISTEN_ADDRESS: executor and worker hosts"
  grep -qxF "$line" "$PG_DATA/pg_hba.conf" && return
  say "$line" >> "$PG_DATA/pg_hba.conf"
  if as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" reload >/dev/null; fi
}

port_free() {
  ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

ensure_database() {
  [ "$(psql_super -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$1'")" = 1 ] \
    || psql_super -d postgres -c "CREATE DATABASE \"$1\""
}

# ddl.sql and dml.sql are written to be re-applied: this never drops data.
migrate() {
  local file
  for file in ddl.sql dml.sql; do
    psql_super -d "$VPE_WAREHOUSE_DB" -f "$ROOT/$file" > "$LOGS/postgres/migrate.log" 2>&1 \
      || die "applying $file to $VPE_WAREHOUSE_DB failed: $(tail -n 3 "$LOGS/postgres/migrate.log")"
  done
}

stop_postgres() {
  find_pg_bin
  pg_os_user
  [ -s "$PG_DATA/PG_VERSION" ] || return 0
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1 || return 0
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
}

# --- executor ----------------------------------------------------------------

executor_cli() { "$VPE_VENV/bin/python" "$ROOT/executor.py" "$@"; }

executor_healthy() { executor_cli ping >/dev/null 2>&1; }

replica_healthy() { executor_cli ping --host "${1%:*}" --port "${1##*:}" >/dev/null 2>&1; }

# host:port of each replica VPE_EXECUTOR_TARGET names, one a line.
executor_replicas() {
  "$VPE_VENV/bin/python" -c 'import sys; from vpe.executor import replica_targets; print(*replica_targets(sys.argv[1]), sep="\n")' \
    "$EXECUTOR_TARGET"
}

# Whether one of the replicas Airflow uses is this host's (not so when VPE_EXECUTOR_TARGET names only others).
# The list is read whole first: `grep -q` on the pipe would end it early, and pipefail would count that as "no".
executor_here() {
  local replicas
  replicas=$(executor_replicas) || die "VPE_EXECUTOR_TARGET=$EXECUTOR_TARGET: not an address list (see above)"
  grep -qxF "$VPE_EXECUTOR_HOST:$VPE_EXECUTOR_PORT" <<< "$replicas"
}

start_executor() {
  if ! executor_here; then
    say "executor   none here: Airflow uses the replicas of VPE_EXECUTOR_TARGET=$EXECUTOR_TARGET"
    return
  fi
  if running executor "executor.py serve"; then
    say "executor   already running"
  else
    port_free "$VPE_EXECUTOR_HOST" "$VPE_EXECUTOR_PORT" || die "port $VPE_EXECUTOR_PORT is taken by another program: set VPE_EXECUTOR_PORT in .env or the environment."
    step "starting the executor on $VPE_EXECUTOR_HOST:$VPE_EXECUTOR_PORT"
    spawn executor "$LOGS/executor/executor.log" "$VPE_VENV/bin/python" "$ROOT/executor.py" serve
  fi
  wait_for executor 60 "$LOGS/executor/executor.log" executor_healthy
}

# --- airflow -----------------------------------------------------------------

# What both modes share comes from airflow.env (compose's env_file); below, what is local mode's own.
airflow_env() {
  local api="http://$VPE_AIRFLOW_HOST:$VPE_AIRFLOW_PORT"
  read_env_file "$ROOT/airflow.env"
  export AIRFLOW__CORE__DAGS_FOLDER=$VPE_DAGS_DIR
  export AIRFLOW__CORE__EXECUTOR=$VPE_AIRFLOW_EXECUTOR
  if celery_mode; then
    export AIRFLOW__CELERY__BROKER_URL="redis://:$VPE_REDIS_PASSWORD@$CENTRAL:$VPE_REDIS_PORT/0"
    export AIRFLOW__CELERY__RESULT_BACKEND="db+postgresql://airflow:$VPE_AIRFLOW_DB_PASSWORD@$VPE_PG_HOST:$VPE_PG_PORT/$VPE_AIRFLOW_DB"
    export AIRFLOW__CELERY__WORKER_CONCURRENCY=$VPE_AIRFLOW_PARALLELISM
    # Several people share a Celery setup: real users and roles, not the simple auth manager (for development only).
    export AIRFLOW__CORE__AUTH_MANAGER=airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager
  fi
  export AIRFLOW__CORE__PARALLELISM=$VPE_AIRFLOW_PARALLELISM
  export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=$api/execution/
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="postgresql+psycopg2://airflow:$VPE_AIRFLOW_DB_PASSWORD@$VPE_PG_HOST:$VPE_PG_PORT/$VPE_AIRFLOW_DB"
  export AIRFLOW__API__HOST=$VPE_AIRFLOW_HOST
  export AIRFLOW__API__PORT=$VPE_AIRFLOW_PORT
  export AIRFLOW__API__BASE_URL=$api
  export AIRFLOW__LOGGING__BASE_LOG_FOLDER=$LOGS/airflow
  # A task instance records where it ran; the api-server fetches its log from there (a worker host's log server).
  export AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=$VPE_WORKER_LOG_PORT
  ! serves_others || export AIRFLOW__CORE__HOSTNAME_CALLABLE=vpe.hosts.listen_address
  export AIRFLOW_CONN_GRPC_DEFAULT
  AIRFLOW_CONN_GRPC_DEFAULT=$(grpc_connection_json)
}

# The connection Airflow uses to reach the executor (VPE_EXECUTOR_TARGET, whole, as its host); its password
# is the executor's token.
grpc_connection_json() {
  printf '{"conn_type": "vpe_executor", "host": "%s", "password": "%s"}' "$EXECUTOR_TARGET" "$VPE_EXECUTOR_TOKEN"
}

airflow_api() { say "http://$VPE_AIRFLOW_HOST:$VPE_AIRFLOW_PORT"; }

airflow_healthy() { http_get "$(airflow_api)/api/v2/monitor/health"; }

# One of the parts the api-server's health endpoint reports on: scheduler, triggerer, dag_processor.
airflow_part_healthy() {
  airflow_healthy | python3 -c 'import json, sys; sys.exit(json.load(sys.stdin)[sys.argv[1]]["status"] != "healthy")' "$1"
}

start_airflow() {
  local service missing=()
  if celery_mode; then start_redis; fi
  for service in "${AIRFLOW_SERVICES[@]}"; do
    running "airflow-$service" "airflow ${service/-/[-_]}" || missing+=("$service")
  done
  if [ ${#missing[@]} = 0 ]; then
    say "airflow    already running"
  else
    running airflow-api-server "airflow api[-_]server" || port_free "$VPE_AIRFLOW_HOST" "$VPE_AIRFLOW_PORT" \
      || die "port $VPE_AIRFLOW_PORT is taken by another program: set VPE_AIRFLOW_PORT in .env or the environment."
    step "migrating Airflow's metadata database"
    "$VPE_VENV/bin/airflow" db migrate > "$LOGS/airflow/db-migrate.log" 2>&1 \
      || die "airflow db migrate failed; see $LOGS/airflow/db-migrate.log"
    if celery_mode; then ensure_fab_admin; fi
    for service in "${missing[@]}"; do
      step "starting airflow $service"
      spawn "airflow-$service" "$LOGS/airflow/$service.log" "$VPE_VENV/bin/airflow" "$service" $(airflow_flags "$service")
    done
  fi
  wait_for "Airflow's api-server" 120 "$LOGS/airflow/api-server.log" airflow_healthy
  if celery_mode; then start_celery_workers; fi
}

# Airflow's log servers bind every interface; workers here share the log folder
# with the api-server, so they are not needed and nothing listens beyond loopback
# (a worker host starts one of its own on its address: start_log_server).
airflow_flags() {
  case "$1" in scheduler|triggerer) say --skip-serve-logs ;; esac
}

# FAB's admin (Celery) has the password of the secrets file; the simple auth manager generates its own.
airflow_password() {
  if celery_mode; then say "$VPE_AIRFLOW_ADMIN_PASSWORD"; return; fi
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["admin"])' \
    "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated" 2>/dev/null || say "(not generated yet)"
}

# The FAB auth manager's first user: admin (role Admin), password VPE_AIRFLOW_ADMIN_PASSWORD from the secrets file.
ensure_fab_admin() {
  "$VPE_VENV/bin/airflow" fab-db migrate >> "$LOGS/airflow/db-migrate.log" 2>&1 \
    || die "airflow fab-db migrate failed; see $LOGS/airflow/db-migrate.log"
  "$VPE_VENV/bin/airflow" users list -o plain 2>/dev/null | grep -qw admin && return
  "$VPE_VENV/bin/airflow" users create --username admin --password "$VPE_AIRFLOW_ADMIN_PASSWORD" --role Admin \
    --firstname VPE --lastname Admin --email admin@localhost >> "$LOGS/airflow/db-migrate.log" 2>&1 \
    || die "creating Airflow's admin user failed; see $LOGS/airflow/db-migrate.log"
}

# --- celery (local mode) -------------------------------------------------------
# Airflow's CeleryExecutor: the scheduler queues task instances in Redis, `airflow celery worker`
# processes run them. Workers here share the log folder with the api-server, so like the scheduler
# they serve no logs (a log server binds every interface).

# Named after this host's address when it has one for the others: hosts may share a host name (namespaces).
celery_worker_names() {
  celery_mode || return 0
  local i host
  host=$(serves_others && say "$VPE_LISTEN_ADDRESS" || hostname)
  for i in $(seq 1 "$VPE_CELERY_WORKERS"); do say "celery-worker-$i@$host"; done
}

# Redis and this host's workers; on the central host also the workers other hosts run.
celery_status() {
  local bad=0 replies worker
  status_line redis "$CENTRAL:$VPE_REDIS_PORT" redis_healthy || bad=1
  replies=$(celery_workers_answering)
  for worker in $(celery_worker_names); do
    status_row "airflow-celery-worker" "$worker" "$(grep -qx "$worker" <<< "$replies" && say healthy || say unhealthy)"
    grep -qx "$worker" <<< "$replies" || bad=1
  done
  if satellite && serves_others; then
    status_line "airflow-log-server" "$VPE_LISTEN_ADDRESS:$VPE_WORKER_LOG_PORT" log_server_healthy || bad=1
  elif ! satellite; then
    for worker in $(grep -vxF "$(celery_worker_names)" <<< "$replies"); do
      status_row "airflow-celery-worker" "$worker" "healthy (another host)"
    done
  fi
  return $bad
}

redis_running() { running redis "redis-server"; }

redis_cli() { REDISCLI_AUTH=$VPE_REDIS_PASSWORD redis-cli -h "$CENTRAL" -p "$VPE_REDIS_PORT" "$@"; }

redis_healthy() { [ "$(redis_cli ping 2>/dev/null)" = PONG ]; }

# Its password stays out of `ps`: Redis reads it from a private config file.
start_redis() {
  command -v redis-server >/dev/null 2>&1 \
    || die "CeleryExecutor needs Redis: apt-get install redis-server (or run without --celery)."
  if redis_running; then
    say "redis      already running"
  else
    port_free "$CENTRAL" "$VPE_REDIS_PORT" || die "port $VPE_REDIS_PORT is taken by another program: set VPE_REDIS_PORT in .env or the environment."
    mkdir -p "$VPE_HOME/redis" "$LOGS/redis"
    ( umask 077; printf 'bind %s\nport %s\nrequirepass %s\ndir %s\nprotected-mode yes\n' \
        "$CENTRAL" "$VPE_REDIS_PORT" "$VPE_REDIS_PASSWORD" "$VPE_HOME/redis" > "$VPE_HOME/redis/redis.conf" )
    step "starting Redis on $CENTRAL:$VPE_REDIS_PORT (Celery's broker)"
    spawn redis "$LOGS/redis/redis.log" redis-server "$VPE_HOME/redis/redis.conf"
  fi
  wait_for Redis 30 "$LOGS/redis/redis.log" redis_healthy
}

start_celery_workers() {
  local name
  for name in $(celery_worker_names); do
    if running "${name%@*}" "airflow celery worker"; then
      say "${name%@*} already running"
    else
      step "starting airflow celery worker ${name%@*}"
      spawn "${name%@*}" "$LOGS/airflow/${name%@*}.log" "$VPE_VENV/bin/airflow" celery worker \
        --celery-hostname "$name" --concurrency "$VPE_AIRFLOW_PARALLELISM" --skip-serve-logs
    fi
  done
  wait_for "Airflow's Celery workers" 120 "$LOGS/airflow" all_celery_workers_answer
}

# `up celery-worker` on a worker host: its workers, and the server the api-server fetches their task logs from.
start_celery_worker() {
  celery_mode || die "Celery workers run under the CeleryExecutor: ./bootstrap.sh --celery up celery-worker"
  ! serves_others || start_log_server
  start_celery_workers
}

log_server_healthy() { ! port_free "$VPE_LISTEN_ADDRESS" "$VPE_WORKER_LOG_PORT"; }

# Airflow's worker log server (what `airflow celery worker` would start on every interface), on this host's
# address only; it accepts the api-server's requests signed with the secrets file's key.
start_log_server() {
  if running celery-log-server "serve_logs"; then
    say "log server already running"
  else
    port_free "$VPE_LISTEN_ADDRESS" "$VPE_WORKER_LOG_PORT" || die "port $VPE_WORKER_LOG_PORT is taken by another program: set VPE_WORKER_LOG_PORT in .env or the environment (on every host)."
    step "starting Airflow's task-log server on $VPE_LISTEN_ADDRESS:$VPE_WORKER_LOG_PORT"
    spawn celery-log-server "$LOGS/airflow/log-server.log" "$VPE_VENV/bin/python" -m uvicorn --factory \
      airflow.utils.serve_logs.log_server:get_app --host "$VPE_LISTEN_ADDRESS" --port "$VPE_WORKER_LOG_PORT"
  fi
  wait_for "the task-log server" 60 "$LOGS/airflow/log-server.log" log_server_healthy
}

# The names of the workers that answer a ping through the broker, one a line.
celery_workers_answering() {
  "$VPE_VENV/bin/celery" --app airflow.providers.celery.executors.celery_executor.app inspect ping \
    --timeout 2 --json 2>/dev/null | python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)))' 2>/dev/null || true
}

all_celery_workers_answer() {
  local replies worker
  replies=$(celery_workers_answering)
  for worker in $(celery_worker_names); do grep -qx "$worker" <<< "$replies" || return 1; done
}

# --- several hosts (local mode) ------------------------------------------------
# The central host serves PostgreSQL, Redis, the api-server and the demo stand-ins on VPE_LISTEN_ADDRESS; an
# executor or worker host reaches them at VPE_CENTRAL_HOST and serves its own part on its VPE_LISTEN_ADDRESS.
# With both at their defaults everything stays on 127.0.0.1.

several_hosts_addresses() {
  CENTRAL=${VPE_CENTRAL_HOST:-$VPE_LISTEN_ADDRESS}
  ! serves_others || export VPE_EXECUTOR_HOST=$VPE_LISTEN_ADDRESS
  [ "$CENTRAL" = 127.0.0.1 ] || export VPE_PG_HOST=$CENTRAL VPE_AIRFLOW_HOST=$CENTRAL
  # Not exported: the test suite's stacks, started from `./bootstrap.sh test`, pick their own ports.
  EXECUTOR_TARGET=${VPE_EXECUTOR_TARGET:-$VPE_EXECUTOR_HOST:$VPE_EXECUTOR_PORT}
}

# An executor or worker host: the central host's services are elsewhere.
satellite() { [ -n "$VPE_CENTRAL_HOST" ]; }

serves_others() { [ "$VPE_LISTEN_ADDRESS" != 127.0.0.1 ]; }

# --- offline demo --------------------------------------------------------------

# Synthetic weather from the local Open-Meteo stand-in, loaded into a database of
# its own, so demo values never mix with real ones in the warehouse; `live` catalog
# reads go to the ArcGIS stand-in. The demo lasts while its servers run:
# ./bootstrap.sh down ends it.
enter_offline_demo() {
  OFFLINE_DEMO=1
  export VPE_WAREHOUSE_DB=$VPE_DEMO_WAREHOUSE_DB
  export OPEN_METEO_ARCHIVE_URL=http://$CENTRAL:$VPE_OPEN_METEO_PORT/v1/archive
  export VPE_GLC_LAYER_URL=http://$CENTRAL:$VPE_ARCGIS_PORT/arcgis/rest/services/Landslides/COOLR_Reports_Points/FeatureServer/0
  export VPE_ALLOW_SYNTHETIC_WEATHER=1
  export VPE_TASK_ENV_PASSTHROUGH="VPE_WAREHOUSE_DSN OPEN_METEO_ARCHIVE_URL OPEN_METEO_API_KEY VPE_GLC_LAYER_URL VPE_ALLOW_SYNTHETIC_WEATHER"
}

open_meteo_running() { running open-meteo "open_meteo_server.py"; }

open_meteo_healthy() { http_get "http://$CENTRAL:$VPE_OPEN_METEO_PORT/stats"; }

start_open_meteo() {
  # shellcheck disable=SC2086 # options, split into words
  start_standin open-meteo "SYNTHETIC weather" VPE_OPEN_METEO_PORT open_meteo_server.py "the Open-Meteo stand-in" \
    $VPE_OPEN_METEO_ARGS
}

arcgis_healthy() { http_get "http://$CENTRAL:$VPE_ARCGIS_PORT/stats"; }

start_arcgis() {
  start_standin arcgis "demo landslide reports" VPE_ARCGIS_PORT arcgis_server.py "the ArcGIS layer stand-in" \
    --catalog "$(absolute "$VPE_ARCGIS_CATALOG")"
}

# A local stand-in of a web API (tasks/ingestion/SCRIPT, extra args after TITLE), healthy once /stats answers.
start_standin() {
  local name=$1 what=$2 port_var=$3 script=$4 title=$5; shift 5
  local port=${!port_var}
  if running "$name" "$script"; then
    say "$name already running ($what)"
  else
    port_free "$CENTRAL" "$port" || die "port $port is taken by another program: set $port_var in .env or the environment."
    step "starting $title on $CENTRAL:$port ($what)"
    spawn "$name" "$LOGS/executor/$name.log" "$VPE_VENV/bin/python" "$ROOT/tasks/ingestion/$script" "$@" \
      --host "$CENTRAL" --port "$port" --quiet
  fi
  wait_for "$title" 30 "$LOGS/executor/$name.log" http_get "http://$CENTRAL:$port/stats"
}

# --- compose mode ------------------------------------------------------------
# The same commands against the docker compose stack in docker-compose.yml. Compose reads the
# committed defaults from .env and the secrets from $SECRETS (git-ignored, made once by ensure_secrets);
# its Airflow services also get airflow.env (env_file).

AIRFLOW_COMPOSE_SERVICES=(airflow-api-server airflow-scheduler airflow-dag-processor airflow-triggerer)

compose() {
  docker compose --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" \
    --env-file "$ROOT/.env" --env-file "$SECRETS" "$@"
}

# The celery profile (Redis + workers) comes with Airflow's CeleryExecutor.
celery_mode() { [ "${VPE_AIRFLOW_EXECUTOR:-LocalExecutor}" = CeleryExecutor ]; }

compose_profiles() { celery_mode && say "--profile celery" || true; }

# docker-compose.yml interpolates the secrets; AIRFLOW_UID owns what Airflow writes.
compose_env() {
  command -v docker >/dev/null 2>&1 || die "docker not found: install Docker Engine with the compose plugin, or run ./bootstrap.sh --local"
  local version
  version=$(docker compose version 2>/dev/null) || die "'docker compose' is missing: install the Docker Compose plugin (Debian: apt-get install docker-compose-plugin), or run ./bootstrap.sh --local"
  compose_at_least_2_17 "$version" || die "$version is too old: bootstrap needs Docker Compose 2.17 or newer (up --wait-timeout); update the Docker Compose plugin, or run ./bootstrap.sh --local"
  mkdir -p "$VPE_HOME"
  ensure_secrets
  if ! grep -q '^AIRFLOW_UID=' "$SECRETS"; then
    # Root's files would be root's: run Airflow as the image's own user instead.
    local uid; uid=$(id -u); [ "$uid" != 0 ] || uid=50000
    say "AIRFLOW_UID=$uid" >> "$SECRETS"
  fi
  [ -n "${AIRFLOW_UID:-}" ] || export "$(grep '^AIRFLOW_UID=' "$SECRETS")"
}

# "Docker Compose version v2.29.0" -> whether that is 2.17 or newer.
compose_at_least_2_17() {
  [[ "$1" =~ ([0-9]+)\.([0-9]+) ]] || return 1
  local major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
  [ "$major" -gt 2 ] || { [ "$major" = 2 ] && [ "$minor" -ge 17 ]; }
}

# COMPONENT (postgres, executor, airflow) -> its compose services.
compose_services() {
  case "$1" in
    airflow) say airflow-init "${AIRFLOW_COMPOSE_SERVICES[@]}"; celery_mode && say airflow-worker || true ;;
    *) say "$1" ;;
  esac
}

# One line per container: service, name, state, health ("-" without a healthcheck), exit code.
compose_containers() {
  compose $(compose_profiles) ps --all --format json | python3 -c '
import json, sys
text = sys.stdin.read().strip()
# One JSON object per line; compose before 2.21 printed one JSON array.
rows = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
for row in rows:
    print(row["Service"], row["Name"], row["State"], row.get("Health") or "-", row.get("ExitCode", 0), sep="\t")'
}

tty_flag() { [ -t 0 ] && [ -t 1 ] || say -T; }

compose_up() {
  local services=() component
  for component in "$@"; do services+=($(compose_services "$component")); done
  compose_env
  step "building and starting the compose stack, then waiting until every container is healthy (the first build takes several minutes)"
  # --wait waits until each service is healthy (running, without a healthcheck) and fails on one that turns
  # unhealthy or exits. The one-shot airflow-init is no exception: every service it is started with depends on
  # it with service_completed_successfully, and for such a service --wait waits for an exit 0 instead
  # (compose's getDependencyCondition, docker/compose#9572, compose 2.7). An init container nothing depends on
  # that way would fail --wait when it exits 0 (docker/compose#10596); tests/test_compose.py checks ours is not one.
  compose $(compose_profiles) up --detach --build --wait --wait-timeout "${VPE_COMPOSE_WAIT:-600}" "${services[@]}" \
    || die "docker compose up --wait failed (above: a build error, a container that exited or turned unhealthy, or ${VPE_COMPOSE_WAIT:-600}s passed); ./bootstrap.sh status, ./bootstrap.sh logs"
  compose_apply_schema
  say ""
  compose_status || true
}

# A fresh volume got the schema from /docker-entrypoint-initdb.d; this brings older volumes up to date.
compose_apply_schema() {
  local file
  for file in ddl.sql dml.sql; do
    compose exec -T postgres psql -X -q -v ON_ERROR_STOP=1 -U "$VPE_PG_USER" -d "$VPE_WAREHOUSE_DB" -f - < "$ROOT/$file" \
      || die "applying $file to $VPE_WAREHOUSE_DB failed (see above)"
  done
}

compose_migrate() {
  compose_env
  compose_apply_schema
  say "applied ddl.sql and dml.sql to $VPE_WAREHOUSE_DB"
}

compose_status() {
  compose_env
  local bad=0 service name state health code seen=" "
  status_row COMPONENT ADDRESS STATE
  while IFS=$'\t' read -r service name state health code; do
    seen+="$service "
    [ "$service" = airflow-init ] && [ "$state" = exited ] && [ "$code" = 0 ] && continue
    [ "$health" = - ] || state=$health
    [ "$state" = healthy ] || [ "$state" = running ] || bad=1
    status_row "$name" "$(compose_address "$service")" "$state"
  done < <(compose_containers)
  for service in postgres executor "${AIRFLOW_COMPOSE_SERVICES[@]}"; do
    [[ "$seen" == *" $service "* ]] || { status_row "$service" "$(compose_address "$service")" "not running"; bad=1; }
  done
  say ""
  compose exec -T executor python executor.py ping --host 127.0.0.1 2>/dev/null | sed 's/^/  /' || true
  next_steps "$VPE_AIRFLOW_ADMIN_PASSWORD"
  say "Scale out      docker compose --env-file .env --env-file ${SECRETS#"$ROOT"/} up -d --scale executor=3"
  return $bad
}

compose_address() {
  case "$1" in
    postgres) say "$VPE_PG_HOST:$VPE_PG_PORT" ;;
    executor) say "executor:$VPE_EXECUTOR_PORT (compose network)" ;;
    airflow-api-server) airflow_api ;;
    *) say "-" ;;
  esac
}

compose_down() {
  compose_env
  # Every profile, so celery's containers stop too; volumes (the data) stay.
  compose --profile celery down
  say "stopped; data kept in the compose volumes (docker compose down --volumes deletes it)"
}

compose_psql() {
  compose_env
  compose exec $(tty_flag) postgres psql -U "$PSQL_USER" -d "$VPE_WAREHOUSE_DB" "$@"
}

compose_logs() {
  local services=() component
  for component in "$@"; do services+=($(compose_services "$component")); done
  compose_env
  compose $(compose_profiles) logs --tail 40 "${services[@]}"
}

compose_airflow() {
  compose_env
  compose exec $(tty_flag) airflow-scheduler airflow "$@"
}

compose_executor() {
  compose_env
  compose exec $(tty_flag) executor python executor.py "$@"
}

# --- end of compose mode -----------------------------------------------------

main "$@"
