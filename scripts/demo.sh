#!/usr/bin/env bash
# make demo: local Kafka, one worker with the embedded SQLite sink, a generated dataset,
# the coupon table printed, everything shut down again.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
run_id="demo-$(date +%s)"
demo_dir=".local/demo/$run_id"
mkdir -p "$demo_dir"

export COUPON_APP_ID="$run_id"
export COUPON_ORDERS_TOPIC="$run_id-orders"
export COUPON_REFUNDS_TOPIC="$run_id-refunds"
export COUPON_DLQ_TOPIC="$run_id-dead-letters"
export COUPON_DB_URL="sqlite+aiosqlite:///$demo_dir/coupons.db"
export COUPON_DATA_DIR="$demo_dir/state"
export COUPON_PARTITIONS=4
export COUPON_WEB_PORT="${COUPON_WEB_PORT:-6066}"

kafka_was_up=0
bash scripts/kafka.sh status >/dev/null 2>&1 && kafka_was_up=1
bash scripts/services.sh up kafka

worker_pid=""
cleanup() {
  if [ -n "$worker_pid" ] && kill -0 "$worker_pid" 2>/dev/null; then
    kill -TERM "$worker_pid"; wait "$worker_pid" 2>/dev/null || true
  fi
  if [ "$kafka_was_up" = 0 ]; then bash scripts/kafka.sh stop; fi
}
trap cleanup EXIT

echo "== generate a demo dataset"
$BIN/coupon-stream generate --orders "${DEMO_ORDERS:-5000}" --out "$demo_dir"
echo "== create input topics"
$BIN/coupon-stream topics --partitions 3
echo "== start one worker (log: $demo_dir/worker.log)"
$BIN/coupon-stream worker --loglevel info >"$demo_dir/worker.log" 2>&1 &
worker_pid=$!
echo "== produce"
$BIN/coupon-stream produce --orders "$demo_dir/orders.jsonl" --refunds "$demo_dir/refunds.jsonl"
echo "== wait until every message is applied and written"
if ! $BIN/coupon-stream status --until-idle 180; then
  tail -n 40 "$demo_dir/worker.log"; exit 1
fi
echo "== the coupon table (tddl_output): buyers whose daily net spend is positive"
$BIN/coupon-stream show --limit 15
echo "== check against the seed SQL (tests/reference.py, independent of the service)"
$BIN/python -m tests.reference "$demo_dir/orders.jsonl" "$demo_dir/refunds.jsonl" "$demo_dir/coupons.db"
