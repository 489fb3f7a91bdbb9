"""The release phase: runs once per release, before any process of it starts (a database
migration, say). A failure stops the deployment and changes nothing."""

import os

print(f"migrating for release {os.environ.get('RELEASE', '?')}", flush=True)
