//! Integration tests: the real server on a real socket, on a real Postgres (one private
//! cluster per test process, a fresh database per test), driven over HTTP and through the CLI.

#![expect(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

mod analysis;
mod app_metrics;
mod app_network;
mod apps;
mod auth;
mod backup;
mod build_isolation;
mod build_transfer;
mod builds;
mod bus;
mod certificates;
mod cli;
mod container_resources;
mod containers;
mod cp;
mod cross_site;
mod dashboard;
mod deploys;
mod drivers;
mod encodings;
mod feed;
mod helpers;
mod hostile;
mod keepers;
mod kube_analysis;
mod kube_certs;
mod kube_exec;
mod kube_prometheus;
mod kube_pull_secrets;
mod kube_resources;
mod kubeenv;
mod kubernetes;
mod limits;
mod objects;
mod openapi;
mod outage;
mod quickstart;
mod rack_system;
mod real_node;
mod registries;
mod release_diff;
mod replicas;
mod resources;
mod run;
mod sandbox;
mod security;
mod server;
mod service;
mod soak;
mod timers;
mod tls;
mod upgrade;
mod webhooks;
