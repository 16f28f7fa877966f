//! Opening the store the config selects ([`Config::store_kind`]): Redis, or the
//! embedded redb file. Its own module because it knows both the config and every
//! backend: it sits above them, for the binary and `downloader callbacks`.

use std::sync::Arc;

use crate::config::{Config, StoreKind};
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::RedisStore;

/// Opens the store the config selects.
pub async fn connect_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match cfg.store_kind() {
        StoreKind::Redis => Ok(Arc::new(RedisStore::connect(&cfg.redis).await?)),
        StoreKind::Embedded(path) => {
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path)).await??;
            Ok(Arc::new(store))
        }
    }
}
