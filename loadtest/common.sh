# loadtest/common.sh — what loadtest/compare, loadtest/soak and loadtest/ab share:
# processes stopped by PID, packages, the build, a private PostgreSQL cluster run
# as the postgres user when root, free ports, waiting for HTTP, seeding, reading
# gavel's memory and metrics.
# Sourced, not run. The sourcing script sets script_name (for messages), here (the
# loadtest directory), build (0 with --no-build), gavel_bin and loadtest_bin, and,
# before start_postgres, tmp (its temporary directory) and pg_max_connections.
# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034 # variables shared with the sourcing script

log() { printf '==> %s\n' "$*" >&2; }

die() {
    printf '%s: %s\n' "$script_name" "$*" >&2
    exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

# Waits up to $2 seconds for process $1 to exit.
wait_exit() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# Stops a process we started: SIGTERM, then SIGKILL (with its children, found by
# parent PID) if it outlives its grace period.
stop_pid() {
    local pid=$1 grace=$2 what=$3 children
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_exit "$pid" "$grace"; then
        echo "$script_name: $what did not stop within ${grace}s; killing it" >&2
        children=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
        # shellcheck disable=SC2086 # a list of PIDs
        kill -KILL "$pid" $children 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        die "installing packages needs root (or password-less sudo): $*"
    fi
}

apt_updated=0
apt_install() {
    if ((!apt_updated)); then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        apt_updated=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# What the scripts seed through gavel-loadtest seed, the sizes its scenarios
# default to.
seed_auctions=1000
seed_skus=1000
seed_bidders=16

# install_tools [PACKAGE…]: PostgreSQL's server binaries, jq and curl, and the
# Debian packages named, installed when missing; sets pg_bin. As root, PostgreSQL
# refuses to run: it runs as the postgres system user, which Debian's package creates.
install_tools() {
    local packages=("$@")
    [[ -n $(find_pg_bin) ]] || packages+=(postgresql-15)
    command -v jq >/dev/null || packages+=(jq)
    command -v curl >/dev/null || packages+=(curl)
    if ((${#packages[@]})); then
        apt_install "${packages[@]}"
    fi
    pg_bin=$(find_pg_bin)
    [[ -n $pg_bin ]] || die "PostgreSQL server binaries not found (looked at pg_config --bindir and /usr/lib/postgresql/*/bin)"
    if is_root && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    fi
}

# build_binaries [BINARY…]: builds gavel and gavel-loadtest (unless --no-build, and
# recording how long in build_secs), then checks that gavel_bin, loadtest_bin and
# each BINARY named are there.
build_binaries() {
    if ((build)); then
        log "cargo build --release --locked -p gavel -p gavel-loadtest"
        local t0=$SECONDS
        (cd "$here/.." && cargo build --release --locked -p gavel -p gavel-loadtest)
        build_secs=$((SECONDS - t0))
    else
        build_secs=null
    fi
    local bin
    for bin in "$gavel_bin" "$loadtest_bin" "$@"; do
        [[ -x $bin ]] || die "$bin is missing (build it, or drop --no-build)"
    done
}

# seed_data URL LOG: the seeded seller's auctions, the skus and the bidders, through
# the gavel at URL; gavel-loadtest's output appended to LOG.
seed_data() {
    log "seed: $seed_auctions auctions, $seed_skus skus, $seed_bidders bidders"
    timeout 300 "$loadtest_bin" seed --target "$1" --auctions "$seed_auctions" \
        --skus "$seed_skus" --bidders "$seed_bidders" >>"$2" 2>&1 || die "gavel-loadtest seed failed"
}

# The newest directory holding PostgreSQL's server binaries: pg_config's, if it has
# them, else the newest of Debian's /usr/lib/postgresql/*/bin.
find_pg_bin() {
    local dir
    if command -v pg_config >/dev/null; then
        dir=$(pg_config --bindir 2>/dev/null || true)
        if [[ -n $dir && -x $dir/postgres && -x $dir/pgbench ]]; then
            echo "$dir"
            return
        fi
    fi
    for dir in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
        if [[ -x $dir/postgres && -x $dir/pgbench ]]; then
            echo "$dir"
            return
        fi
    done
}

# Runs a PostgreSQL server command (initdb, pg_ctl) as the user that owns the cluster,
# from a directory that user may enter.
as_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# A TCP port nobody listens on or talks from, among the ones not handed out yet,
# below the kernel's range of ephemeral ports: a port in that range may be taken
# as the source of any new connection between the check and the server's bind
# (it happened, to the second gavel of loadtest/ab). Reads /proc (no extra tools);
# a port appearing anywhere in /proc/net/tcp* is skipped.
taken_ports=" "
free_port() {
    local port hex low=32768 span
    read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
    span=$((low - 20000))
    ((span >= 1000)) || span=30000
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % span))
        [[ $taken_ports == *" $port "* ]] && continue
        hex=$(printf ':%04X ' "$port")
        if ! cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -qF "$hex"; then
            taken_ports+="$port "
            echo "$port"
            return
        fi
    done
    die "no free TCP port found"
}

# A private cluster set up as gavel's own embedded cluster is (fsync and
# synchronous_commit on, and the settings of src/db/embedded.conf), reachable only
# through a Unix socket in the temporary directory.
start_postgres() {
    pgdir=$tmp/pg
    pgdata=$pgdir/data
    mkdir -p "$pgdir"
    chmod 700 "$pgdir"
    is_root && chown postgres: "$pgdir"
    log "initdb and start PostgreSQL ($pg_bin) in $pgdir"
    # The same initdb options as gavel's embedded cluster.
    local args_file=$here/../src/db/initdb.args initdb_args
    [[ -r $args_file ]] || die "cannot read $args_file"
    mapfile -t initdb_args < <(grep -v -e '^#' -e '^[[:space:]]*$' "$args_file")
    as_pg "$pg_bin/initdb" --pgdata "$pgdata" --username gavel "${initdb_args[@]}" \
        --no-sync >"$tmp/initdb.log" 2>&1 ||
        { cat "$tmp/initdb.log" >&2; die "initdb failed"; }
    # The embedded cluster's own settings, in postgresql.conf's own form: the
    # server reads them as it reads the rest of its configuration.
    cat "$here/../src/db/embedded.conf" >>"$pgdata/postgresql.conf" ||
        die "could not add src/db/embedded.conf to the cluster's configuration"
    pg_started=1
    as_pg "$pg_bin/pg_ctl" -D "$pgdata" -l "$pgdir/postgres.log" -w -t 60 \
        -o "-c listen_addresses= -c unix_socket_directories=$pgdir -c max_connections=$pg_max_connections" \
        start >/dev/null || die "PostgreSQL did not start"
    # sqlx rejects an empty host ("postgres://gavel@/gavel?host=…", the form psql
    # takes); with a host named, its host= parameter still picks the socket directory.
    database_url="postgres://gavel@localhost/gavel?host=$pgdir"
    psql_db postgres -c "create database gavel" >/dev/null
}

# psql against the private cluster: quiet, unaligned, stop on the first error.
psql_db() {
    local db=$1
    shift
    PGCONNECT_TIMEOUT=10 "$pg_bin/psql" -X -q -At -v ON_ERROR_STOP=1 -h "$pgdir" -U gavel -d "$db" "$@"
}

sql() { psql_db gavel -c "$1"; }

# Waits up to $2 seconds for URL $1 to answer 200, while process $3 lives.
wait_http_ok() {
    local url=$1 deadline=$((SECONDS + $2)) pid=$3
    until curl -fs -o /dev/null --max-time 1 "$url"; do
        kill -0 "$pid" 2>/dev/null || return 1
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# scrape_metrics FILE: gavel's /metrics as it is now.
scrape_metrics() {
    curl -fsS --max-time 5 "http://127.0.0.1:$admin_port/metrics" >"$1" ||
        die "scraping /metrics failed"
}

# A field of gavel's /proc status, in kB: VmHWM (peak resident) or VmRSS (now).
gavel_status_kb() {
    awk -v field="$1:" '$1 == field {print $2}' "/proc/$gavel_pid/status"
}

# jq: answers with a 2xx status a second in a gavel-loadtest report (for bids,
# the accepted ones: a 409 is an answer too, but not a bid placed).
# shellcheck disable=SC2034 # used by the scripts that source this file
jq_accepted_per_sec='def accepted_per_sec: ([.statuses | to_entries[] | select(.key | startswith("2")) | .value] | add // 0) / .duration_secs;'

# remove_tmp STATUS LOG…: the temporary directory removed, after the last lines of
# each LOG in it are shown when STATUS says the script failed, so that what
# explains a failure stays on screen.
remove_tmp() {
    local status=$1 f
    shift
    [[ -n $tmp && -d $tmp ]] || return 0
    if ((status != 0)); then
        for f in "$@"; do
            [[ -s $tmp/$f ]] || continue
            echo "--- last lines of $f" >&2
            tail -n 15 "$tmp/$f" >&2
        done
    fi
    rm -rf "$tmp"
}

# Stops the private cluster, if start_postgres started one: fast, else at once.
stop_postgres() {
    ((pg_started)) || return 0
    if ! as_pg "$pg_bin/pg_ctl" -D "$pgdata" -m fast -w -t 30 stop >/dev/null 2>&1; then
        echo "$script_name: pg_ctl stop failed; stopping the postmaster immediately" >&2
        local pm
        pm=$(head -n1 "$pgdata/postmaster.pid" 2>/dev/null || true)
        [[ -n $pm ]] && kill -QUIT "$pm" 2>/dev/null && wait_exit "$pm" 10
    fi
}
