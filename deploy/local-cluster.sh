#!/usr/bin/env bash
# A whole lbnode cluster on one machine, from this checkout, for trying things out:
#
#   * a private redis-server on 127.0.0.1 (a free port, or --redis-port), no persistence,
#     with the production ACL: user `default` off, nodes and lbctl log in as user `lb` (a
#     random password) with exactly the rules of deploy/redis/users.acl, and user `admin`
#     (every command; its password in RUN_DIR/redis-admin.password) is there to look inside;
#   * three demo backends (python -m lbnode.demo_backend) on 127.0.0.1;
#   * three lbnode nodes joined with --redis, each on its own loopback address
#     (127.0.0.2, .3, .4: --bind for the listeners, admin API on ADDRESS:--admin-port);
#   * one load balancer, "demo", applied with `lbctl apply -f` (the file is written to the
#     run directory; edit it and apply it again to change the cluster).
#
# It prints how to reach everything, then runs until Ctrl-C / SIGTERM, or until one of its
# processes exits. On the way out it stops every process it started, by PID: SIGTERM, a
# bounded wait, then SIGKILL. Logs stay in the run directory.
#
# Usage: deploy/local-cluster.sh [--redis-port N] [--http-port N] [--admin-port N]
#                                [--backend-ports A,B,C] [--dir DIR] [--pidfile FILE]
# Every port defaults to a free one except --http-port (8080) and --admin-port (9901);
# env: LC_REDIS_PORT, LC_HTTP_PORT, LC_ADMIN_PORT, LC_BACKEND_PORTS, LC_DIR, LC_PIDFILE.
# Needs: redis-server, and python 3.11+ with the project's dependencies (.venv/bin/python
# when it exists, else python3). Linux: the whole 127.0.0.0/8 is loopback; on macOS add
# the aliases first (sudo ifconfig lo0 alias 127.0.0.2 up, and .3, .4).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
REDIS_SERVER="${REDIS_SERVER:-$(command -v redis-server || true)}"

REDIS_PORT="${LC_REDIS_PORT:-}"
HTTP_PORT="${LC_HTTP_PORT:-8080}"
ADMIN_PORT="${LC_ADMIN_PORT:-9901}"
BACKEND_PORTS="${LC_BACKEND_PORTS:-}"
RUN_DIR="${LC_DIR:-}"
PIDFILE="${LC_PIDFILE:-}"
NODE_ADDRS=(127.0.0.2 127.0.0.3 127.0.0.4)
START_TIMEOUT=30   # seconds for each readiness wait
STOP_TIMEOUT=10    # seconds between SIGTERM and SIGKILL, per process

die() { echo "local-cluster: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --redis-port) REDIS_PORT="$2"; shift 2 ;;
        --http-port) HTTP_PORT="$2"; shift 2 ;;
        --admin-port) ADMIN_PORT="$2"; shift 2 ;;
        --backend-ports) BACKEND_PORTS="$2"; shift 2 ;;
        --dir) RUN_DIR="$2"; shift 2 ;;
        --pidfile) PIDFILE="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ -n "$PY" ]] || die "no python3 found"
[[ -n "$REDIS_SERVER" && -x "$REDIS_SERVER" ]] || die "redis-server not found (apt-get install redis-server)"

free_port() {  # a TCP port free on 127.0.0.1 right now
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Poll until the python expression (with `url` bound) is true, at most START_TIMEOUT seconds.
wait_http() {  # wait_http WHAT URL CHECK
    "$PY" - "$1" "$2" "$3" "$START_TIMEOUT" <<'EOF'
import json, sys, time, urllib.error, urllib.request
what, url, check, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            body = resp.read()
            if eval(check, {"status": resp.status, "body": body, "json": json}):
                sys.exit(0)
    except (OSError, ValueError):
        pass
    if time.monotonic() > deadline:
        sys.exit(f"local-cluster: timed out after {timeout:g}s waiting for {what} ({url})")
    time.sleep(0.1)
EOF
}

wait_redis() {  # wait_redis PORT USER PASSWORD: until it answers PING after AUTH
    "$PY" - "$1" "$START_TIMEOUT" "$2" "$3" <<'EOF'
import socket, sys, time
port, timeout, user, password = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
auth = b"*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
    len(user), user.encode(), len(password), password.encode())
deadline = time.monotonic() + timeout
while True:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(auth + b"PING\r\n")
            reply = b""
            while len(reply) < 12 and (chunk := s.recv(64)):
                reply += chunk
            if reply.startswith(b"+OK\r\n+PONG"):
                sys.exit(0)
            if reply.startswith(b"-"):
                sys.exit(f"local-cluster: redis-server refused us: {reply.decode(errors='replace')}")
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"local-cluster: redis-server on port {port} did not answer PING in {timeout:g}s")
    time.sleep(0.05)
EOF
}

# -- processes: started in the background, recorded, stopped by PID on exit ----------------------

PIDS=()
NAMES=()

record() {  # record PID NAME
    PIDS+=("$1")
    NAMES+=("$2")
    echo "$1 $2" >>"$RUN_DIR/pids"
    if [[ -n "$PIDFILE" ]]; then echo "$1 $2" >>"$PIDFILE"; fi
}

stop_all() {
    local status=$?
    trap - EXIT INT TERM
    if [[ ${#PIDS[@]} -gt 0 ]]; then
        echo "local-cluster: stopping ${#PIDS[@]} process(es)" >&2
    fi
    # Newest first: nodes drain before their backends and Redis go away.
    local i pid deadline
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[i]}"
        kill -TERM "$pid" 2>/dev/null || continue
        deadline=$((SECONDS + STOP_TIMEOUT))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "local-cluster: ${NAMES[i]} (pid $pid) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "${RUN_DIR:-}" ]]; then echo "local-cluster: stopped; logs in $RUN_DIR" >&2; fi
    exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Children in process groups of their own: a Ctrl-C at the terminal reaches only this
# script, which then stops them one by one with SIGTERM (a node would take a second
# signal as "exit now, without draining").
set -m

# -- set-up ------------------------------------------------------------------------------------

if [[ -z "$RUN_DIR" ]]; then RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/lbnode-local.XXXXXX")"; fi
mkdir -p "$RUN_DIR/redis"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
(umask 077 && : >"$RUN_DIR/redis-admin.password")
: >"$RUN_DIR/pids"
if [[ -n "$PIDFILE" ]]; then : >"$PIDFILE"; fi

for addr in "${NODE_ADDRS[@]}"; do
    "$PY" -c "import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0))" "$addr" 2>/dev/null \
        || die "cannot bind $addr (on macOS: sudo ifconfig lo0 alias $addr up)"
done

[[ -n "$REDIS_PORT" ]] || REDIS_PORT="$(free_port)"
if [[ -n "$BACKEND_PORTS" ]]; then
    IFS=, read -r -a BPORTS <<<"$BACKEND_PORTS"
    [[ ${#BPORTS[@]} -eq 3 ]] || die "--backend-ports wants three ports, e.g. 9001,9002,9003"
else
    BPORTS=("$(free_port)" "$(free_port)" "$(free_port)")
fi
REDIS_USER=lb
REDIS_PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_hex(12))')"
REDIS_URL="redis://$REDIS_USER:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT/0"
ADMIN_PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_hex(12))')"
# The rules of user `lb` in deploy/redis/users.acl: everything after its password hash.
ACL_FILE="$REPO/deploy/redis/users.acl"
read -r -a ACL_RULES <<<"$(sed -n 's/^user lb on #[0-9a-f]\{64\} //p' "$ACL_FILE")"
[[ ${#ACL_RULES[@]} -gt 0 ]] || die "no rules for user lb in $ACL_FILE"
LBCTL=("$PY" -m lbshared.lbctl --redis "$REDIS_URL")

# Redis: private, loopback only, nothing written to disk, the production ACL. (The password
# shows in `ps` here; a real deployment loads an aclfile instead, see docs/security.md.)
"$REDIS_SERVER" --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$RUN_DIR/redis" --logfile "$RUN_DIR/redis.log" --daemonize no \
    --user default off --user "$REDIS_USER" on ">$REDIS_PASSWORD" "${ACL_RULES[@]}" \
    --user admin on ">$ADMIN_PASSWORD" "~*" "&*" "+@all" </dev/null &
record $! redis-server
echo "$ADMIN_PASSWORD" >"$RUN_DIR/redis-admin.password"
wait_redis "$REDIS_PORT" "$REDIS_USER" "$REDIS_PASSWORD"

# Backends.
for i in 0 1 2; do
    id="web-$((i + 1))"
    "$PY" -m lbnode.demo_backend --host 127.0.0.1 --port "${BPORTS[i]}" --id "$id" \
        </dev/null >"$RUN_DIR/$id.log" 2>&1 &
    record $! "$id"
done
for i in 0 1 2; do
    wait_http "backend web-$((i + 1))" "http://127.0.0.1:${BPORTS[i]}/health" "status == 200"
done

# The load balancer, applied before the nodes start: they load it from Redis.
cat >"$RUN_DIR/cluster.yaml" <<EOF
# Applied by deploy/local-cluster.sh; change it and run:
#   ${LBCTL[*]} apply -f $RUN_DIR/cluster.yaml
load_balancers:
  - name: demo
    listeners:
      - {protocol: http, port: $HTTP_PORT}
    algorithm: round_robin
    targets:
      - {id: web-1, address: "127.0.0.1:${BPORTS[0]}"}
      - {id: web-2, address: "127.0.0.1:${BPORTS[1]}"}
      - {id: web-3, address: "127.0.0.1:${BPORTS[2]}", weight: 50}
    timeouts: {connect: 2s, request_headers: 10s, upstream_response: 30s, idle: 60s}
    health_check: {path: /health, interval: 5s, timeout: 1s,
                   healthy_threshold: 2, unhealthy_threshold: 3}
    # mode cluster (the default): each node decides locally, counters shared through Redis
    rate_limit: {limit: 6000, interval: 60s, key: client_ip}
    # for requests no rule takes: a session pinned through one node sticks on every node
    sticky_session: {cookie: session_id, ttl: 1h}
    rules:
      api:
        path: /api/*
        targets: [web-1, web-2, web-3]
        # strict: one atomic Redis script per request, exact over the cluster
        rate_limit: {limit: 100, interval: 10s, key: client_ip, mode: strict}
EOF
"${LBCTL[@]}" apply -f "$RUN_DIR/cluster.yaml" | tee "$RUN_DIR/apply.out"

# Nodes.
NODE_IDS=()
for i in 0 1 2; do
    addr="${NODE_ADDRS[i]}"
    id="node-$((i + 1))"
    NODE_IDS+=("$id")
    "$PY" -m lbnode --redis "$REDIS_URL" --node-id "$id" --bind "$addr" \
        --admin "$addr:$ADMIN_PORT" --access-log "$RUN_DIR/$id.access.log" \
        --drain-timeout 5s --log-level info </dev/null >"$RUN_DIR/$id.out" 2>"$RUN_DIR/$id.log" &
    record $! "$id"
done
for i in 0 1 2; do
    addr="${NODE_ADDRS[i]}"
    wait_http "${NODE_IDS[i]} to load the config" "http://$addr:$ADMIN_PORT/healthz" \
        'status == 200 and json.loads(body)["config_version"] >= 1'
    wait_http "traffic through ${NODE_IDS[i]}" "http://$addr:$HTTP_PORT/" "status == 200"
done

cat <<EOF

local cluster up (run directory: $RUN_DIR)

  redis      $REDIS_URL   (ACL user $REDIS_USER; log: $RUN_DIR/redis.log)
  nodes      ${NODE_IDS[0]} ${NODE_ADDRS[0]}   ${NODE_IDS[1]} ${NODE_ADDRS[1]}   ${NODE_IDS[2]} ${NODE_ADDRS[2]}   (logs: $RUN_DIR/node-N.log)
  backends   web-1 127.0.0.1:${BPORTS[0]}   web-2 127.0.0.1:${BPORTS[1]}   web-3 127.0.0.1:${BPORTS[2]}

Traffic, through any node (the answer names the backend):
  curl -s http://${NODE_ADDRS[0]}:$HTTP_PORT/
  curl -s http://${NODE_ADDRS[1]}:$HTTP_PORT/
  curl -s http://${NODE_ADDRS[2]}:$HTTP_PORT/
  curl -s -o /dev/null -w '%{http_code}\n' http://${NODE_ADDRS[1]}:$HTTP_PORT/status/500   # a 5xx, for lbctl metrics
  curl -si 'http://${NODE_ADDRS[0]}:$HTTP_PORT/set-cookie?name=session_id&value=s1' | grep -i x-backend
  curl -s -H 'Cookie: session_id=s1' http://${NODE_ADDRS[2]}:$HTTP_PORT/   # the same backend, via another node
  curl -si http://${NODE_ADDRS[1]}:$HTTP_PORT/api/users | grep -i ratelimit   # strict limit, 100 per 10 s
  for i in \$(seq 30); do curl -s -o /dev/null -w '%{http_code} ' http://${NODE_ADDRS[2]}:$HTTP_PORT/; done; echo

The cluster (lbctl reads Redis only):
  export LB_REDIS_URL=$REDIS_URL PYTHONPATH=$REPO
  $PY -m lbshared.lbctl nodes
  $PY -m lbshared.lbctl status demo
  $PY -m lbshared.lbctl metrics demo
  $PY -m lbshared.lbctl events --lb demo
  $PY -m lbshared.lbctl apply -f $RUN_DIR/cluster.yaml

Redis itself (user admin; e.g. commands refused by the ACL):
  redis-cli -p $REDIS_PORT --user admin --pass \$(cat $RUN_DIR/redis-admin.password) --no-auth-warning ACL LOG

Admin APIs (loopback, no token):
  curl -s http://${NODE_ADDRS[0]}:$ADMIN_PORT/healthz
  curl -s http://${NODE_ADDRS[1]}:$ADMIN_PORT/status
  curl -s http://${NODE_ADDRS[2]}:$ADMIN_PORT/metrics

Stop: Ctrl-C, or kill -TERM $$ (every process above is stopped, by PID).
EOF

# Run until a signal, or until one of our processes exits (then stop the rest).
set +e
wait -n "${PIDS[@]}"
code=$?
set -e
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
        echo "local-cluster: ${NAMES[i]} (pid ${PIDS[i]}) exited with $code; stopping the rest" >&2
        break
    fi
done
exit 1
