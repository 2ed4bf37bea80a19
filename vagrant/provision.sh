#!/usr/bin/env bash
# provision.sh REPO RESULTS NAME [PROVIDERS]: inside a Vagrant box, as root.
#
# Sets hairtrace up with the project's own scripts/setup (the same script CI and
# the host use), then records the seed scenarios exactly as the host and
# scripts/vm-run do (scripts/scenario-seed 0 = broken, 1 = healthy), one JSON
# report per scenario and provider, into RESULTS (a folder shared with the host):
#
#   system.txt                          box, OS, kernel, BTF present
#   setup.log                           scripts/setup's output
#   doctor.json                         hairtrace doctor --json (what the kernel offers)
#   <release>-seed-broken-<provider>.json, <release>-seed-healthy-<provider>.json
#                                       the reports (named like scripts/triage --out)
#   <scenario>-<provider>.log           hairtrace's stderr for that run
#   provision.log                       what failed, one line each
#
# PROVIDERS: space-separated, default "auto" (what the kernel picks).
# Exit status: 0 every scenario printed a report (broken or ok), 1 otherwise.
set -uo pipefail

repo=${1:-/opt/hairtrace}
results=${2:-/hairtrace-results}
name=${3:-$(hostname)}
providers=${4:-auto}
release=$(uname -r)
status=0

mkdir -p "$results"
: >"$results/provision.log"
log() { printf 'provision %s: %s\n' "$name" "$*" | tee -a "$results/provision.log" >&2; }

# shellcheck source=/dev/null
. /etc/os-release
{
	echo "box: $name"
	echo "os: ${PRETTY_NAME:-unknown}"
	echo "kernel: $release"
	echo "btf: $([[ -r /sys/kernel/btf/vmlinux ]] && echo yes || echo no)"
} >"$results/system.txt"

if ! bash "$repo/scripts/setup" >"$results/setup.log" 2>&1; then
	log "scripts/setup failed on ${PRETTY_NAME:-?} ($release): $(grep -v '^\s*$' "$results/setup.log" | tail -n 1)"
	exit 1
fi

"$repo/.venv/bin/hairtrace" doctor --json >"$results/doctor.json" 2>"$results/doctor.log" ||
	log "hairtrace doctor exited $? (see doctor.log)"

for knob in 0 1; do
	scenario=seed-broken
	[[ $knob == 1 ]] && scenario=seed-healthy
	for provider in $providers; do
		opts=()
		[[ $provider == auto ]] || opts=(--provider "$provider")
		tmp=$(mktemp)
		rc=0
		"$repo/scripts/scenario-seed" "$knob" "${opts[@]}" >"$tmp" 2>"$results/$scenario-$provider.log" || rc=$?
		# 0 ok and 3 broken are both results; no report on stdout is a failure
		picked=$("$repo/.venv/bin/python" -c \
			'import json, sys; print(json.load(open(sys.argv[1]))["provider"])' "$tmp" 2>/dev/null) || picked=""
		if [[ -n $picked ]]; then
			mv "$tmp" "$results/$release-$scenario-$picked.json"
			echo "provision $name: $scenario ($provider): report $release-$scenario-$picked.json (exit $rc)" >&2
		else
			rm -f "$tmp"
			log "$scenario ($provider): no report (exit $rc): $(tail -n 1 "$results/$scenario-$provider.log")"
			status=1
		fi
	done
done
exit "$status"
