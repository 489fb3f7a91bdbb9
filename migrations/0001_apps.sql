-- Apps: the unit of deployment. The name is the key: it is what every client addresses.
create table apps (
    name text not null,
    generation text not null default '3',
    locked boolean not null default false,
    parameters jsonb not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint apps_pkey primary key (name),
    constraint apps_name_format check (name ~ '^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$'),
    constraint apps_parameters_object check (jsonb_typeof(parameters) = 'object')
);
