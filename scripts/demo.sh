#!/usr/bin/env bash
# make demo: the simulator on a pseudo-terminal with a bearing-wear fault scheduled, the agent on the
# shipped model (models/default), alerts printed here and published to a local mosquitto that this
# script starts. Stops by itself after DEMO_SECONDS (default 150; 0 = until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEMO_SECONDS=${DEMO_SECONDS:-150}
SPEED=${DEMO_SPEED:-20}
SCENARIO=${DEMO_SCENARIO:-bearing_wear}
export PATH="$PATH:/usr/sbin:/sbin"

work=$(mktemp -d -t edgewatch-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

# 1. A local broker (install it if we may; otherwise the demo runs with console output only).
if ! command -v mosquitto >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "demo: installing mosquitto (apt-get)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto) >/dev/null || true
fi
uplink_enabled=false
port=$($BIN/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if command -v mosquitto >/dev/null 2>&1; then
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$work/mosquitto.conf"
  mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
  pids+=($!)
  uplink_enabled=true
  sleep 0.5
  echo "demo: mosquitto on 127.0.0.1:$port"
else
  echo "demo: mosquitto not available; alerts go to the console only"
fi

# 2. The firmware simulator on a pty: two pumps, pump-01 develops bearing wear.
$BIN/edgewatch sim serial --pty --seed 7 --devices 2 --speed "$SPEED" --scenario "$SCENARIO" \
  --fault-after 300 --degradation 600 >"$work/sim.out" 2>"$work/sim.err" &
pids+=($!)
for _ in $(seq 1 50); do
  pty=$(sed -n 's/^serial port: //p' "$work/sim.out" | head -n1)
  [ -n "$pty" ] && break
  sleep 0.1
done
[ -n "${pty:-}" ] || { echo "simulator did not start:"; cat "$work/sim.err"; exit 1; }
echo "demo: simulator on $pty at ${SPEED}x, scenario $SCENARIO (bearing wear starts 300 s of sim time in, failure at 900 s)"

# 3. A subscriber that shows what reaches the broker.
if [ "$uplink_enabled" = true ]; then
  $BIN/python scripts/demo_subscriber.py 127.0.0.1 "$port" &
  pids+=($!)
fi

# 4. The agent, with a config written from the demo template.
sed -e "s|@PTY@|$pty|" -e "s|@STATE@|$work/state|" -e "s|@PORT@|$port|" \
    -e "s|@UPLINK@|$uplink_enabled|" examples/demo.toml > "$work/edgewatch.toml"
echo "demo: agent config $work/edgewatch.toml; press Ctrl-C to stop"
$BIN/edgewatch run --config "$work/edgewatch.toml" &
agent=$!
pids+=($agent)
if [ "$DEMO_SECONDS" -gt 0 ]; then
  ( sleep "$DEMO_SECONDS"; kill -TERM "$agent" 2>/dev/null ) &
  pids+=($!)
fi
wait "$agent" || true
echo "demo: done"
