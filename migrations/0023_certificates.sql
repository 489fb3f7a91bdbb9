-- Certificates (`convox certs`, `certs import`, `certs generate`) and which app service each one
-- serves (`convox ssl update`). The certificate (with its chain) is public and kept as PEM; the
-- private key is sealed (src/secrets.rs: nonce, ciphertext and tag under the rack's secrets key)
-- and never stored or returned in clear.
create table certificates (
    id text not null,
    domain text not null,
    domains text[] not null,
    expires_at timestamptz not null,
    certificate_pem text not null,
    key_sealed bytea not null,
    generated boolean not null default false,
    created_at timestamptz not null default now(),
    constraint certificates_pkey primary key (id)
);

-- A certificate in use cannot be deleted (restrict); an app's uses go with the app.
create table certificate_uses (
    app text not null,
    service text not null,
    port integer not null,
    certificate_id text not null,
    updated_at timestamptz not null default now(),
    constraint certificate_uses_pkey primary key (app, service, port),
    constraint certificate_uses_app_fkey foreign key (app) references apps (name) on delete cascade,
    constraint certificate_uses_certificate_fkey foreign key (certificate_id)
        references certificates (id) on delete restrict
);
create index certificate_uses_certificate_idx on certificate_uses (certificate_id);
