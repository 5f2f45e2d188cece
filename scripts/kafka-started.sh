# Sourced by scripts/kafka.sh and scripts/secure.sh: has a broker finished
# starting since a given moment?
#
# kafka_started_since LOG T0
#   True once LOG (a broker's server.log) or the file log4j rolled it into last
#   holds 'Kafka Server started' stamped at or after T0 ("YYYY-MM-DD HH:MM:SS",
#   as kafka_log_stamp prints it; "" matches any start).
#
# Timestamps, not byte offsets: log4j rolls server.log every hour. A start that spans
# the hour may write the line just before the roll, into the file log4j then renames;
# an offset into server.log looked only at the new file, missed the line, and a restart
# that had worked was reported as failed.

kafka_log_stamp() {
  date '+%Y-%m-%d %H:%M:%S'
}

kafka_started_since() {
  local log="$1" t0="$2"
  local -a files=()
  local rolled
  [[ -f "${log}" ]] && files+=("${log}")
  # The newest rolled file: the line may have gone in just before a roll.
  rolled="$(find "$(dirname "${log}")" -maxdepth 1 -name "$(basename "${log}").*" -printf '%T@ %p\n' 2>/dev/null |
    sort -n | tail -n 1 | cut -d' ' -f2- || true)"
  [[ -n "${rolled}" ]] && files+=("${rolled}")
  ((${#files[@]} > 0)) || return 1
  # log4j's "[%d]" begins "[YYYY-MM-DD HH:MM:SS,mmm]": compared as text.
  awk -v t0="${t0}" \
    'index($0, "Kafka Server started") && substr($0, 2, 19) >= t0 { found = 1 } END { exit !found }' \
    "${files[@]}"
}
