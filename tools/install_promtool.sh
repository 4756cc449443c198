#!/bin/sh
# promtool (Prometheus's rule checker) for tests/chart: no PyPI package ships it, Debian's
# `prometheus` package does (2.42). Installs it when missing and this is a root Debian machine;
# otherwise says what to do (the promtool tests are then skipped).
set -eu
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  command -v promtool
else
  echo "promtool not found: install Prometheus (Debian: apt-get install prometheus); its tests are skipped" >&2
fi
