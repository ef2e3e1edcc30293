# Sourced by perf/http-cpu.sh and perf/profile.sh: starts the server under test on a loopback
# port and readies one route for wrk. Expects $bin, $route, $shards and $driver (and SERVER_ARGS);
# sets $pid, $addr, $url, $lua (wrk's script) and $data and $out (removed by the caller's trap).
data=$(mktemp -d)
out=$(mktemp)
lua=$(mktemp --suffix=.lua)
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" --shards "$shards" --io-driver "$driver" \
  --log-level warn ${SERVER_ARGS:-} >"$out" &
pid=$!
for _ in $(seq 100); do grep -q listening "$out" && break; sleep 0.05; done
addr=$(sed -n 's/^listening on //p' "$out")

deploy() { # name, module in base64
  curl -sf -X POST "http://$addr/functions" -d "{\"name\":\"$1\",\"wasm_b64\":\"$2\"}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
case $route in
  healthz) url="http://$addr/healthz"; echo 'wrk.method = "GET"' >"$lua" ;;
  hello)
    id=$(deploy hello AGFzbQEAAAABBAFgAAADAgEABwoBBl9zdGFydAAACgQBAgAL)
    url="http://$addr/functions/$id/invoke"; printf 'wrk.method = "POST"\nwrk.body = "{}"\n' >"$lua" ;;
  *) echo "unknown route $route" >&2; kill "$pid"; exit 2 ;;
esac
