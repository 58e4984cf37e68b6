//! `LocalStore` keeps every promise of the store suite.

use std::sync::Arc;

use dispatch_broker::store::{LocalStore, Store};
use dispatch_testkit::{TestDir, store_suite};

#[test]
fn local_store_passes_the_store_suite() -> anyhow::Result<()> {
    let dir = TestDir::new("store-suite")?;
    store_suite::run(dir.path(), &|root| {
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(root)?);
        Ok(store)
    })
}
