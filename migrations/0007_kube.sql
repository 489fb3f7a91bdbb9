-- The Kubernetes runtime: images a build pushed, and short-lived tokens scoped to one request
-- (a build pod fetching its source).

-- Service name -> image reference, e.g. {"web": "registry.example.com/rack/myapp:web.BABCDEFGHI"}.
alter table builds add column images jsonb not null default '{}';

-- A scoped token allows exactly one request: "GET /apps/<app>/objects/<key>" (HEAD too).
alter table tokens add column scope text;
alter table tokens add column expires_at timestamptz;
create index tokens_expires_at on tokens (expires_at) where expires_at is not null;
