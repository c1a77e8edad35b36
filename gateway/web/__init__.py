"""The web app at `/`: pages, their files and browser sign-in, served by the gateway itself.

- `pages`: the HTML shells, `/static/app/` (our ES modules and CSS) and `/static/vendor/` (the
  pinned npm libraries), all under a strict Content-Security-Policy;
- `session`: sign-in with an HttpOnly session cookie and its CSRF token (`/api/web/...`);
- `vendor`: the lock of front-end libraries and whether they are installed
  (`scripts/webdeps.py` installs them).

Imports nothing here, so `scripts/webdeps.py` can load `gateway.web.vendor` before anything
else is installed.
"""
