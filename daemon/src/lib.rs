//! lcached, the lcache daemon: step records and layer blobs in a store, per-context file
//! indexes kept fresh by a watcher, and the HTTP API over a Unix socket and TCP.

pub mod api;
pub mod codec;
pub mod context_index;
pub mod context_watcher;
pub mod deferred_naming;
pub mod digest_persister;
pub mod eviction;
pub mod gzip_forms;
pub mod layer_naming;
pub mod listing_gc;
pub mod memory_release;
pub mod metrics;
pub mod planner;
pub mod provisional_names;
pub mod registry_client;
pub mod registry_pull;
pub mod registry_push;
pub mod scopes;
pub mod server;
pub mod state;
pub mod stop_watchdog;
pub mod store;
pub mod store_lock;
pub mod token_auth;
pub mod transit_gzip;
pub mod upstream;
