#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py (Debian/Ubuntu). The test skips without it.
# Playwright/puppeteer browser downloads are not needed: the test drives /usr/bin/chromium directly.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  /usr/bin/chromium --version
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "no apt-get here: install Chromium yourself to run the report's browser test (it skips without it)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update
$SUDO apt-get install -y chromium
/usr/bin/chromium --version
