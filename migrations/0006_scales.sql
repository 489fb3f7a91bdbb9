-- Service counts set with `scale`; they override the manifest's scale.count for every later
-- deployment of the app, as convox's scale does.
create table service_scales (
    app text not null,
    service text not null,
    count integer not null,
    updated_at timestamptz not null default now(),
    constraint service_scales_pkey primary key (app, service),
    constraint service_scales_app_fkey foreign key (app) references apps (name) on delete cascade,
    constraint service_scales_count check (count between 0 and 1000)
);
