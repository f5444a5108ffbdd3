#!/usr/bin/env bash
# The browser test drives Debian's Chromium (Playwright's own browser download is not used).
# Installs it when missing and we may (root with apt-get); otherwise that test skips and says why.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: could not install chromium; the browser test will skip"
else
  echo "note: chromium is not installed; the browser test will skip (apt-get install chromium)"
fi
exit 0
