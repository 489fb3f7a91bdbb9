-- Private registries (`convox registries add`): the credentials podman builds and pulls, and
-- Kubernetes' imagePullSecrets, use. The password is sealed (src/secrets.rs: nonce, ciphertext
-- and tag under the rack's secrets key), never stored or returned in clear.
create table registries (
    server text not null,
    username text not null,
    password_sealed bytea not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint registries_pkey primary key (server),
    constraint registries_server_check check (server <> '')
);
