-- Scoped API tokens: only their SHA-256 is kept; the secret is shown once, when created.
create table tokens (
    id uuid not null,
    name text not null,
    role text not null,
    hash text not null,
    created_at timestamptz not null default now(),
    last_used_at timestamptz,
    constraint tokens_pkey primary key (id),
    constraint tokens_hash_key unique (hash),
    constraint tokens_role check (role in ('read', 'deploy', 'admin')),
    constraint tokens_name_length check (length(name) between 1 and 100)
);
