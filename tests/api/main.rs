//! Integration tests: the real server on a real socket, on a real Postgres (one private
//! cluster per test process, a fresh database per test), driven over HTTP and through the CLI.

mod apps;
mod auth;
mod cli;
mod encodings;
mod helpers;
mod openapi;
mod server;
