#!/usr/bin/env bash
# Restart SysManage server processes one at a time (a new release, a new setting):
#
#   deploy/rolling-restart.sh 8001 8002
#
# Each instance of sysmanage@.service drains as it stops (its sockets reconnect, through
# nginx, to the others) and is restarted; the next one is restarted only once this one
# answers /readyz with 200 again, so that some process always takes new sockets.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 PORT..." >&2; exit 2; }
READY_WAIT=${READY_WAIT:-60}

for port in "$@"; do
    echo "==> restarting sysmanage@$port (it drains first)"
    systemctl restart "sysmanage@$port"
    ready=
    for _ in $(seq 1 "$READY_WAIT"); do
        if curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz"; then
            ready=yes
            break
        fi
        sleep 1
    done
    if [ -z "$ready" ]; then
        echo "error: sysmanage@$port is not ready after ${READY_WAIT}s; stopping here" >&2
        curl -sS "http://127.0.0.1:$port/readyz" >&2 || true
        exit 1
    fi
    echo "==> sysmanage@$port is ready"
done
