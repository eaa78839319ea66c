#!/usr/bin/env bash
# The Debian packages the test suite needs: Dovecot (IMAP tests) and Chromium with
# its driver (console tests). Installs what is missing when run as root with apt;
# otherwise says what to install (the tests that need them skip loudly, or fail in CI).
set -euo pipefail
need=()
[ -x /usr/sbin/dovecot ] || need+=(dovecot-imapd)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
else
  echo "mailkey: for the full suite install: ${need[*]} (apt-get install ...)" >&2
fi
