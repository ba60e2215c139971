//! Integration tests: a real multi-core gavel on port 0, a real PostgreSQL (a
//! private cluster per test, migrated), a real HTTP client.

mod accounts;
mod batches;
mod bids;
mod buy_now;
mod caching;
mod coherence;
mod concurrency;
mod dashboard;
mod errors;
mod failover;
mod fast_reads;
mod helpers;
mod http2;
mod idempotency;
mod images;
mod instances;
mod inventory;
mod lifecycle;
mod limits;
mod metrics;
mod offline_queries;
mod openapi;
mod operations;
mod orders;
mod proxy;
mod replicas;
mod sessions;
mod shop;
mod streams;
mod web;
